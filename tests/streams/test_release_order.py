"""The reorder buffer's release rule when some partitions look caught up (their high water marks may be stale)."""

from __future__ import annotations

import json

from streams.applier import InputMessage, StreamApplier
from streams.routing import routes_for
from streams.rules.ruleset import load_ruleset

SETTLE_MS = 300


def message(document: dict, offset: int, received_ms: float) -> InputMessage:
    raw = json.dumps(document).encode()
    (route,) = routes_for(raw)
    return InputMessage(route.topic, 0, offset, route.key, raw, route.headers, received_ms=received_ms)


def event(event_id: str, event_type: str, minute: int, customer: str = "c1", **fields) -> dict:
    envelope = {"event_id": event_id, "event_type": event_type, "schema_version": 1, "customer_id": customer}
    return envelope | {"occurred_at": f"2026-03-01T10:{minute:02d}:00+00:00", "store_id": "s1"} | fields


def test_a_partition_that_only_looks_caught_up_cannot_release_a_later_event_before_the_settle():
    applier = StreamApplier(load_ruleset(None), reorder_wait_ms=60_000, caught_up_settle_ms=SETTLE_MS)
    # The engagement partition has shown an event at 10:00 and looks caught up; on the redemptions partition a
    # redemption at 10:20 is followed by one at 10:40 (so the lagging partitions' watermark is 10:40).
    early = message(event("s0", "social.shared", 0, customer="c9", share_id="sh0", network="x"), 0, 0.0)
    redeem = message(event("r1", "points.redeem_requested", 20, redemption_id="rd1", points=100), 0, 0.0)
    later = message(event("r2", "points.redeem_requested", 40, customer="c2", redemption_id="rd2", points=100), 1, 0.0)
    applier.accept([early, redeem, later])
    assigned = [(early.topic, 0), (redeem.topic, 0)]
    caught_up = {(early.topic, 0)}
    # Below the lagging partitions' watermark, but the engagement partition may still deliver something
    # earlier than 10:20: nothing is released before the settle (the rule before it released the redemption).
    output = applier.release(assigned, caught_up, now_ms=100.0)
    assert output.ledger == []
    # The "caught up" engagement partition was stale: c1's share at 10:10 arrives inside the settle.
    share = message(event("s1", "social.shared", 10, share_id="sh1", network="x"), 1, 150.0)
    applier.accept([share])
    output = applier.release(assigned, caught_up, now_ms=150.0 + SETTLE_MS + 10.0)
    applied = [(entry.customer_id, entry.caused_by) for _, entry, _ in output.ledger]
    # c1's events in event-time order: the share at 10:10 before the redemption at 10:20.
    assert applied == [("c9", "s0"), ("c1", "s1"), ("c1", "r1")]  # r2 waits: no partition has shown later


def test_events_below_every_partitions_watermark_need_no_settle():
    applier = StreamApplier(load_ruleset(None), reorder_wait_ms=60_000, caught_up_settle_ms=SETTLE_MS)
    share = message(event("s1", "social.shared", 10, share_id="sh1", network="x"), 0, 0.0)
    share_late = message(event("s2", "social.shared", 30, customer="c2", share_id="sh2", network="x"), 1, 0.0)
    redeem = message(event("r1", "points.redeem_requested", 20, customer="c3", redemption_id="rd1", points=1), 0, 0.0)
    applier.accept([share, share_late, redeem])
    assigned = [(share.topic, 0), (redeem.topic, 0)]
    output = applier.release(assigned, {(share.topic, 0)}, now_ms=1.0)
    # The all-partition watermark is min(10:30, 10:20) = 10:20: the 10:10 share is released at once.
    assert [entry.caused_by for _, entry, _ in output.ledger] == ["s1"]
