"""Point lifecycle in the pure core: expiry by inactivity and by lot, tiers, debts."""

from __future__ import annotations

import json

from test_engine import event, purchase, run

from schemas.ledger import Kind
from streams.batch import process_lines
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.rules.state import CustomerState, evolve, rolling_spend

BASE = "version: life-1\npurchase: {points_per_unit: '1'}\n"


def test_inactivity_expires_the_whole_balance_after_n_days_without_earning_or_redeeming():
    ruleset = parse_ruleset(BASE + "expiry: {mode: inactivity, days: 30}\n")
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 1, "100.00")], at="2026-01-01T00:00:00+00:00"),
        event("clock.tick", "t1", at="2026-01-30T23:59:59+00:00"),
        event("clock.tick", "t2", at="2026-01-31T00:00:00+00:00"),
        event("clock.tick", "t3", at="2026-03-31T00:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.balance_after) for e in ledger] == [
        ("p", Kind.earned, 100, 100),
        ("t2", Kind.expired, -100, 0),
    ]
    assert state.balance == 0


def test_redeeming_counts_as_activity_for_inactivity_expiry():
    ruleset = parse_ruleset(BASE + "expiry: {mode: inactivity, days: 30}\nredemption: {minimum_points: 1}\n")
    _, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 1, "100.00")], at="2026-01-01T00:00:00+00:00"),
        event("points.redeem_requested", "r", at="2026-01-20T00:00:00+00:00", redemption_id="r", points=10),
        event("clock.tick", "t1", at="2026-02-10T00:00:00+00:00"),
        event("clock.tick", "t2", at="2026-02-19T00:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points) for e in ledger] == [
        ("p", Kind.earned, 100),
        ("r", Kind.redeemed, -10),
        ("t2", Kind.expired, -90),
    ]


def test_lot_expiry_takes_each_award_after_n_days_and_spending_uses_the_oldest_first():
    ruleset = parse_ruleset(BASE + "expiry: {mode: lot, days: 10}\nredemption: {minimum_points: 1}\n")
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "50.00")], at="2026-01-01T00:00:00+00:00"),
        purchase("p2", [("a", "books", 1, "30.00")], at="2026-01-05T00:00:00+00:00"),
        event("points.redeem_requested", "r", at="2026-01-06T00:00:00+00:00", redemption_id="r", points=20),
        event("clock.tick", "t1", at="2026-01-11T00:00:00+00:00"),
        event("clock.tick", "t2", at="2026-01-15T00:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.balance_after) for e in ledger] == [
        ("p1", Kind.earned, 50, 50),
        ("p2", Kind.earned, 30, 80),
        ("r", Kind.redeemed, -20, 60),
        ("t1", Kind.expired, -30, 30),  # the first lot, minus the 20 spent from it
        ("t2", Kind.expired, -30, 0),
    ]
    assert state.lots == []


def test_expiry_never_takes_pending_points():
    ruleset = parse_ruleset(BASE.replace("'1'}", "'1', pending_days: 30}") + "expiry: {mode: lot, days: 10}\n")
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 1, "50.00")], at="2026-01-01T00:00:00+00:00"),
        event("clock.tick", "t1", at="2026-01-20T00:00:00+00:00"),
    )
    assert [(e.kind, e.points, e.pending_points) for e in ledger] == [(Kind.pending, 0, 50)]
    assert (state.balance, state.pending) == (0, 50)


def test_tier_by_lifetime_points_multiplies_purchase_points_and_is_recorded():
    ruleset = parse_ruleset(
        BASE + "tiers:\n  basis: lifetime_points\n  levels:\n"
        "    - {name: silver, minimum: '100', multiplier: '1.5'}\n    - {name: gold, minimum: '500', multiplier: '2'}\n"
    )
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "120.00")], at="2026-01-01T00:00:00+00:00"),
        purchase("p2", [("a", "books", 1, "100.00")], at="2026-01-02T00:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.reference) for e in ledger] == [
        ("p1", Kind.earned, 120, "line:0"),
        ("p1", Kind.tier_changed, 0, "silver"),
        ("p2", Kind.earned, 150, "line:0"),  # silver: x 1.5
    ]
    assert state.tier == "silver"


