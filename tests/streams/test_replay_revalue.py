"""An apply's compensation re-values the customer's open orders: a refund or cancellation after the apply reverses
what the new rules awarded, as `loyalty process` under the new rules over the whole log does.

Before, the compensation was one balance entry and the worker's order records kept the old rules' points: an order
earning 320 live and 1,030 under the new rules was compensated +710, and its full refund after the apply reversed
320, leaving the customer 710 points the new rules never give.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from projections.archive import ArchivedMessage
from schemas.decode import decode_event
from schemas.topics import REDEMPTIONS, TOPIC_RANK
from streams import replay as replay_module
from streams.batch import process_lines
from streams.replay import (
    ORDERS,
    PENDING_CHANGES,
    RESTATED,
    REVALUED_ORDERS,
    compensations,
    orders_digest,
    replay_messages,
)
from streams.routing import routes_for
from streams.rules.engine import apply
from streams.rules.ruleset import RuleSet, load_ruleset, parse_ruleset
from streams.rules.state import CustomerState, evolve

RULESETS = Path(__file__).resolve().parents[2] / "streams/rules/rulesets"
OLD, NEW = load_ruleset(RULESETS / "default.yaml"), load_ruleset(RULESETS / "seasonal-promotion.yaml")


def event(event_id: str, event_type: str, at: str, **fields) -> str:
    envelope = {"event_id": event_id, "event_type": event_type, "schema_version": 1, "occurred_at": at}
    return json.dumps({**envelope, "customer_id": "c1", "store_id": "s1", **fields})


HISTORY = [
    event("e1", "customer.registered", "2026-11-01T10:00:00+00:00"),
    event(
        "e2", "purchase.completed", "2026-11-01T11:00:00+00:00", order_id="o1", currency="USD",
        lines=[
            {"sku": "sku-0100", "category": "books", "quantity": 1, "unit_price": "200.00"},
            {"sku": "sku-0200", "category": "electronics", "quantity": 2, "unit_price": "50.00"},
            {"sku": "sku-0300", "category": "gift-cards", "quantity": 1, "unit_price": "25.00"},
        ],
    ),
    event(
        "e3", "purchase.completed", "2026-11-02T11:00:00+00:00", order_id="o2", currency="USD",
        lines=[{"sku": "sku-0200", "category": "electronics", "quantity": 3, "unit_price": "30.00"}],
    ),
    event(
        "e4", "purchase.refunded", "2026-11-03T11:00:00+00:00", order_id="o2", refund_id="r0",
        lines=[{"sku": "sku-0200", "quantity": 1}],
    ),
]  # fmt: skip
AFTER = {
    "full refund": [event("e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o1", refund_id="r1")],
    "partial refunds": [
        event(
            "e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o1", refund_id="r1",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        ),
        event(
            "e6", "purchase.refunded", "2026-12-06T10:00:00+00:00", order_id="o2", refund_id="r2",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        ),
    ],
    "cancellation": [event("e5", "purchase.cancelled", "2026-12-05T10:00:00+00:00", order_id="o1")],
}  # fmt: skip


def archived(lines: list[str]) -> list[ArchivedMessage]:
    messages = []
    for offset, line in enumerate(lines):
        (route,) = routes_for(line.encode(), None)
        document = json.loads(line)
        moment = datetime.fromisoformat(document["occurred_at"]).astimezone(UTC)
        rank = TOPIC_RANK[route.topic]
        event_id = document["event_id"]
        messages.append(ArchivedMessage(route.topic, 0, offset, "c1", line.encode(), 0, rank, event_id, moment))
    return sorted(messages, key=lambda m: (m.occurred_at, m.topic_rank, m.offset))


def live_then_apply(
    after: list[str], *, revalue: bool, new: RuleSet = NEW, old: RuleSet = OLD
) -> tuple[CustomerState, list]:
    """The live worker: the history under the old rules, the apply's compensation, then `after` under the new."""
    state = CustomerState("c1")
    ledger = []
    for line in HISTORY:
        ledger += apply(state, decode_event(line.encode()), old)
    shadow = replay_messages(archived(HISTORY), new, keep_orders=True)
    report = {
        "ruleset_version_new": new.version,
        "customers": [
            {"customer_id": "c1", "balance_before": state.balance, "balance_after": shadow.balances["c1"],
             "delta": shadow.balances["c1"] - state.balance}
        ],
        REVALUED_ORDERS: shadow.orders if revalue else {},
        PENDING_CHANGES: {"c1": shadow.pending.get("c1", 0) - state.pending} if revalue else {},
    }  # fmt: skip
    ((_, compensation),) = compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC))
    ledger += apply(state, decode_event(compensation, REDEMPTIONS), new)
    for line in after:
        ledger += apply(state, decode_event(line.encode()), new)
    return state, ledger


