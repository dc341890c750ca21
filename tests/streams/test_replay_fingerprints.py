"""Replay computes fingerprints only for repeated event ids and decides retries and conflicts as the drivers do."""

from __future__ import annotations

import json

from documents import event_document

from streams import replay
from streams.batch import process_lines
from streams.bench import Log, replay_input
from streams.replay import replay_messages
from streams.routing import routes_for
from streams.rules.ruleset import load_ruleset

_event = event_document


def _archive(lines: list[bytes]):
    messages = [(route.topic, route.key, route.headers, n) for n, raw in enumerate(lines) for route in routes_for(raw)]
    return replay_input(Log(lines, messages))


def test_retries_and_conflicting_reuses_are_decided_as_by_the_batch_driver(monkeypatch):
    line = [{"sku": "a", "category": "books", "quantity": 2, "unit_price": "30.00"}]
    purchase = _event(
        "p1", "purchase.completed", "c1", "2026-03-01T10:00:00+00:00", order_id="o1", currency="USD", lines=line
    )
    retry = dict(reversed(list(purchase.items())))  # the same content, other bytes: a retry, not a conflict
    conflict = {**purchase, "occurred_at": "2026-03-01T11:00:00+00:00", "lines": [{**line[0], "quantity": 3}]}
    documents = [
        _event("r1", "customer.registered", "c1", "2026-03-01T09:00:00+00:00"),
        purchase,
        retry,
        conflict,
        _event("t1", "clock.tick", "c1", "2026-03-02T09:00:00+00:00"),
        _event("t1", "clock.tick", "c1", "2026-03-02T09:00:00+00:00"),  # no entries: nothing applied under its id
        _event("x1", "points.redeem_requested", "c1", "2026-03-03T09:00:00+00:00", redemption_id="x1", points=60),
        _event("r2", "customer.registered", "c2", "2026-03-01T09:00:00+00:00"),
        _event("r2", "customer.registered", "c2", "2026-03-01T09:00:00+00:00", customer_segment="vip"),
    ]
    lines = [json.dumps(document).encode() for document in documents]
    rules = load_ruleset()
    expected = process_lines(lines, rules)

    computed = []
    real = replay.event_fingerprint
    monkeypatch.setattr(replay, "event_fingerprint", lambda event: computed.append(event.event_id) or real(event))
    result = replay_messages(_archive(lines), rules)

    assert result.balances == expected.balances()
    assert result.entries == len(expected.ledger)
    assert result.rejected == len(expected.rejected) == 2  # the conflicting purchase and registration
    assert expected.duplicates == 1
    # Only the ids that came again: p1 (the first copy, its retry, the conflict) and r2 (both copies).
    assert sorted(computed) == ["p1", "p1", "p1", "r2", "r2"]
