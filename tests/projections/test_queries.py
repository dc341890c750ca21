"""The read queries return exact figures for a hand-built ledger (see the `scenario` fixture)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from projections import LedgerSink
from projections.queries import (
    Balance,
    LiabilityDay,
    PeriodStatus,
    PointSource,
    TopEarner,
    balance,
    balances,
    history,
    liability,
    point_sources,
    points_status,
    top_earners,
)

INJECTION = "x' OR 1=1 --"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.fixture
def loaded(client, scenario):
    LedgerSink(client).write(scenario, {("loyalty.ledger", 0): len(scenario)})
    return client


def test_balance_reports_available_pending_lifetime_and_last_activity(loaded):
    assert balance(loaded, "alice") == Balance(
        customer_id="alice",
        available=115,
        pending=0,
        lifetime_earned=190,
        lifetime_redeemed=60,
        debt=0,
        last_activity=utc("2024-02-03T10:00:00+00:00"),
        entries=7,
    )


def test_balance_of_a_customer_in_debt_reports_the_debt(loaded):
    bob = balance(loaded, "bob")
    assert (bob.available, bob.lifetime_earned, bob.lifetime_redeemed, bob.debt, bob.entries) == (
        -130,
        230,
        150,
        130,
        6,
    )


def test_balance_shows_pending_points_before_confirmation(client, ledger):
    ledger.add("dora", "earned", "2024-01-01T00:00:00+00:00", 10)
    ledger.add("dora", "pending", "2024-01-02T00:00:00+00:00", pending_points=25)
    LedgerSink(client).write(ledger.entries)
    dora = balance(client, "dora")
    assert (dora.available, dora.pending, dora.lifetime_earned) == (10, 25, 10)


def test_unknown_customer_has_no_balance(loaded):
    assert balance(loaded, "nobody") is None


def test_customer_id_is_a_bound_parameter_not_sql(loaded):
    assert balance(loaded, INJECTION) is None
    assert history(loaded, INJECTION) == []
    assert balances(loaded, [INJECTION, "alice"]) == {"alice": 115}


def test_balances_of_all_and_of_some_customers(loaded):
    assert balances(loaded) == {"alice": 115, "bob": -130, "carol": 310}
    assert balances(loaded, ["carol", "nobody"]) == {"carol": 310}
    assert balances(loaded, []) == {}


def test_history_returns_the_entries_in_sequence_order(loaded, scenario):
    assert history(loaded, "alice") == [entry for entry in scenario if entry.customer_id == "alice"]
    page = history(loaded, "alice", limit=3, offset=2)
    assert [entry.sequence for entry in page] == [3, 4, 5]
    assert [entry.balance_after for entry in page] == [150, 190, 130]


def test_history_round_trips_every_field(client, ledger):
    entry = ledger.add(
        "erin",
        "pending",
        "2024-03-01T12:00:00-05:00",
        pending_points=12,
        order_id="order-1",
        sku="SKU-9",
        category="hats",
        quantity=2,
        amount="12.50",
        reference="line-1",
        available_at=utc("2024-03-15T17:00:00+00:00"),
        explanation="10 points per 10.00 spent, pending for 14 days",
    )
    LedgerSink(client).write([entry])
    assert history(client, "erin") == [entry]


def test_history_returns_occurred_at_in_utc(loaded):
    last = history(loaded, "carol")[-1]
    assert last.occurred_at == utc("2024-01-31T23:00:00+00:00")
    assert last.occurred_at.utcoffset().total_seconds() == 0


def test_points_status_by_month_includes_history_before_the_range_in_outstanding(loaded):
    status = points_status(loaded, date(2024, 1, 1), date(2024, 1, 31), "month")
    january = PeriodStatus(
        period_start=date(2024, 1, 1),
        period_end=date(2024, 1, 31),
        issued=700,
        redeemed=210,
        expired=0,
        reversed=200,
        adjusted=-10,
        pending_issued=40,
        outstanding=310,
    )
    assert status.periods == (january,)
    assert status.totals == january


def test_points_status_by_week_uses_monday_weeks(loaded):
    status = points_status(loaded, date(2024, 1, 1), date(2024, 1, 14), "week")
    assert [
        (p.period_start, p.period_end, p.issued, p.redeemed, p.reversed, p.outstanding) for p in status.periods
    ] == [
        (date(2024, 1, 1), date(2024, 1, 7), 650, 150, 0, 530),
        (date(2024, 1, 8), date(2024, 1, 14), 40, 0, 200, 370),
    ]
    assert status.totals.issued == 690
    assert status.totals.pending_issued == 40


def test_points_status_clips_the_first_week_to_the_range(loaded):
    status = points_status(loaded, date(2024, 1, 3), date(2024, 1, 9), "week")
    assert [(p.period_start, p.period_end, p.issued, p.pending_issued, p.outstanding) for p in status.periods] == [
        (date(2024, 1, 3), date(2024, 1, 7), 500, 40, 530),
        (date(2024, 1, 8), date(2024, 1, 9), 0, 0, 330),
    ]


def test_points_status_by_day_lists_quiet_days_with_the_carried_outstanding(loaded):
    status = points_status(loaded, date(2024, 1, 30), date(2024, 2, 2), "day")
    assert [(p.period_start, p.issued, p.expired, p.outstanding) for p in status.periods] == [
        (date(2024, 1, 30), 0, 0, 300),
        (date(2024, 1, 31), 10, 0, 310),
        (date(2024, 2, 1), 0, 20, 290),
        (date(2024, 2, 2), 0, 0, 290),
    ]


def test_points_status_of_one_store(loaded):
    totals = points_status(loaded, date(2024, 1, 1), date(2024, 1, 31), "month", store_id="store-2").totals
    assert (totals.issued, totals.redeemed, totals.reversed, totals.adjusted, totals.outstanding) == (
        200,
        150,
        200,
        -10,
        -130,
    )
    assert points_status(loaded, date(2024, 1, 1), date(2024, 1, 31), store_id=INJECTION).totals.issued == 0


def test_point_sources_by_source_counts_earned_confirmed_and_positive_adjustments(loaded):
    assert point_sources(loaded, date(2024, 1, 1), date(2024, 2, 29), "source") == [
        PointSource(key="purchase", points=340, entries=3),
        PointSource(key="referral", points=300, entries=1),
        PointSource(key="review", points=50, entries=1),
        PointSource(key="social_share", points=10, entries=1),
        PointSource(key="adjustment", points=5, entries=1),
    ]


def test_point_sources_by_category_rule_and_product(loaded):
    january = (date(2024, 1, 1), date(2024, 1, 31))
    assert point_sources(loaded, *january, "category") == [
        PointSource(key=None, points=360, entries=3),
        PointSource(key="bags", points=200, entries=1),
        PointSource(key="shoes", points=140, entries=2),
    ]
    assert point_sources(loaded, *january, "product") == [
        PointSource(key=None, points=310, entries=2),
        PointSource(key="SKU-2", points=200, entries=1),
        PointSource(key="SKU-1", points=190, entries=3),
    ]
    assert point_sources(loaded, *january, "rule")[0] == PointSource(key="purchase-base", points=300, entries=2)


def test_top_earners_rank_by_points_earned_with_current_balance(loaded):
    assert top_earners(loaded, date(2024, 1, 1), date(2024, 1, 31), limit=2) == [
        TopEarner(customer_id="carol", points_earned=310, balance=310),
        TopEarner(customer_id="bob", points_earned=200, balance=-130),
    ]


def test_liability_values_outstanding_points_per_day(loaded):
    assert liability(loaded, date(2024, 1, 30), date(2024, 2, 1), Decimal("0.01")) == [
        LiabilityDay(day=date(2024, 1, 30), outstanding_points=300, outstanding_value=Decimal("3.00")),
        LiabilityDay(day=date(2024, 1, 31), outstanding_points=310, outstanding_value=Decimal("3.10")),
        LiabilityDay(day=date(2024, 2, 1), outstanding_points=290, outstanding_value=Decimal("2.90")),
    ]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: points_status(c, date(2024, 2, 1), date(2024, 1, 1)), ValueError),
        (lambda c: points_status(c, date(2024, 1, 1), date(2024, 1, 2), "year"), ValueError),
        (lambda c: point_sources(c, date(2024, 1, 1), date(2024, 1, 2), "customer_id"), ValueError),
        (lambda c: top_earners(c, date(2024, 1, 1), date(2024, 1, 2), limit=0), ValueError),
        (lambda c: history(c, "alice", limit=100_000), ValueError),
        (lambda c: liability(c, date(2024, 1, 1), date(2024, 1, 2), 0.01), TypeError),
    ],
)
def test_misuse_raises_before_any_query(call, error):
    class NoClient:
        def __getattr__(self, name):
            raise AssertionError("no query may run")

    with pytest.raises(error):
        call(NoClient())