@pytest.mark.parametrize("case", sorted(AFTER))
def test_after_an_apply_reversals_take_back_what_the_new_rules_awarded(case):
    expected = process_lines([line.encode() for line in HISTORY + AFTER[case]], NEW).balances()["c1"]
    state, ledger = live_then_apply(AFTER[case], revalue=True)
    assert state.balance == expected
    # The scenario needs the re-valuation: without it the reversals take back the old rules' points.
    assert live_then_apply(AFTER[case], revalue=False)[0].balance != expected
    # Re-valued by entries: a worker that folds this ledger after a restart holds the same orders.
    folded = CustomerState("c1")
    for entry in ledger:
        evolve(folded, entry, NEW.zone)
    assert folded.orders == state.orders and folded.balance == state.balance
    revalued = [entry for entry in ledger if entry.rule_id == "replay.revalue"]
    assert [entry.order_id for entry in revalued] == ["o1", "o2"]
    assert {entry.points for entry in revalued} == {0}


def _with_setting(ruleset_file: Path, section: str, values: dict) -> RuleSet:
    """The packaged rule set with `values` set in its `section`, under a version of its own."""
    document = yaml.safe_load(ruleset_file.read_text())
    document["version"] += "".join(f"-{name}" for name in values)
    document[section] = {**(document.get(section) or {}), **values}
    return parse_ruleset(yaml.safe_dump(document))


def _with_minimum_order_total(ruleset_file: Path, minimum: str) -> RuleSet:
    return _with_setting(ruleset_file, "purchase", {"minimum_order_total": minimum})


