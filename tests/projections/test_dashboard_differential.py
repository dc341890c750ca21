"""Every dashboard figure read from ClickHouse equals the figure computed in Python from the batch ledger.

A simulated log goes through the offline batch driver (`process_lines`); its ledger is written through the
LedgerSink several times, in different batch splits (a retried, re-batched delivery); then each query's
answer is compared with the same figure computed here, independently, from the ledger entries and the
definitions in docs/analysts.md. None of the expected values comes from the query code.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, timedelta
from decimal import Decimal

import pytest

from projections import LedgerSink, queries
from schemas.ledger import LedgerEntry
from streams.batch import process_lines
from streams.rules.ruleset import ExpiryRules, RuleSet, load_ruleset
from streams.simulate import generate_events

EARNING_KINDS = ("earned", "confirmed")
SOURCE_KINDS = ("earned", "confirmed", "adjusted")
POINT_VALUE = Decimal("0.01")


def default_rules() -> RuleSet:
    return load_ruleset()


def pending_and_expiring_rules() -> RuleSet:
    """The default rule set with purchase points pending for 7 days and lots expiring after 30 days, so
    that pending, confirmed and expired entries take part too."""
    default = load_ruleset()
    return default.model_copy(
        update={
            "version": "test-pending-expiry",
            "purchase": default.purchase.model_copy(update={"pending_days": 7}),
            "expiry": ExpiryRules(mode="lot", days=30),
        }
    )


def day_of(entry: LedgerEntry) -> date:
    return entry.occurred_at.astimezone(UTC).date()


def period_start(day: date, granularity: str) -> date:
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def expected_points_status(ledger, date_from, date_to, granularity, store_id=None):
    """(period_start, period_end, issued, redeemed, expired, reversed, adjusted, pending_issued, outstanding)
    per period, and the totals, straight from the entries."""
    entries = [entry for entry in ledger if store_id is None or entry.store_id == store_id]
    periods: dict[date, list] = {}
    day = date_from
    while day <= date_to:
        start = max(period_start(day, granularity), date_from)
        periods.setdefault(start, [start, day])[1] = day
        day += timedelta(days=1)
    rows = []
    for start, end in periods.values():
        inside = [entry for entry in entries if start <= day_of(entry) <= end]
        rows.append(
            (
                start,
                end,
                sum(entry.points for entry in inside if entry.kind in EARNING_KINDS),
                -sum(entry.points for entry in inside if entry.kind == "redeemed"),
                -sum(entry.points for entry in inside if entry.kind == "expired"),
                -sum(entry.points for entry in inside if entry.kind == "reversed"),
                sum(entry.points for entry in inside if entry.kind == "adjusted"),
                sum(entry.pending_points for entry in inside if entry.kind == "pending"),
                sum(entry.points for entry in entries if day_of(entry) <= end),
            )
        )
    totals = (date_from, date_to, *(sum(row[index] for row in rows) for index in range(2, 8)), rows[-1][8])
    return rows, totals


def as_tuple(period: queries.PeriodStatus) -> tuple:
    return (
        period.period_start,
        period.period_end,
        period.issued,
        period.redeemed,
        period.expired,
        period.reversed,
        period.adjusted,
        period.pending_issued,
        period.outstanding,
    )


def expected_point_sources(ledger, date_from, date_to, by):
    key_of = {
        "source": lambda entry: entry.source.value,
        "rule": lambda entry: entry.rule_id,
        "product": lambda entry: entry.sku,
        "category": lambda entry: entry.category,
    }[by]
    totals: dict[str | None, list[int]] = defaultdict(lambda: [0, 0])
    for entry in ledger:
        if entry.kind in SOURCE_KINDS and entry.points > 0 and date_from <= day_of(entry) <= date_to:
            figures = totals[key_of(entry) or None]
            figures[0] += entry.points
            figures[1] += 1
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0] or ""))
    return [(key, points, entries) for key, (points, entries) in ranked]


def current_balances(ledger) -> dict[str, int]:
    last: dict[str, LedgerEntry] = {}
    for entry in ledger:
        if entry.customer_id not in last or entry.sequence > last[entry.customer_id].sequence:
            last[entry.customer_id] = entry
    return {customer_id: entry.balance_after for customer_id, entry in last.items()}


def expected_top_earners(ledger, date_from, date_to, limit):
    earned: dict[str, int] = defaultdict(int)
    for entry in ledger:
        if entry.kind in EARNING_KINDS and date_from <= day_of(entry) <= date_to:
            earned[entry.customer_id] += entry.points
    balances = current_balances(ledger)
    ranked = sorted(earned.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [(customer_id, points, balances[customer_id]) for customer_id, points in ranked]


def snapshot(client, ranges):
    """Every dashboard answer for `ranges`, as plain tuples (compared before and after the retries)."""
    figures = {}
    for date_from, date_to in ranges:
        for granularity in ("day", "week", "month"):
            status = queries.points_status(client, date_from, date_to, granularity)
            figures[("status", date_from, date_to, granularity)] = (
                [as_tuple(period) for period in status.periods],
                as_tuple(status.totals),
            )
        status = queries.points_status(client, date_from, date_to, "week", store_id="s2")
        figures[("status s2", date_from, date_to)] = ([as_tuple(p) for p in status.periods], as_tuple(status.totals))
        for by in ("source", "rule", "product", "category"):
            figures[("sources", date_from, date_to, by)] = [
                (source.key, source.points, source.entries)
                for source in queries.point_sources(client, date_from, date_to, by)
            ]
        for limit in (10, 1000):
            figures[("top", date_from, date_to, limit)] = [
                (earner.customer_id, earner.points_earned, earner.balance)
                for earner in queries.top_earners(client, date_from, date_to, limit)
            ]
        figures[("liability", date_from, date_to)] = [
            (day.day, day.outstanding_points, day.outstanding_value)
            for day in queries.liability(client, date_from, date_to, POINT_VALUE)
        ]
    return figures


def expected_snapshot(ledger, ranges):
    figures = {}
    for date_from, date_to in ranges:
        for granularity in ("day", "week", "month"):
            figures[("status", date_from, date_to, granularity)] = expected_points_status(
                ledger, date_from, date_to, granularity
            )
        rows, totals = expected_points_status(ledger, date_from, date_to, "week", store_id="s2")
        figures[("status s2", date_from, date_to)] = (rows, totals)
        for by in ("source", "rule", "product", "category"):
            figures[("sources", date_from, date_to, by)] = expected_point_sources(ledger, date_from, date_to, by)
        for limit in (10, 1000):
            figures[("top", date_from, date_to, limit)] = expected_top_earners(ledger, date_from, date_to, limit)
        daily, _ = expected_points_status(ledger, date_from, date_to, "day")
        figures[("liability", date_from, date_to)] = [(row[0], row[8], row[8] * POINT_VALUE) for row in daily]
    return figures


@pytest.mark.parametrize("rules", [default_rules, pending_and_expiring_rules], ids=["default", "pending-expiry"])
def test_dashboard_equals_the_batch_ledger_after_retried_rebatched_writes(client, rules):
    lines = generate_events(
        events=3000, customers=200, seed=20240, duplicate_share=0.02, stores=2, mean_gap_seconds=2600.0
    )
    result = process_lines(lines, rules())
    ledger = result.ledger
    assert len(ledger) > 3000
    assert len({entry.entry_id for entry in ledger}) == len(ledger)
    first_day = min(day_of(entry) for entry in ledger)
    last_day = max(day_of(entry) for entry in ledger)
    assert (last_day - first_day).days >= 60, "the log must span several months"
    ranges = [
        (first_day, last_day),
        (first_day - timedelta(days=40), first_day - timedelta(days=1)),  # before any entry
        (first_day + timedelta(days=9), first_day + timedelta(days=47)),  # starts mid-week and mid-month
        (last_day - timedelta(days=20), last_day + timedelta(days=15)),  # runs past the last entry
        (first_day + timedelta(days=30), first_day + timedelta(days=30)),  # one day
    ]
    expected = expected_snapshot(ledger, ranges)

    LedgerSink(client, batch_rows_max=997).write(ledger, {("loyalty.ledger", 0): len(ledger)})
    after_first_write = snapshot(client, ranges)
    assert after_first_write == expected

    # A retried delivery with other batch boundaries: reversed chunks of 250, then every third entry.
    retry = LedgerSink(client, batch_rows_max=64)
    for end in range(len(ledger), 0, -250):
        retry.write(ledger[max(0, end - 250) : end])
    retry.write(ledger[::3])
    assert snapshot(client, ranges) == after_first_write

    balances = current_balances(ledger)
    assert queries.balances(client) == balances
    assert balances == {
        customer_id: state.balance for customer_id, state in result.states.items() if customer_id in balances
    }
    for customer_id in sorted(balances)[::8]:
        own = sorted((entry for entry in ledger if entry.customer_id == customer_id), key=lambda entry: entry.sequence)
        found = queries.balance(client, customer_id)
        assert (
            found.available,
            found.pending,
            found.lifetime_earned,
            found.lifetime_redeemed,
            found.debt,
            found.last_activity,
            found.entries,
        ) == (
            own[-1].balance_after,
            own[-1].pending_after,
            sum(entry.points for entry in own if entry.kind in EARNING_KINDS and entry.points > 0),
            -sum(entry.points for entry in own if entry.kind == "redeemed"),
            max(0, -own[-1].balance_after),
            max(entry.occurred_at for entry in own),
            len(own),
        )
    busiest = sorted(balances, key=lambda customer_id: -sum(entry.customer_id == customer_id for entry in ledger))[:3]
    for customer_id in [*busiest, sorted(balances)[0]]:
        own = sorted((entry for entry in ledger if entry.customer_id == customer_id), key=lambda entry: entry.sequence)
        assert queries.history(client, customer_id, limit=10_000) == own
