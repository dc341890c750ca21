"""A preview through the running system under traffic: the customers with archived events the worker has not decided
yet are counted and named as such, so that lag is not read as the rule change (docs/replay.md, step 2)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from projections.archive import RawArchive
from schemas.topics import INPUT_TOPICS, PURCHASES
from streams import replay
from streams.rules.ruleset import load_ruleset
from streams.runtime import _replay_handler

ROOT = Path(__file__).resolve().parents[2]
RULES = (ROOT / "streams/rules/rulesets/seasonal-promotion.yaml").read_text()


def _preview(monkeypatch, *, committed, archived_to, projected, keys):
    asked = []

    class Monitor:
        def committed(self) -> dict:
            return dict(committed)

        def ends_fetched_after(self, topic, moment) -> dict:
            return {("loyalty.ledger", 0): 7}

    def keys_between(self, low, high):
        asked.append((low, high))
        return set(keys)

    report = {
        "customers": [
            {"customer_id": "c1", "balance_before": 10, "balance_after": 20, "delta": 10},
            {"customer_id": "c2", "balance_before": 5, "balance_after": 5, "delta": 0},
            {"customer_id": "c3", "balance_before": 0, "balance_after": 9, "delta": 9},
        ]
    }
    monkeypatch.setattr(RawArchive, "keys_between", keys_between)
    monkeypatch.setattr(replay, "dry_run", lambda *args, **kwargs: json.loads(json.dumps(report)))
    monkeypatch.setattr(replay, "known_rulesets", lambda client: {})
    monkeypatch.setattr(replay, "activated_versions", lambda client: [])
    monkeypatch.setattr(replay, "preview_settle_s", 0.3)
    context = SimpleNamespace(ruleset=load_ruleset(ROOT / "streams/rules/rulesets/default.yaml"))
    projector = SimpleNamespace(partitions=1, archived_to=archived_to, projected_to=projected)

    class Request:
        async def json(self) -> dict:
            return {"rules": RULES}

    async def ask():
        handle = _replay_handler(object(), asyncio.Lock(), context, Monitor(), projector, "127.0.0.1:9", 1)
        return await handle(Request())

    response = asyncio.run(ask())
    assert response.status == 200
    return json.loads(response.text), asked


def test_a_preview_under_traffic_counts_the_customers_whose_events_the_worker_has_not_decided(monkeypatch):
    committed = {(topic, 0): 3 for topic in INPUT_TOPICS}
    archived_to = {**committed, (PURCHASES, 0): 8}
    report, asked = _preview(
        monkeypatch,
        committed=committed,
        archived_to=archived_to,
        projected={("loyalty.ledger", 0): 7},
        keys={"c2", "c3"},
    )
    assert asked == [(committed, archived_to)]  # from the worker's committed offsets to the archive's end
    assert report["undecided"] == {"customers": 2, "customers_changed": 1, "ledger_stored": True}
    assert report["warnings"] == [
        "2 customers had archived events the worker had not decided yet (1 of them among the customers changed): their "
        "differences include that lag, not only the rule change; preview again once `loyalty status` shows no lag"
    ]


@pytest.mark.parametrize("projected", [{("loyalty.ledger", 0): 7}, {}])
def test_a_quiet_system_previews_without_a_warning_unless_the_ledger_is_not_stored(monkeypatch, projected):
    committed = {(topic, 0): 3 for topic in INPUT_TOPICS}
    report, _ = _preview(monkeypatch, committed=committed, archived_to=dict(committed), projected=projected, keys=())
    assert report["undecided"] == {"customers": 0, "customers_changed": 0, "ledger_stored": bool(projected)}
    if projected:
        assert report["warnings"] == []
    else:  # the projector never reached the ledger's end within the wait
        assert report["warnings"] == [
            "the projector had not stored every entry the worker had decided within 0.3 s: customers with recent "
            "events can show differences that are only that lag"
        ]


def test_control_messages_after_the_committed_offsets_are_not_counted_as_customers(monkeypatch, tmp_path):
    """An apply's plan parts (and cut-over and end markers) are archived with the routing key '' and the worker keeps
    its plan parts unacknowledged while it holds events for the compensations, so a preview then finds them from the
    committed offsets on: '' is no customer, and must not be counted as one."""
    from projections import connect, migrate
    from schemas.topics import REDEMPTIONS

    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        migrate(client)
        RawArchive(client).write(
            [
                (PURCHASES, 0, 3, "c3", b'{"event_id": "p3"}', 0, 0),  # a customer's event not decided yet
                (REDEMPTIONS, 0, 3, "", b'{"version": "v2", "cuts": {}, "part": 0, "parts": 1}', 5, 4),  # a plan part
            ],
            {},
        )
        committed = {(topic, 0): 3 for topic in INPUT_TOPICS}
        archived_to = {**committed, (PURCHASES, 0): 4, (REDEMPTIONS, 0): 4}
        monkeypatch.setattr(replay, "dry_run", lambda *args, **kwargs: {"customers": []})
        monkeypatch.setattr(replay, "known_rulesets", lambda client: {})
        monkeypatch.setattr(replay, "activated_versions", lambda client: [])
        monkeypatch.setattr(replay, "preview_settle_s", 0.3)

        class Monitor:
            def committed(self) -> dict:
                return dict(committed)

            def ends_fetched_after(self, topic, moment) -> dict:
                return {}

        class Request:
            async def json(self) -> dict:
                return {"rules": RULES}

        context = SimpleNamespace(ruleset=load_ruleset(ROOT / "streams/rules/rulesets/default.yaml"))
        projector = SimpleNamespace(partitions=1, archived_to=archived_to, projected_to={})

        async def ask():
            handle = _replay_handler(client, asyncio.Lock(), context, Monitor(), projector, "127.0.0.1:9", 1)
            return await handle(Request())

        report = json.loads(asyncio.run(ask()).text)
    finally:
        client.close()
    assert report["undecided"]["customers"] == 1  # c3 alone