PENDING_AFTER = {
    "refund inside the window": [
        event(
            "e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o1", refund_id="r1",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        ),
        event("e6", "purchase.refunded", "2026-12-06T10:00:00+00:00", order_id="o2", refund_id="r2"),
    ],
    "windows end": [event("e5", "clock.tick", "2027-01-10T10:00:00+00:00")],
    "refund after the windows end": [
        event("e5", "clock.tick", "2027-01-10T10:00:00+00:00"),
        event("e6", "purchase.refunded", "2027-01-11T10:00:00+00:00", order_id="o1", refund_id="r1"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PENDING_AFTER))
@pytest.mark.parametrize("direction", ["new rules hold points pending", "old rules held points pending"])
def test_an_apply_that_changes_the_return_window_moves_points_between_available_and_pending(direction, case):
    """With a return window (`pending_days`) on one side only, the compensation carries the change of available and
    pending points together, and each re-valued order moves its own share into or out of the pending balance, with
    the new rules' lots: refunds inside the window reverse pending points and its end confirms them, as under the
    new rules over the whole log. Before, the order kept its old split: a refund after an apply that added a window
    took the points from the available balance the compensation had already taken them from."""
    windowed = _with_setting(RULESETS / "seasonal-promotion.yaml", "purchase", {"pending_days": 60})
    old, new = (
        (OLD, windowed)
        if direction.startswith("new")
        else (_with_setting(RULESETS / "default.yaml", "purchase", {"pending_days": 60}), NEW)
    )
    after = PENDING_AFTER[case]
    expected = process_lines([line.encode() for line in HISTORY + after], new).states["c1"]
    state, ledger = live_then_apply(after, revalue=True, new=new, old=old)
    assert (state.balance, state.pending) == (expected.balance, expected.pending)
    assert state.pending_lots == expected.pending_lots
    assert live_then_apply(after, revalue=False, new=new, old=old)[0].balance != expected.balance
    moves = [entry for entry in ledger if entry.rule_id == "replay.revalue"]
    assert moves and all(entry.points == -entry.pending_points != 0 for entry in moves)
    folded = CustomerState("c1")  # a restarted worker folds the same orders and lots back
    for entry in ledger:
        evolve(folded, entry, new.zone)
    assert folded.orders == state.orders and folded.pending_lots == state.pending_lots


@pytest.mark.parametrize("refund", ["partial", "full", "cancellation"])
def test_an_order_the_new_rules_award_nothing_gives_nothing_back_after_the_apply(refund):
    """o2 (90.00, refunded in part before the apply) is below the new minimum order total: the new rules never
    awarded it, so its refund after the apply takes nothing back. Before, the live order kept the old rules' points
    and the refund took them back a second time (the compensation had already taken them out of the balance)."""
    new = _with_minimum_order_total(RULESETS / "seasonal-promotion.yaml", "100")
    after = {
        "partial": [
            event(
                "e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o2", refund_id="r2",
                lines=[{"sku": "sku-0200", "quantity": 1}],
            )
        ],
        "full": [event("e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o2", refund_id="r2")],
        "cancellation": [event("e5", "purchase.cancelled", "2026-12-05T10:00:00+00:00", order_id="o2")],
    }[refund]  # fmt: skip
    expected = process_lines([line.encode() for line in HISTORY + after], new).balances()["c1"]
    state, ledger = live_then_apply(after, revalue=True, new=new)
    assert state.balance == expected
    assert live_then_apply(after, revalue=False, new=new)[0].balance != expected
    revalued = [entry for entry in ledger if entry.rule_id == "replay.revalue"]
    assert "o2" in [entry.order_id for entry in revalued]
    assert state.orders["o2"].awards()["lines"] == {"line:0": [0, 0]}
    folded = CustomerState("c1")
    for entry in ledger:
        evolve(folded, entry, new.zone)
    assert folded.orders == state.orders and folded.balance == state.balance


def test_a_compensation_delivered_again_changes_nothing():
    state, ledger = live_then_apply([], revalue=True)
    (adjusted,) = [entry for entry in ledger if entry.rule_id == "adjustment"]
    orders_before = repr(state.orders)
    shadow = replay_messages(archived(HISTORY), NEW, keep_orders=True)
    before = adjusted.balance_after - adjusted.points  # the report the apply made, made again
    report = {
        "ruleset_version_new": NEW.version,
        "customers": [
            {"customer_id": "c1", "balance_before": before, "balance_after": shadow.balances["c1"],
             "delta": shadow.balances["c1"] - before}
        ],
        REVALUED_ORDERS: shadow.orders,
    }  # fmt: skip
    ((_, again),) = compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC))
    assert decode_event(again, REDEMPTIONS).event_id == adjusted.caused_by
    assert apply(state, decode_event(again, REDEMPTIONS), NEW) == []  # the same event: applied once
    assert repr(state.orders) == orders_before


def test_an_order_refunded_between_the_cut_over_and_the_compensation_is_not_re_valued():
    """The values were taken before the markers; a refund decided live since then is not in them (re-valuing would
    set its reversed points back and a later refund would reverse them again)."""
    window = [
        event(
            "w1", "purchase.refunded", "2026-11-30T10:00:00+00:00", order_id="o1", refund_id="rw",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        )
    ]  # fmt: skip
    state = CustomerState("c1")
    ledger = []
    for line in HISTORY:
        ledger += apply(state, decode_event(line.encode()), OLD)
    shadow = replay_messages(archived(HISTORY), NEW, keep_orders=True)
    for line in window:  # after the markers, before the compensation
        ledger += apply(state, decode_event(line.encode()), NEW)
    report = {
        "ruleset_version_new": NEW.version,
        "customers": [{"customer_id": "c1", "balance_before": 0, "balance_after": 1, "delta": 1}],
        REVALUED_ORDERS: shadow.orders,
    }
    ((_, compensation),) = compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC))
    revalued = [e for e in apply(state, decode_event(compensation, REDEMPTIONS), NEW) if e.rule_id == "replay.revalue"]
    assert [entry.order_id for entry in revalued] == ["o2"]  # o1 keeps its live values


