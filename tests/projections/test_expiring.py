"""`queries.expiring_soon`: the points the engine would expire by a horizon, read from the ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from documents import event_document

from projections import LedgerSink, queries
from schemas.ledger import Kind
from streams.batch import process_lines
from streams.rules.ruleset import parse_ruleset
from streams.simulate import generate_events

BASE = "version: expiring-1\npurchase: {points_per_unit: '1'}\nredemption: {minimum_points: 1}\n"


def line(event_type: str, event_id: str, at: str, customer: str, **fields) -> str:
    return json.dumps(event_document(event_id, event_type, customer, at, **fields))


def buy(event_id: str, at: str, customer: str, price: str) -> str:
    lines = [{"sku": "a", "category": "books", "quantity": 1, "unit_price": price}]
    return line("purchase.completed", event_id, at, customer, order_id=f"o-{event_id}", currency="EUR", lines=lines)


def redeem(event_id: str, at: str, customer: str, points: int) -> str:
    return line("points.redeem_requested", event_id, at, customer, redemption_id=event_id, points=points)


LOG = [
    # a: two awards and a redemption that uses the oldest points first.
    buy("a1", "2026-01-01T00:00:00+00:00", "a", "100.00"),
    buy("a2", "2026-01-05T00:00:00+00:00", "a", "30.00"),
    redeem("a3", "2026-01-06T00:00:00+00:00", "a", 20),
    # d: a refund after a redemption leaves a debt of 100, which later earnings repay first.
    buy("d1", "2026-01-01T00:00:00+00:00", "d", "100.00"),
    redeem("d2", "2026-01-02T00:00:00+00:00", "d", 100),
    line("purchase.refunded", "d3", "2026-01-03T00:00:00+00:00", "d", order_id="o-d1", refund_id="r1"),
    buy("d4", "2026-01-04T00:00:00+00:00", "d", "300.00"),
    buy("d5", "2026-01-06T00:00:00+00:00", "d", "50.00"),
    # z: spent everything, nothing left to expire.
    buy("z1", "2026-01-01T00:00:00+00:00", "z", "40.00"),
    redeem("z2", "2026-01-02T00:00:00+00:00", "z", 40),
]
AS_OF = datetime(2026, 1, 7, tzinfo=UTC)


def listed(client, mode: str, days: int, within_days: int, as_of: datetime = AS_OF) -> dict[str, tuple[int, int, str]]:
    found = queries.expiring_soon(client, as_of=as_of, within_days=within_days, mode=mode, days=days, limit=1000)
    return {item.customer_id: (item.points, item.balance, item.expires_at.isoformat()) for item in found}


def test_lot_mode_lists_what_is_left_of_each_old_lot_capped_by_the_balance(client):
    ledger = process_lines(LOG, parse_ruleset(BASE + "expiry: {mode: lot, days: 10}\n")).ledger
    LedgerSink(client).write(ledger)
    assert listed(client, "lot", 10, 3) == {}  # horizon 10 January: no lot is 10 days old yet
    assert listed(client, "lot", 10, 4) == {
        # the first lot (100) minus the 20 redeemed from it
        "a": (80, 110, "2026-01-11T00:00:00+00:00"),
    }
    assert listed(client, "lot", 10, 7) == {
        "a": (80, 110, "2026-01-11T00:00:00+00:00"),
        # the debt of 100 was repaid from the 300 of 4 January, but the engine's lots do not remember the
        # debt (a decrease beyond the lots left is dropped) and cap the expiry by the balance: 250, not 200
        "d": (250, 250, "2026-01-14T00:00:00+00:00"),
    }
    assert listed(client, "lot", 10, 9) == {
        "a": (110, 110, "2026-01-11T00:00:00+00:00"),
        "d": (250, 250, "2026-01-14T00:00:00+00:00"),
    }


def test_inactivity_mode_lists_the_whole_balance_after_days_without_earning_or_redeeming(client):
    ledger = process_lines(LOG, parse_ruleset(BASE + "expiry: {mode: inactivity, days: 30}\n")).ledger
    LedgerSink(client).write(ledger)
    assert listed(client, "inactivity", 30, 28) == {}
    assert listed(client, "inactivity", 30, 29) == {
        "a": (110, 110, "2026-02-05T00:00:00+00:00"),
        "d": (250, 250, "2026-02-05T00:00:00+00:00"),
    }
    # Entries after as_of are not read: at 3 January, d had a debt and a had only its first award.
    assert listed(client, "inactivity", 30, 29, as_of=datetime(2026, 1, 3, 12, tzinfo=UTC)) == {
        "a": (100, 100, "2026-01-31T00:00:00+00:00"),
    }


def test_inactivity_mode_counts_a_pending_purchase_and_its_confirmation_as_activity(client):
    # The engine's rule (streams.rules.state.activity_moment): a purchase with pending points is activity until its
    # return window ends, a confirmation at the end of its window. Registration 1 March, purchase 15 March (window
    # ends 29 March), a tick on 30 March confirms it: the balance expires on 18 April (29 March + 20 days), not on
    # 21 March (the registration + 20 days, when pending purchases and confirmations did not count).
    rules = parse_ruleset(
        "version: expiring-pending\npurchase: {points_per_unit: '1', pending_days: 14}\nfixed: {registration: 10}\n"
        "expiry: {mode: inactivity, days: 20}\n"
    )
    log = [
        line("customer.registered", "r1", "2026-03-01T10:00:00+00:00", "p"),
        buy("p1", "2026-03-15T10:00:00+00:00", "p", "100.00"),
        line("clock.tick", "t1", "2026-03-30T10:00:00+00:00", "p"),
    ]
    LedgerSink(client).write(process_lines(log, rules).ledger)
    before = datetime(2026, 3, 20, tzinfo=UTC)  # the purchase is pending: only the registration's 10 are listed
    assert listed(client, "inactivity", 20, 30, as_of=before) == {"p": (10, 10, "2026-04-18T10:00:00+00:00")}
    assert listed(client, "inactivity", 20, 28, as_of=before) == {}
    after = datetime(2026, 3, 31, tzinfo=UTC)
    assert listed(client, "inactivity", 20, 19, as_of=after) == {"p": (110, 110, "2026-04-18T10:00:00+00:00")}
    assert listed(client, "inactivity", 20, 18, as_of=after) == {}
    ticks = [
        line("clock.tick", "t2", "2026-04-18T09:59:59+00:00", "p"),
        line("clock.tick", "t3", "2026-04-18T10:00:00+00:00", "p"),
    ]
    expired = [(e.caused_by, e.points) for e in process_lines(log + ticks, rules).ledger if e.kind is Kind.expired]
    assert expired == [("t3", -110)]


def test_one_customer_can_be_asked_for(client):
    LedgerSink(client).write(process_lines(LOG, parse_ruleset(BASE + "expiry: {mode: lot, days: 10}\n")).ledger)
    found = queries.expiring_soon(client, as_of=AS_OF, within_days=9, mode="lot", days=10, customer_id="d")
    assert [(item.customer_id, item.points) for item in found] == [("d", 250)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "fifo"}, "mode"),
        ({"within_days": -1}, "within_days"),
        ({"days": 0}, "days"),
        ({"limit": 0}, "limit"),
        ({"as_of": datetime(2026, 1, 1)}, "as_of"),
    ],
)
def test_misuse_is_refused_before_any_query(arguments, message):
    chosen = {"as_of": AS_OF, "within_days": 1, "mode": "lot", "days": 10, **arguments}
    with pytest.raises(ValueError, match=message):
        queries.expiring_soon(None, **chosen)


@pytest.mark.parametrize(("mode", "days", "within_days"), [("lot", 20, 10), ("inactivity", 15, 5), ("lot", 5, 0)])
def test_the_list_equals_what_the_engine_expires_at_a_tick_on_the_horizon(client, mode, days, within_days):
    rules = parse_ruleset(
        f"version: expiring-sim\nredemption: {{minimum_points: 50}}\nexpiry: {{mode: {mode}, days: {days}}}\n"
    )
    start = datetime(2026, 1, 1, tzinfo=UTC)
    log = list(generate_events(events=2_000, customers=120, seed=5, start=start, mean_gap_seconds=1800))
    result = process_lines(log, rules)
    LedgerSink(client).write(result.ledger)
    # Just after the last event: a tick at the very instant of an event is applied before it (engagement ranks
    # first), so the comparison would also depend on tie-breaking, not only on the query.
    as_of = max(entry.occurred_at for entry in result.ledger) + timedelta(microseconds=1)
    horizon = as_of + timedelta(days=within_days)

    found = queries.expiring_soon(client, as_of=as_of, within_days=within_days, mode=mode, days=days, limit=1000)

    ticks = [
        line("clock.tick", f"tick-{customer}", horizon.isoformat(), customer) for customer in sorted(result.states)
    ]
    expired: dict[str, int] = {}
    for entry in process_lines(log + ticks, rules).ledger:
        if entry.caused_by.startswith("tick-") and entry.kind is Kind.expired:
            expired[entry.customer_id] = expired.get(entry.customer_id, 0) - entry.points
    assert expired, "the scenario must expire something"
    assert {item.customer_id: item.points for item in found} == expired
