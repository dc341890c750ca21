"""The running system's rule set in force: the last one `loyalty replay --apply` activated, else the configured."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kafka import KafkaProducer

from schemas.topics import ALL_TOPICS, RULESETS
from streams.broker import ensure_topics
from streams.cutover import activation_record, ruleset_record
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.runtime import ruleset_in_force

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT = REPOSITORY / "streams/rules/rulesets/default.yaml"


def _record(bootstrap: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(RULESETS, key=key, value=value, partition=0).get(timeout=30)
    finally:
        producer.close()


def test_the_last_activated_rule_set_is_in_force_else_the_configured_one(broker):
    ensure_topics(broker.bootstrap, ALL_TOPICS, 2)
    configured = load_ruleset(DEFAULT)
    assert asyncio.run(ruleset_in_force(broker.bootstrap, configured)) is configured  # nothing recorded

    texts = {
        version: DEFAULT.read_text().replace("version: default-1", f"version: {version}")
        for version in ("default-2", "default-3")
    }
    for version, text in texts.items():
        _record(broker.bootstrap, *ruleset_record(version, text))
    # A rule set written but not activated (an apply whose markers were not reached yet) is not in force.
    assert asyncio.run(ruleset_in_force(broker.bootstrap, configured)) is configured

    _record(broker.bootstrap, *activation_record("loyalty.purchases", 0, 10, "default-2"))
    _record(broker.bootstrap, *activation_record("loyalty.purchases", 1, 12, "default-2"))
    _record(broker.bootstrap, *activation_record("loyalty.purchases", 0, 30, "default-3"))
    in_force = asyncio.run(ruleset_in_force(broker.bootstrap, configured))
    assert in_force.version == "default-3"
    assert in_force == parse_ruleset(texts["default-3"], "default-3")