def test_a_compensation_stays_under_the_event_size_limit_and_continuations_carry_the_other_orders():
    """The newest orders go with the compensation's points; the older ones in 0-point continuations, each under the
    limit (before, they were left with their live values: a later refund of one took back the old points)."""
    orders = [
        {"order_id": f"o{n:05d}", "refunds": [], "lines": {"line:0": [100 + n, 0]}, "bonuses": {}} for n in range(3000)
    ]
    report = {
        "ruleset_version_new": NEW.version,
        "customers": [{"customer_id": "c1", "balance_before": 0, "balance_after": 5, "delta": 5}],
        REVALUED_ORDERS: {"c1": orders},
    }
    published = compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC))
    assert 3 <= len(published) < 10
    assert all(len(value) <= 48 * 1024 for _, value in published)
    # The worker's limit is 64 KiB: every part is accepted.
    first, *continued = [decode_event(value, REDEMPTIONS) for _, value in published]
    assert first.points == 5 and first.event_id == f"replay:{NEW.version}:c1"
    assert [event.points for event in continued] == [0] * len(continued)
    parts = range(2, 2 + len(continued))
    assert [event.event_id for event in continued] == [f"replay:{NEW.version}#{part}:c1" for part in parts]
    assert len({event.adjustment_id for event in [first, *continued]}) == len(published)
    carried = [[order.order_id for order in event.revalued_orders] for event in [first, *continued]]
    assert [order_id for part in reversed(carried) for order_id in part] == [order["order_id"] for order in orders]
    assert 100 < len(carried[0]) < 3000


def test_the_continuations_re_value_the_older_orders_so_their_refund_takes_back_the_new_points(monkeypatch):
    """A compensation with room for one order: the older order goes in a continuation, and its refund after the
    apply takes back what the new rules awarded."""
    monkeypatch.setattr(replay_module, "compensation_bytes_max", 800)  # the compensation alone is about 650 bytes
    after = AFTER["full refund"]  # refunds o1, the older order
    expected = process_lines([line.encode() for line in HISTORY + after], NEW).states["c1"]
    state = _apply_then(OLD, NEW, after, restate=True)
    assert (state.balance, state.pending) == (expected.balance, expected.pending)


def _report_with_restate(state: CustomerState, shadow) -> dict:
    return {
        "ruleset_version_new": "restated",
        "customers": [
            {"customer_id": "c1", "balance_before": state.balance, "balance_after": shadow.balances["c1"],
             "delta": shadow.balances["c1"] - state.balance}
        ],
        REVALUED_ORDERS: shadow.orders,
        PENDING_CHANGES: {"c1": shadow.pending.get("c1", 0) - state.pending},
        RESTATED: {"c1": shadow.restate["c1"].restated(state.lifetime_earned, state.cap_usage, None, NEW)},
    }  # fmt: skip


def _apply_then(old: RuleSet, new: RuleSet, after: list[str], *, restate: bool, orders: bool = True) -> CustomerState:
    state = CustomerState("c1")
    history_ledger = []
    for line in HISTORY:
        history_ledger += apply(state, decode_event(line.encode()), old)
    shadow = replay_messages(archived(HISTORY), new, keep_orders=True)
    report = _report_with_restate(state, shadow)
    if not restate:
        report[RESTATED] = {}
    if not orders:
        report[REVALUED_ORDERS] = {}
    ledger = []
    for _, compensation in compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC)):
        ledger += apply(state, decode_event(compensation, REDEMPTIONS), new)
    for line in after:
        ledger += apply(state, decode_event(line.encode()), new)
    folded = CustomerState("c1")  # what a restarted worker folds back from the ledger
    for entry in history_ledger + ledger:
        evolve(folded, entry, new.zone)
    assert (folded.lifetime_earned, folded.first_order_done) == (state.lifetime_earned, state.first_order_done)
    assert (folded.balance, folded.pending, folded.orders) == (state.balance, state.pending, state.orders)
    return state


LATER_ORDER = [
    event(
        "e9", "purchase.completed", "2026-12-10T10:00:00+00:00", order_id="o9", currency="USD",
        lines=[{"sku": "sku-0300", "category": "books", "quantity": 1, "unit_price": "100.00"}],
    )
]  # fmt: skip


