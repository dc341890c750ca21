"""The reorder buffer's release rule when some partitions look caught up (their high water marks may be stale)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from documents import event_document

from streams.applier import InputMessage, SkewEstimate, StreamApplier, skew_window_ms
from streams.routing import routes_for
from streams.rules.ruleset import load_ruleset

SETTLE_MS = 300


def message(document: dict, offset: int, received_ms: float) -> InputMessage:
    raw = json.dumps(document).encode()
    (route,) = routes_for(raw)
    return InputMessage(route.topic, 0, offset, route.key, raw, route.headers, received_ms=received_ms)


def event(event_id: str, event_type: str, minute: int, customer: str = "c1", **fields) -> dict:
    return event_document(event_id, event_type, customer, f"2026-03-01T10:{minute:02d}:00+00:00", **fields)


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


def caused(output) -> list[str]:
    """The events a release applied, in order (an event may write several entries)."""
    return list(dict.fromkeys(entry.caused_by for _, entry, _ in output.ledger))


def purchase(event_id: str, minute: int, customer: str = "c1") -> dict:
    line = {"sku": "sku-1", "quantity": 1, "unit_price": "10.00", "category": "books"}
    order = {"order_id": f"o-{event_id}", "currency": "EUR", "lines": [line]}
    return event(event_id, "purchase.completed", minute, customer=customer, **order)


def share(event_id: str, minute: int, customer: str = "c1") -> dict:
    return event(event_id, "social.shared", minute, customer=customer, share_id=f"sh-{event_id}", network="x")


def test_a_partition_found_caught_up_by_a_fetch_older_than_the_events_own_is_not_left_out():
    # The worker's high water marks are as old as its last fetch of each partition: a partition Faust has
    # paused is not fetched at all. Before, a partition whose offsets matched such a stale mark was left out of
    # the watermark once an event had waited the settle, however old that mark was.
    applier = StreamApplier(load_ruleset(None), reorder_wait_ms=60_000, caught_up_settle_ms=SETTLE_MS)
    first = message(share("s0", 0), 0, 0.0)
    applier.accept([first])
    bought = message(purchase("p1", 5), 0, 1_000.0)
    bought.fetched_ms = 900.0  # the fetch that brought the purchase
    applier.accept([bought])
    assigned = [(first.topic, 0), (bought.topic, 0)]
    # Both partitions look caught up, but the engagement partition was last fetched before the purchase's fetch.
    caught_up = {(first.topic, 0): 500.0, (bought.topic, 0): 900.0}
    output = applier.release(assigned, caught_up, now_ms=1_000.0 + SETTLE_MS + 500)
    assert caused(output) == ["s0"]  # s0 itself came before that fetch: its watermark leaves both out
    # The stale partition had a share at 10:03 on its way: it arrives, and comes first.
    late_share = message(share("s1", 3), 1, 1_900.0)
    late_share.fetched_ms = 1_850.0
    applier.accept([late_share])
    caught_up = {(first.topic, 0): 1_850.0, (bought.topic, 0): 1_850.0}
    assert caused(applier.release(assigned, caught_up, now_ms=1_900.0 + SETTLE_MS - 1)) == []  # s1's settle
    assert caused(applier.release(assigned, caught_up, now_ms=1_900.0 + SETTLE_MS)) == ["s1", "p1"]
    assert applier.late_events == 0  # nothing was released ahead of it


def test_the_settle_grows_with_the_skew_seen_between_topics_and_then_keeps_order():
    reorder_wait_ms = 5_000
    applier = StreamApplier(load_ruleset(None), reorder_wait_ms=reorder_wait_ms, caught_up_settle_ms=SETTLE_MS)
    applier.accept([message(share("s0", 0), 0, 0.0)])
    applier.accept([message(purchase("p0", 1), 0, 0.0)])
    tps = [("loyalty.engagement", 0), ("loyalty.purchases", 0)]
    both_fresh = dict.fromkeys(tps, 400.0)
    assert caused(applier.release(tps, both_fresh, now_ms=400.0)) == ["s0", "p0"]
    # A loaded producer: c1's purchase at 10:20 is visible, the share at 10:10 lands 800 ms later, after the
    # settle: it is released out of order (the floor alone cannot know), and counted as late.
    applier.accept([message(purchase("p1", 20), 1, 1_000.0)])
    output = applier.release(tps, dict.fromkeys(tps, 1_000.0 + SETTLE_MS), now_ms=1_000.0 + SETTLE_MS)
    assert caused(output) == ["p1"]
    applier.accept([message(share("s1", 10), 1, 1_800.0)])
    assert caused(applier.release(tps, dict.fromkeys(tps, 2_100.0), now_ms=2_100.0)) == ["s1"]
    assert applier.late_events == 1  # c1's share at 10:10 after its purchase at 10:20
    assert applier.late_examples == [
        "social.shared s1 of c1 at 2026-03-01T10:10:00+00:00 (offset 1 of loyalty.engagement/0) after an event at "
        "2026-03-01T10:20:00+00:00"
    ]
    assert applier.settle_ms(2_100.0) == 2 * 800.0  # twice the skew seen
    # The same skew again, for c2: now the purchase waits for a fetch 1,600 ms after it arrived, and the share
    # that lands 800 ms after it comes first.
    applier.accept([message(purchase("p2", 40, customer="c2"), 2, 3_500.0)])
    output = applier.release(tps, dict.fromkeys(tps, 3_500.0 + SETTLE_MS), now_ms=3_500.0 + SETTLE_MS)
    assert output.ledger == []
    applier.accept([message(share("s2", 30, customer="c2"), 2, 4_300.0)])
    output = applier.release(tps, dict.fromkeys(tps, 5_900.0), now_ms=5_900.0)
    assert caused(output) == ["s2", "p2"]
    assert applier.late_events == 1
    # The skew is forgotten after the window: the settle is back at its floor, and never above the reorder wait.
    assert applier.settle_ms(4_300.0 + skew_window_ms + 1) == SETTLE_MS
    applier.skew.late(datetime(2026, 3, 1, 10, 30, tzinfo=UTC), 7_000.0, fetched_caught_up_ms=4_800.0)
    assert applier.settle_ms(7_000.0) == reorder_wait_ms  # a skew of 3,500 ms (after p2 came): 7,000 capped
    applier.accept([message(share("s1", 10), 1, 7_000.0)])  # a re-delivery: a duplicate, not late
    assert applier.release(tps, dict.fromkeys(tps, 20_000.0), now_ms=20_000.0).duplicates == 1
    assert applier.late_events == 1


def test_skew_counts_only_events_on_partitions_a_fetch_found_caught_up_after_the_later_event_came():
    estimate = SkewEstimate(limit_ms=5_000)
    t = [datetime(2026, 3, 1, 10, minute, tzinfo=UTC) for minute in range(6)]
    estimate.arrived(t[2], 0.0)  # the latest event time grows
    estimate.arrived(t[4], 100.0)
    estimate.arrived(t[3], 700.0)  # not an advance
    # A lagging partition catching up on old events is not a skew: it never let anything be released.
    assert estimate.late(t[1], 4_000.0, fetched_caught_up_ms=None) == 0.0
    # Nor is one whose last fetch came before the later event: it never counted as caught up for that event.
    assert estimate.late(t[3], 4_000.0, fetched_caught_up_ms=50.0) == 0.0
    # Nor late data beyond the limit (the reorder wait): no settle would wait for it.
    assert estimate.late(t[3], 5_200.0, fetched_caught_up_ms=400.0) == 0.0
    assert estimate.current(5_200.0) == 0.0
    # Measured against the first arrival of an event later than it: 10:03 -> the 10:04 event at 100 ms.
    assert estimate.late(t[3], 700.0, fetched_caught_up_ms=400.0) == 600.0
    assert estimate.late(t[1], 900.0, fetched_caught_up_ms=400.0) == 900.0  # 10:01 -> the 10:02 event at 0 ms
    assert estimate.current(900.0) == 900.0
    assert estimate.current(900.0 + skew_window_ms + 1) == 0.0
    # Arrivals older than keep_ms are dropped: the earliest kept later event is the bound then.
    estimate.arrived(t[5], 20_000.0)
    assert estimate.late(t[0], 20_500.0, fetched_caught_up_ms=20_000.0) == 500.0
