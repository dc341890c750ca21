"""Stream == batch with every lifecycle policy on: pending, confirmation, lot expiry, tiers, caps, refunds, referrals
reversed or withdrawn for both sides (the referrer's through a derived event)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys

import pytest
from test_pipeline import REPOSITORY, read_topic

from schemas.topics import ALL_TOPICS, DEAD_LETTER, LEDGER
from streams.batch import process_lines
from streams.broker import ensure_topics
from streams.producer import produce_file
from streams.rules.ruleset import load_ruleset
from streams.simulate import write_events

pytestmark = pytest.mark.integration

RULES = REPOSITORY / "streams/rules/rulesets/full-lifecycle.yaml"
PARTITIONS = 4


def test_worker_equals_batch_driver_under_the_full_lifecycle_rule_set(broker, tmp_path):
    events_path = tmp_path / "events.jsonl"
    # About 290 days of traffic, so return windows end, lots expire and tiers are reached.
    write_events(
        events_path,
        events=5000,
        customers=150,
        seed=5,
        mean_gap_seconds=5000,
        duplicate_share=0.03,
        bad_share=0.01,
        disputed_referral_share=0.3,
    )
    expected = process_lines(events_path.open("rb"), load_ruleset(RULES))
    kinds = collections.Counter(entry.kind.value for entry in expected.ledger)
    assert {"pending", "confirmed", "expired", "tier_changed", "reversed", "redeemed", "adjusted"} <= set(kinds)
    rules = collections.Counter(entry.rule_id for entry in expected.ledger)
    # Referrals reversed for both sides: the referrer's side through a derived referral.reversed event.
    assert rules["referral.referee.reversal"] and rules["referral.referrer.reversal"]
    # Referral guards on both sides: a referee already referred, or without the order, withdraws the referrer's.
    assert rules["referral.referee.already_referred"] and rules["referral.referee.no_order"]
    assert rules["referral.referrer.withdrawn"]

    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    produce_file(events_path, bootstrap=broker.bootstrap)
    environment = dict(
        os.environ,
        LOYALTY_KAFKA_BOOTSTRAP=broker.bootstrap,
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_RULES=str(RULES),
        LOYALTY_SESSION_TIMEOUT_S="2",
        LOYALTY_REORDER_WAIT_MS="120000",
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=environment,
            cwd=REPOSITORY,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            records = read_topic(broker.bootstrap, LEDGER, PARTITIONS, len(expected.ledger), timeout_s=180)
            dead = read_topic(broker.bootstrap, DEAD_LETTER, PARTITIONS, len(expected.rejected), timeout_s=30)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    streamed = {}
    for record in records:
        entry = json.loads(record.value)
        assert streamed.setdefault(entry["entry_id"], entry) == entry
    wanted = {entry.entry_id: entry.model_dump(mode="json") for entry in expected.ledger}
    if streamed != wanted:  # not `assert ==`: pytest's diff of two large dicts is quadratic
        differing = [key for key in set(streamed) & set(wanted) if streamed[key] != wanted[key]]
        pytest.fail(
            f"{len(set(wanted) - set(streamed))} entries missing, {len(set(streamed) - set(wanted))} extra, "
            f"{len(differing)} differ, e.g. {[(streamed[key], wanted[key]) for key in differing[:1]]}"
        )
    assert len(dead) == len(expected.rejected)