def test_an_apply_restates_lifetime_points_so_tiers_decide_later_orders_as_under_the_new_rules():
    """The new rules award more, which lifts the customer into a tier by lifetime points; the live lifetime came from
    the old awards, so a later order missed the tier's multiplier."""
    old_lifetime = process_lines([line.encode() for line in HISTORY], OLD).states["c1"].lifetime_earned
    new_lifetime = process_lines([line.encode() for line in HISTORY], NEW).states["c1"].lifetime_earned
    assert new_lifetime > old_lifetime
    document = yaml.safe_load((RULESETS / "seasonal-promotion.yaml").read_text())
    document["version"] += "-tiers"
    minimum = (old_lifetime + new_lifetime) // 2
    document["tiers"] = {
        "basis": "lifetime_points",
        "levels": [{"name": "gold", "minimum": str(minimum), "multiplier": "2"}],
    }
    new = parse_ruleset(yaml.safe_dump(document))
    expected = process_lines([line.encode() for line in HISTORY + LATER_ORDER], new).states["c1"]
    state = _apply_then(OLD, new, LATER_ORDER, restate=True)
    assert (state.balance, state.lifetime_earned) == (expected.balance, expected.lifetime_earned)
    assert _apply_then(OLD, new, LATER_ORDER, restate=False).balance != expected.balance


def test_an_apply_marks_the_first_qualifying_order_the_new_rules_count():
    """Under the old rules no order qualified (a minimum order total of 1,000), under the new ones the first did: a
    later order earned the first-order bonus live, which the new rules had given already."""
    old = _with_minimum_order_total(RULESETS / "default.yaml", "1000")
    expected = process_lines([line.encode() for line in HISTORY + LATER_ORDER], NEW).states["c1"]
    # Without re-valued orders: recording them marks the first order too (the next test).
    state = _apply_then(old, NEW, LATER_ORDER, restate=True, orders=False)
    assert state.first_order_done and state.balance == expected.balance
    assert _apply_then(old, NEW, LATER_ORDER, restate=False, orders=False).balance != expected.balance


def test_an_order_the_old_rules_did_not_award_is_recorded_from_the_compensation():
    """No order reached the old minimum order total, so the worker had no record of o1 and o2: the compensation's
    re-valued orders carry their lines, the worker records them, and a refund after the apply takes back what the
    new rules awarded (before, it took nothing back and the customer kept those points)."""
    old = _with_minimum_order_total(RULESETS / "default.yaml", "1000")
    after = AFTER["partial refunds"]
    expected = process_lines([line.encode() for line in HISTORY + after], NEW).states["c1"]
    state = _apply_then(old, NEW, after, restate=True)
    assert (state.balance, state.pending) == (expected.balance, expected.pending)
    assert sorted(state.orders) == ["o1", "o2"]
    assert {key: line.category for key, line in state.orders["o1"].lines.items()} == {
        "line:0": "books", "line:1": "electronics", "line:2": "gift-cards"
    }  # fmt: skip


def test_a_compensation_expires_and_releases_nothing_itself():
    """The new rules expire lots after 10 days and the history is months old. The compensation is dated at the
    cut-over; expiring the old rules' lots at it, before its own amounts (computed from the balance before it), took
    the points twice: a customer due 50 available and pending points ended in debt (audit: -675 where 50 is due)."""
    new = _with_setting(RULESETS / "seasonal-promotion.yaml", "expiry", {"mode": "lot", "days": 10})
    expected = replay_messages(archived(HISTORY), new, keep_orders=True)
    state = _apply_then(OLD, new, [], restate=True)
    assert (state.balance, state.pending) == (expected.balances["c1"], expected.pending.get("c1", 0))
    assert state.balance >= 0