def test_tier_by_rolling_spend_drops_when_the_window_passes():
    ruleset = parse_ruleset(
        BASE + "tiers:\n  basis: rolling_spend\n  window_days: 30\n  levels:\n"
        "    - {name: vip, minimum: '200', multiplier: '2'}\n"
    )
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "250.00")], at="2026-01-01T00:00:00+00:00"),
        purchase("p2", [("a", "books", 1, "10.00")], at="2026-01-10T00:00:00+00:00"),
        purchase("p3", [("a", "books", 1, "10.00")], at="2026-02-15T00:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.reference) for e in ledger] == [
        ("p1", Kind.earned, 250, "line:0"),
        ("p1", Kind.tier_changed, 0, "vip"),
        ("p2", Kind.earned, 20, "line:0"),
        # p1's spend left the window on 31 January: p3 is not multiplied (the state still said vip, and p3 earned
        # 20), and the review after it records the lapse
        ("p3", Kind.earned, 10, "line:0"),
        ("p3", Kind.tier_changed, 0, ""),
    ]
    assert state.tier is None


def test_a_refund_after_spending_leaves_a_debt_that_later_earnings_repay():
    ruleset = parse_ruleset(BASE + "redemption: {minimum_points: 1}\n")
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "100.00")], order_id="o1", at="2026-01-01T00:00:00+00:00"),
        event("points.redeem_requested", "r", at="2026-01-02T00:00:00+00:00", redemption_id="r", points=80),
        event("purchase.refunded", "f", at="2026-01-03T00:00:00+00:00", order_id="o1", refund_id="f1"),
        purchase("p2", [("a", "books", 1, "50.00")], at="2026-01-04T00:00:00+00:00"),
    )
    assert [e.balance_after for e in ledger] == [100, 20, -80, -30]
    assert state.balance == -30


def test_confirmed_points_count_once_toward_a_tier():
    ruleset = parse_ruleset(
        BASE.replace("'1'}", "'1', pending_days: 7}")
        + "tiers:\n  levels:\n    - {name: silver, minimum: '300', multiplier: '1'}\n"
    )
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "200.00")], at="2026-01-01T00:00:00+00:00"),
        purchase("p2", [("a", "books", 1, "5.00")], at="2026-01-09T00:00:00+00:00"),
        purchase("p3", [("a", "books", 1, "5.00")], at="2026-01-20T00:00:00+00:00"),
    )
    # p2 releases p1's 200 points: lifetime 205 < 300, no tier change (counting them twice made 405)
    assert [entry for entry in ledger if entry.kind is Kind.tier_changed] == []
    assert state.lifetime_earned == 205 and state.tier is None


ONE_UNIT = {"order_id": "o-p", "lines": [{"sku": "a", "quantity": 1}]}


def _two_units_pending_one_refunded_then(last):
    """Two units of a line pending 14 days, one refunded inside the window, a tick after it, then `last`."""
    return run(
        parse_ruleset(BASE.replace("'1'}", "'1', pending_days: 14}")),
        purchase("p", [("a", "books", 2, "30.00")], at="2026-01-01T00:00:00+00:00"),
        event("purchase.refunded", "r1", at="2026-01-03T00:00:00+00:00", refund_id="r1", **ONE_UNIT),
        event("clock.tick", "t1", at="2026-01-20T00:00:00+00:00"),
        last,
    )


def test_a_partial_refund_of_pending_points_leaves_the_rest_of_the_line_to_be_confirmed():
    """Before, the reversal dropped the line's whole pending lot: the 30 points of the unit kept were never confirmed
    and stayed pending for ever."""
    state, ledger = _two_units_pending_one_refunded_then(
        event("purchase.refunded", "r2", at="2026-01-25T00:00:00+00:00", refund_id="r2", **ONE_UNIT)
    )
    assert [(e.caused_by, e.kind, e.points, e.pending_points, e.balance_after, e.pending_after) for e in ledger] == [
        ("p", Kind.pending, 0, 60, 0, 60),
        ("r1", Kind.reversed, 0, -30, 0, 30),
        ("t1", Kind.confirmed, 30, -30, 30, 0),
        ("r2", Kind.reversed, -30, 0, 0, 0),  # the confirmed rest, taken back from the available balance
    ]
    assert (state.balance, state.pending, state.pending_lots) == (0, 0, [])


def test_a_lines_reversals_and_confirmation_carry_its_category():
    """Points by category (the dashboard's `--by category`, analysts' query 5) count every entry of a line under its
    category; confirmations and reversals had none, so under a return window every confirmed point fell under
    "(none)"."""
    _, ledger = _two_units_pending_one_refunded_then(
        event("purchase.cancelled", "x", at="2026-01-25T00:00:00+00:00", order_id="o-p")
    )
    assert [(e.kind, e.sku, e.category) for e in ledger] == [
        (Kind.pending, "a", "books"),
        (Kind.reversed, "a", "books"),
        (Kind.confirmed, "a", "books"),
        (Kind.reversed, "a", "books"),
    ]