def test_an_apply_clears_the_first_order_mark_when_the_new_rules_count_no_qualifying_order():
    """No history order reaches the new minimum order total: the next qualifying order earns the first-order bonus,
    as under the new rules over the whole log (the restatement could only set the mark, never clear it)."""
    new = _with_minimum_order_total(RULESETS / "default.yaml", "350")  # o1 is 325.00, o2 90.00
    big = [
        event(
            "e9", "purchase.completed", "2026-12-10T10:00:00+00:00", order_id="o9", currency="USD",
            lines=[{"sku": "sku-0300", "category": "books", "quantity": 1, "unit_price": "400.00"}],
        )
    ]  # fmt: skip
    expected = process_lines([line.encode() for line in HISTORY + big], new)
    assert "purchase.first_order_bonus" in {e.rule_id for e in expected.ledger if e.caused_by == "e9"}
    state = _apply_then(OLD, new, big, restate=True)
    assert state.balance == expected.states["c1"].balance


def test_the_compensation_reviews_no_tier_on_the_lifetime_points_it_replaces():
    """Tiers by lifetime points: the tier was reviewed at the compensation on the live (old) lifetime points, before
    the restatement, and changed back at the next event."""
    document = yaml.safe_load((RULESETS / "default.yaml").read_text())
    document["version"] += "-tiers"
    document["tiers"] = {"basis": "lifetime_points", "levels": [{"name": "gold", "minimum": "10", "multiplier": "2"}]}
    document["purchase"]["minimum_order_total"] = "1000"  # nothing qualifies: the lifetime points drop to 50
    new = parse_ruleset(yaml.safe_dump(document))
    state = CustomerState("c1")
    for line in HISTORY:
        apply(state, decode_event(line.encode()), OLD)
    shadow = replay_messages(archived(HISTORY), new, keep_orders=True)
    ((_, compensation),) = compensations(
        _report_with_restate(state, shadow), cut_over=datetime(2026, 12, 1, tzinfo=UTC)
    )
    ledger = apply(state, decode_event(compensation, REDEMPTIONS), new)
    assert "tier" not in {entry.rule_id for entry in ledger}
    assert "replay.restate" in {entry.rule_id for entry in ledger}


def test_an_order_whose_refund_was_held_before_it_is_re_valued_to_nothing_with_that_refund():
    """A refund dated a minute before its order is held and applied by the purchase; the new rules award the order
    nothing (a minimum order total of 100; it is 90.00). The replay's record of the order it awarded nothing missed
    the held refund, so the live order (which has it) was not re-valued and a later refund took back the old points
    (review: 450 where the new rules give 480)."""
    history = [
        *HISTORY[:2],
        event(
            "e4", "purchase.refunded", "2026-11-02T10:59:00+00:00", order_id="o2", refund_id="r0",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        ),
        event(
            "e3", "purchase.completed", "2026-11-02T11:00:00+00:00", order_id="o2", currency="USD",
            lines=[{"sku": "sku-0200", "category": "electronics", "quantity": 3, "unit_price": "30.00"}],
        ),
    ]  # fmt: skip
    after = [
        event(
            "e5", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o2", refund_id="r2",
            lines=[{"sku": "sku-0200", "quantity": 1}],
        )
    ]  # fmt: skip
    new = _with_minimum_order_total(RULESETS / "seasonal-promotion.yaml", "100")
    state = CustomerState("c1")
    for line in history:
        apply(state, decode_event(line.encode()), OLD)
    assert "refund:r0" in state.orders["o2"].refund_ids
    shadow = replay_messages(archived(history), new, keep_orders=True)
    for _, compensation in compensations(
        _report_with_restate(state, shadow), cut_over=datetime(2026, 12, 1, tzinfo=UTC)
    ):
        apply(state, decode_event(compensation, REDEMPTIONS), new)
    for line in after:
        apply(state, decode_event(line.encode()), new)
    assert state.balance == process_lines([line.encode() for line in history + after], new).balances()["c1"]


def test_a_compensation_that_fits_whole_is_serialised_once_and_equals_the_stepwise_one(monkeypatch):
    """`compensations` writes a customer whose restatement and orders all fit at once (`_whole_if_fitting`); it must
    give exactly what cutting them to fit gives, near the size limit too (a small limit puts many customers on it)."""
    import random

    from streams import replay

    monkeypatch.setattr(replay, "compensation_bytes_max", 2_000)
    rng = random.Random(5)

    def order(number: int) -> dict:
        lines = [{"line": k, "points": rng.randint(0, 900), "sku": "s" * rng.randint(3, 30)} for k in range(3)]
        return {"order_id": f"o{number}" + "x" * rng.randint(0, 40), "lines": lines[: rng.randint(1, 3)]}

    customers, orders, restated = [], {}, {}
    for number in range(400):
        customer, delta = f"customer-{number:04d}", rng.choice([0, 5, -7])
        customers.append({"customer_id": customer, "balance_before": 10, "balance_after": 10 + delta, "delta": delta})
        orders[customer] = [order(k) for k in range(rng.choice([0, 1, 2, 4, 8, 16, 40]))]
        if rng.random() < 0.7:
            lots = [["2026-01-01T00:00:00+00:00", rng.randint(1, 99)] for _ in range(rng.choice([0, 2, 30]))]
            restated[customer] = {"lifetime_earned_change": rng.randint(-5, 5), "lots": lots or None,
                                  "referrer_points": {f"r{k}": 10 for k in range(rng.choice([0, 3, 60]))}}  # fmt: skip
    report = {"ruleset_version_new": "v2", "customers": customers, replay.REVALUED_ORDERS: orders,
              replay.RESTATED: restated, replay.PENDING_CHANGES: {}}  # fmt: skip
    moment = datetime(2026, 11, 28, tzinfo=UTC)
    whole = replay.compensations(report, cut_over=moment)
    monkeypatch.setattr(replay, "_whole_if_fitting", lambda *arguments: None)
    stepwise = replay.compensations(report, cut_over=moment)
    assert whole == stepwise
    fitting = sum(1 for customer in customers if len([c for c, _ in stepwise if c == customer["customer_id"]]) == 1)
    assert 50 < fitting < len(customers)  # both paths taken: customers that fit whole, and ones cut into parts
    # At the edge: limits around each customer's whole size, where one byte decides between the two paths.
    monkeypatch.undo()
    sizes = {customer: len(value) for customer, value in whole if customer in orders and orders[customer]}
    for customer in sorted(sizes)[:40]:
        single = {**report, "customers": [row for row in customers if row["customer_id"] == customer]}
        for limit in range(sizes[customer] - 1, sizes[customer] + 5):
            monkeypatch.setattr(replay, "compensation_bytes_max", limit)
            whole = replay.compensations(single, cut_over=moment)
            monkeypatch.setattr(replay, "_whole_if_fitting", lambda *arguments: None)
            assert whole == replay.compensations(single, cut_over=moment), (customer, limit)
            monkeypatch.undo()


SAME_TOTALS = [
    event("e1", "customer.registered", "2026-11-01T10:00:00+00:00"),
    event(
        "e2", "purchase.completed", "2026-11-01T11:00:00+00:00", order_id="o1", currency="USD",
        lines=[
            {"sku": f"sku-0{number}00", "category": "grocery", "quantity": 1, "unit_price": price}
            for number, price in zip(range(4, 9), ["8.95", "5.99", "6.95", "7.95", "9.95"], strict=True)
        ],
    ),
    event("e3", "review.approved", "2026-11-02T11:00:00+00:00", review_id="rv1", sku="sku-0400", rating=5),
]  # fmt: skip