def refolded(ruleset, ledger, customer: str = "c1") -> CustomerState:
    """The state a restarted worker rebuilds: the ledger folded with `evolve` into a fresh state."""
    state = CustomerState(customer)
    for entry in ledger:
        evolve(state, entry, ruleset.zone)
    return state


PENDING_INACTIVITY = (
    "version: life-8\npurchase: {points_per_unit: '1', pending_days: 14}\nfixed: {registration: 10}\n"
    "expiry: {mode: inactivity, days: 20}\n"
)


def test_a_purchase_with_pending_points_and_its_confirmation_are_activity_for_inactivity_expiry():
    # Registration 1 March, purchase 15 March (window ends 29 March). The tick of 30 March confirms the points: it
    # expired them at once with the registration's, "no earning or redeeming since 2026-03-01".
    ruleset = parse_ruleset(PENDING_INACTIVITY)
    state, ledger = run(
        ruleset,
        event("customer.registered", "r", at="2026-03-01T10:00:00+00:00"),
        purchase("p", [("a", "books", 1, "100.00")], at="2026-03-15T10:00:00+00:00"),
        event("clock.tick", "t1", at="2026-03-30T10:00:00+00:00"),
        event("clock.tick", "t2", at="2026-04-18T09:59:59+00:00"),
        event("clock.tick", "t3", at="2026-04-18T10:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.balance_after) for e in ledger] == [
        ("r", Kind.earned, 10, 10),
        ("p", Kind.pending, 0, 10),
        ("t1", Kind.confirmed, 100, 110),
        ("t3", Kind.expired, -110, 0),  # 20 days after the points became available on 29 March
    ]
    assert ledger[-1].explanation == "no activity since 2026-03-29T10:00:00+00:00 (20 days)"
    assert ledger[2].available_at.isoformat() == "2026-03-29T10:00:00+00:00"
    assert state.last_activity_at.isoformat() == "2026-03-29T10:00:00+00:00"
    rebuilt = refolded(ruleset, ledger)
    assert (rebuilt.last_activity_at, rebuilt.balance, rebuilt.pending) == (state.last_activity_at, 0, 0)


def test_a_late_confirmation_counts_from_the_end_of_its_window_not_from_the_event_that_releases_it():
    # Nothing between the purchase and a tick in May: the points were available from 29 March, and the customer was
    # inactive for 20 days after that. Daily ticks would have confirmed them on 29 March and expired them on 18 April;
    # a late tick must not make them live longer because it happens to be the event that confirms them.
    ruleset = parse_ruleset(PENDING_INACTIVITY)
    state, ledger = run(
        ruleset,
        event("customer.registered", "r", at="2026-03-01T10:00:00+00:00"),
        purchase("p", [("a", "books", 1, "100.00")], at="2026-03-15T10:00:00+00:00"),
        event("clock.tick", "t1", at="2026-05-01T10:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.balance_after) for e in ledger] == [
        ("r", Kind.earned, 10, 10),
        ("p", Kind.pending, 0, 10),
        ("t1", Kind.confirmed, 100, 110),
        ("t1", Kind.expired, -110, 0),
    ]
    assert ledger[-1].explanation == "no activity since 2026-03-29T10:00:00+00:00 (20 days)"
    assert refolded(ruleset, ledger).last_activity_at == state.last_activity_at


def test_a_purchase_keeps_earlier_points_from_expiring_while_its_points_are_pending():
    # The purchase of 15 March is activity: a tick on 25 March (24 days after the registration) expires nothing.
    ruleset = parse_ruleset(PENDING_INACTIVITY)
    _, ledger = run(
        ruleset,
        event("customer.registered", "r", at="2026-03-01T10:00:00+00:00"),
        purchase("p", [("a", "books", 1, "100.00")], at="2026-03-15T10:00:00+00:00"),
        event("clock.tick", "t1", at="2026-03-25T10:00:00+00:00"),
    )
    assert [e.kind for e in ledger] == [Kind.earned, Kind.pending]


ROLLING = (
    "version: life-9\npurchase: {points_per_unit: '1'}\ntiers:\n  basis: rolling_spend\n  window_days: 30\n"
    "  levels:\n    - {name: silver, minimum: '100', multiplier: '2'}\n"
)


def test_rolling_spend_tier_is_measured_at_the_purchase_not_taken_from_the_last_review():
    ruleset = parse_ruleset(ROLLING)
    state, ledger = run(
        ruleset,
        purchase("p1", [("a", "books", 1, "100.00")], at="2026-01-01T10:00:00+00:00"),
        purchase("p2", [("a", "books", 1, "10.00")], at="2026-01-02T10:00:00+00:00"),
        purchase("p3", [("a", "books", 1, "10.00")], at="2026-03-01T10:00:00+00:00"),
    )
    assert [(e.caused_by, e.kind, e.points, e.reference) for e in ledger] == [
        ("p1", Kind.earned, 100, "line:0"),
        ("p1", Kind.tier_changed, 0, "silver"),
        ("p2", Kind.earned, 20, "line:0"),  # 100 spent in the 30 days before it: silver
        ("p3", Kind.earned, 10, "line:0"),  # the window of p1 ended on 31 January: no multiplier (it was x2 = 20)
        ("p3", Kind.tier_changed, 0, ""),
    ]
    assert "x tier" not in ledger[3].explanation
    rebuilt = refolded(ruleset, ledger)
    assert (rebuilt.tier, rebuilt.spend_log) == (state.tier, state.spend_log)


def test_a_refund_takes_back_spend_from_the_window_the_order_counted_in():
    ruleset = parse_ruleset(ROLLING)
    refund = {"order_id": "o4", "refund_id": "rf1"}
    state, ledger = run(
        ruleset,
        purchase("p4", [("a", "books", 1, "150.00")], order_id="o4", at="2026-03-05T10:00:00+00:00"),
        # 46 days later: the order left the window on 4 April, its refund must not take spend from this window
        event("purchase.refunded", "f", at="2026-04-20T10:00:00+00:00", **refund),
        purchase("p5", [("a", "books", 1, "120.00")], at="2026-04-21T10:00:00+00:00"),
    )
    tiers = [(e.caused_by, e.reference, e.explanation) for e in ledger if e.kind is Kind.tier_changed]
    assert tiers == [
        ("p4", "silver", "no tier -> silver: spend in the last 30 days 150"),
        ("f", "", "silver -> no tier: spend in the last 30 days 0"),  # was -150
        ("p5", "silver", "no tier -> silver: spend in the last 30 days 120"),  # was no change: 120 - 150 < 100
    ]
    moment = ledger[-1].occurred_at
    assert rolling_spend(state, moment, 30) == 120
    rebuilt = refolded(ruleset, ledger)
    assert (rebuilt.tier, rebuilt.spend_log) == (state.tier, state.spend_log)
    assert rolling_spend(rebuilt, moment, 30) == 120


def test_a_refund_inside_the_window_lowers_the_spend_and_the_tier_at_once():
    ruleset = parse_ruleset(ROLLING)
    state, ledger = run(
        ruleset,
        purchase(
            "p1", [("a", "books", 1, "60.00"), ("b", "toys", 1, "60.00")], order_id="o1", at="2026-03-01T10:00:00+00:00"
        ),
        event(
            "purchase.refunded",
            "f",
            at="2026-03-10T10:00:00+00:00",
            order_id="o1",
            refund_id="rf1",
            lines=[{"sku": "b", "quantity": 1}],
        ),
        purchase("p2", [("a", "books", 1, "10.00")], at="2026-03-11T10:00:00+00:00"),
    )
    tiers = [(e.caused_by, e.reference, e.explanation) for e in ledger if e.kind is Kind.tier_changed]
    assert tiers == [
        ("p1", "silver", "no tier -> silver: spend in the last 30 days 120"),
        ("f", "", "silver -> no tier: spend in the last 30 days 60"),
    ]
    assert ledger[-1].points == 10  # no multiplier: 70 spent in the window
    assert refolded(ruleset, ledger).spend_log == state.spend_log


def test_refunds_of_unknown_orders_held_per_customer_are_bounded():
    """Refunds of orders that earned nothing stay held; without a bound per customer their state grew without end
    (review: 5,000 refunds, 380 KB for one customer)."""
    from streams.rules.engine import held_orders_max

    ruleset = load_ruleset()
    lines = [
        json.dumps(
            {"event_id": f"r{n}", "event_type": "purchase.refunded", "schema_version": 1, "store_id": "s1",
             "occurred_at": "2026-03-01T10:00:00+00:00", "customer_id": "c1", "order_id": f"o{n}", "refund_id": f"f{n}"}
        )
        for n in range(held_orders_max + 5)
    ]  # fmt: skip
    result = process_lines(lines, ruleset)
    assert len(result.states["c1"].held) == held_orders_max
    assert "the customer's limit is reached" in result.ledger[-1].explanation
    assert result.ledger[-1].reference is None