def test_an_order_re_valued_by_rounding_alone_is_refunded_at_its_new_value_when_the_totals_do_not_change():
    """Under default (floor) o1's lines earn 8, 5, 6, 7, 9; under seasonal-promotion (nearest) 9, 6, 7, 8, 10, five
    more, and the review five less (25 -> 20): balance, pending and lifetime earned points are the same under both
    rule sets (210), so the apply's selection (`replay._unchanged`, and `compensations` for a delta of 0) posts no
    compensation and o1 is not re-valued. A refund of line 0 after the apply then reverses the old 8, not the new 9:
    the live balance ends 1 above `loyalty process` under the new rules (202 against 201). Found by
    tests/tools/apply_differential.py --events 2000 --customers 150: c000090 in default <-> seasonal-promotion,
    3 points (a refund of three lines, -84/-5/-8 live against -85/-6/-9)."""
    refund = event(
        "e4", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o1", refund_id="r1",
        lines=[{"sku": "sku-0400", "quantity": 1}],
    )  # fmt: skip
    state = CustomerState("c1")
    for line in SAME_TOTALS:
        apply(state, decode_event(line.encode()), OLD)
    # The live figures as the apply reads them (`replay._live_balances`: balance, pending, lifetime earned, and the
    # digest of the open orders' awards, which `replay._live_orders` folds from the ledger as the worker does).
    live = {"c1": (state.balance, state.pending, state.lifetime_earned, (ORDERS, orders_digest(state)))}
    assert live["c1"][:3] == (210, 0, 210)
    shadow = replay_messages(archived(SAME_TOTALS), NEW, keep_orders=live)
    assert shadow.balances == {"c1": 210}
    report = {
        "ruleset_version_new": NEW.version,
        "customers": [{"customer_id": "c1", "balance_before": 210, "balance_after": 210, "delta": 0}],
        REVALUED_ORDERS: shadow.orders,
        PENDING_CHANGES: {"c1": shadow.pending.get("c1", 0) - state.pending},
        RESTATED: {
            customer: restatement.restated(state.lifetime_earned, state.cap_usage, None, NEW)
            for customer, restatement in shadow.restate.items()
        },
    }
    for _, compensation in compensations(report, cut_over=datetime(2026, 12, 1, tzinfo=UTC)):
        apply(state, decode_event(compensation, REDEMPTIONS), NEW)
    reversed_live = [entry.points for entry in apply(state, decode_event(refund.encode()), NEW)]
    expected = process_lines([line.encode() for line in [*SAME_TOTALS, refund]], NEW)
    assert reversed_live == [entry.points for entry in expected.ledger if entry.rule_id == "purchase.reversal"]
    assert state.balance == expected.balances()["c1"] == 201


def test_an_apply_reads_the_live_order_awards_and_re_values_an_order_when_the_totals_do_not_change(tmp_path):
    """The same history through ClickHouse (`replay.dry_run` at markers, the live awards read by
    `replay._live_orders`): the apply compensates c1 with 0 points and o1 re-valued, a refund after it reverses the
    new rules' 9, and a second apply of the same rule set, which reads the re-valued awards back from the ledger,
    posts nothing."""
    from projections import LedgerSink, connect, migrate
    from projections.archive import RawArchive
    from schemas.topics import INPUT_TOPICS
    from streams.replay import dry_run

    refund = event(
        "e4", "purchase.refunded", "2026-12-05T10:00:00+00:00", order_id="o1", refund_id="r1",
        lines=[{"sku": "sku-0400", "quantity": 1}],
    )  # fmt: skip
    live = process_lines([line.encode() for line in SAME_TOTALS], OLD)
    state, ledger = live.states["c1"], list(live.ledger)

    def report(directory, extra=()):
        client = connect(f"chdb://{directory}")
        try:
            migrate(client)
            RawArchive(client).write(archived(SAME_TOTALS) + list(extra), {})
            LedgerSink(client).write(ledger)
            markers = {(topic, 0): len(SAME_TOTALS) + len(extra) + 1 for topic in INPUT_TOPICS}
            return dry_run(client, NEW, current_point_value=OLD.redemption.point_value, markers=markers)
        finally:
            client.close()

    cut_over = datetime(2026, 12, 1, tzinfo=UTC)
    first = compensations(report(tmp_path / "first"), cut_over=cut_over)
    assert [customer for customer, _ in first] == ["c1"]
    assert [json.loads(value)["points"] for _, value in first] == [0]
    for _, value in first:
        ledger += apply(state, decode_event(value, REDEMPTIONS), NEW)
    extra = [
        ArchivedMessage(REDEMPTIONS, 0, len(SAME_TOTALS) + number, "c1", value, 0, TOPIC_RANK[REDEMPTIONS],
                        json.loads(value)["event_id"], cut_over)
        for number, (_, value) in enumerate(first)
    ]  # fmt: skip
    assert compensations(report(tmp_path / "second", extra), cut_over=datetime(2026, 12, 2, tzinfo=UTC)) == []
    reversed_live = [entry.points for entry in apply(state, decode_event(refund.encode()), NEW)]
    assert reversed_live == [-9]
    assert state.balance == process_lines([line.encode() for line in [*SAME_TOTALS, refund]], NEW).balances()["c1"]
