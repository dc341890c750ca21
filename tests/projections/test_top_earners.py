"""Top earners: whatever plan answers (pruned by yearly bounds, in-year array sums, or the plain GROUP BY over
`daily_customer_points`), the answer is exactly the plain GROUP BY's, ties ordered by customer id."""

from __future__ import annotations

import contextlib
import random
from datetime import date, timedelta

import pytest

from projections import queries
from projections.queries import TOP_EARNERS_SQL, TopEarner, top_earners
from projections.rebuild import rebuild
from projections.sink import LedgerSink
from tests.projections.conftest import LedgerBuilder

RANGES = [
    (date(2024, 1, 1), date(2024, 12, 31)),  # a calendar year: pruning certifies
    (date(2024, 1, 1), date(2024, 12, 30)),
    (date(2024, 2, 1), date(2024, 11, 30)),  # most of a year: pruning tried
    (date(2024, 1, 1), date(2024, 7, 1)),  # half a year: pruning tried, may fall back
    (date(2024, 5, 3), date(2024, 6, 2)),  # 31 days: plain plan
    (date(2024, 3, 10), date(2024, 3, 10)),  # one day
    (date(2024, 12, 31), date(2024, 12, 31)),
    (date(2023, 11, 1), date(2024, 2, 29)),  # across a year end, short: plain plan
    (date(2023, 7, 1), date(2024, 6, 30)),  # a rolling twelve months: per-year slices added up
    (date(2023, 1, 1), date(2024, 12, 31)),  # two whole years: the rows of 2023
    (date(2023, 12, 20), date(2024, 1, 9)),  # three weeks across a year end
    (date(2022, 3, 1), date(2024, 12, 31)),  # longer than a row's two years: the rows of 2022 and 2024 added up
    (date(2025, 1, 1), date(2025, 12, 31)),  # nobody earned
]


def plain(client, date_from: date, date_to: date, limit: int) -> list[tuple[str, int]]:
    rows = client.query(TOP_EARNERS_SQL, parameters={"date_from": date_from, "date_to": date_to, "limit": limit})
    return [(customer_id, points) for customer_id, points in rows.result_rows]


def earners(client, date_from: date, date_to: date, limit: int) -> list[tuple[str, int]]:
    return [(earner.customer_id, earner.points_earned) for earner in top_earners(client, date_from, date_to, limit)]


def skewed_ledger(seed: int = 11) -> LedgerBuilder:
    """120 customers over 2023-2024: Zipf-like earners, many exact ties, redemptions and reversals between."""
    randomness = random.Random(seed)
    ledger = LedgerBuilder()
    moments = []
    for number in range(120):
        customer_id = f"c{number:03d}"
        weight = 1 + 40 // (1 + number)  # a few heavy earners, a long tail
        for _ in range(randomness.randint(1, 3 * weight)):
            day = date(2023, 6, 1) + timedelta(days=randomness.randrange(580))
            kind = randomness.choice(["earned", "earned", "earned", "confirmed", "redeemed", "reversed", "pending"])
            moments.append((day, customer_id, kind, randomness.choice([10, 20, 50]) * weight))
    moments.sort()
    for day, customer_id, kind, points in moments:
        signed = -points if kind in ("redeemed", "reversed") else 0 if kind == "pending" else points
        ledger.add(customer_id, kind, f"{day.isoformat()}T12:00:00+00:00", signed)
    return ledger


@pytest.fixture
def skewed(client):
    LedgerSink(client).write(skewed_ledger().entries)
    return client


@pytest.fixture(params=[queries.TOP_EARNERS_GROUP_BY_DAYS_MAX, 0], ids=["as-configured", "scan-for-short-ranges-too"])
def group_by_days_max(request, monkeypatch):
    """The plans as configured, and with the scan (not the GROUP BY) for short ranges too."""
    monkeypatch.setattr(queries, "TOP_EARNERS_GROUP_BY_DAYS_MAX", request.param)
    return request.param


@pytest.mark.parametrize("limit", [1, 3, 10, 200])
def test_top_earners_equal_the_plain_group_by_for_every_range_and_limit(skewed, limit, group_by_days_max):
    for date_from, date_to in RANGES:
        assert earners(skewed, date_from, date_to, limit) == plain(skewed, date_from, date_to, limit), (
            date_from,
            date_to,
        )


def test_top_earners_equal_the_plain_group_by_for_random_ranges(skewed, group_by_days_max):
    randomness = random.Random(5)
    for _ in range(60):
        date_from = date(2023, 5, 1) + timedelta(days=randomness.randrange(700))
        date_to = date_from + timedelta(days=randomness.choice([0, 6, 30, 90, 200, 300, 364]))
        limit = randomness.choice([1, 2, 5, 10])
        assert earners(skewed, date_from, date_to, limit) == plain(skewed, date_from, date_to, limit), (
            date_from,
            date_to,
            limit,
        )


def test_a_stale_version_that_summed_more_does_not_show(skewed):
    """A row version older than the newest (fewer entries) whose days sum to more: the scan, without FINAL, ranks
    it first, and certification must answer from the newest row."""
    range_ = (date(2024, 3, 1), date(2024, 4, 30))  # long enough for the scan (TOP_EARNERS_GROUP_BY_DAYS_MAX)
    assert (range_[1] - range_[0]).days + 1 > queries.TOP_EARNERS_GROUP_BY_DAYS_MAX
    expected = plain(skewed, *range_, 3)
    loser = expected[0][0]
    skewed.command("SYSTEM STOP MERGES two_year_customer_points")  # a merge would drop the old version
    skewed.command(
        "INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points, "
        "day_entries) VALUES (2024, {customer_id:String}, 10000000, 0, ['2024-03-15'], [10000000], [0])",
        parameters={"customer_id": loser},
    )
    scan = {**_range(2024, 3, 1, 2024, 4, 30), "year": 2024, "rows": 1}
    assert skewed.query(queries.TOP_EARNERS_SCAN_SQL, parameters=scan).result_rows == [(loser, 10_000_000)]

    assert earners(skewed, *range_, 3) == expected


@pytest.mark.parametrize(("stale", "final_query"), [(20, False), (80, True)])
def test_the_scan_reads_more_rows_then_falls_back_to_final_when_stale_versions_fill_them(
    skewed, monkeypatch, stale, final_query
):
    """`stale` customers get an old version with a huge sum. With limit 1, the first read takes 18 rows and the
    second 72: 20 stale rows fill the first read (its last row sums more than every customer's exact sum), the second
    certifies; 80 fill both reads, and the FINAL query answers."""
    range_ = (date(2023, 12, 1), date(2024, 5, 31))  # answered from the rows of 2023 (2023 and 2024)
    expected = plain(skewed, *range_, 1)
    # Customers with a row of 2023 (the stale version must be older than a newest one).
    customers = skewed.query(
        "SELECT DISTINCT customer_id FROM two_year_customer_points WHERE year = 2023 AND entries > 0 ORDER BY 1"
    ).result_rows
    assert len(customers) >= stale
    skewed.command("SYSTEM STOP MERGES two_year_customer_points")  # a merge would drop the old versions
    for (customer_id,) in customers[:stale]:
        skewed.command(
            "INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points, "
            "day_entries) VALUES (2023, {customer_id:String}, 0, 0, ['2024-04-01'], [10000000], [0])",
            parameters={"customer_id": customer_id},
        )
    statements = []
    original = skewed.query
    monkeypatch.setattr(skewed, "query", lambda sql, *a, **k: statements.append(sql) or original(sql, *a, **k))

    found = top_earners(skewed, *range_, 1)
    assert [(earner.customer_id, earner.points_earned) for earner in found] == expected
    assert found[0].balance == queries.balances(skewed, [expected[0][0]])[expected[0][0]]
    assert statements.count(queries.TOP_EARNERS_SCAN_SQL) == 2
    assert (queries.TOP_EARNERS_IN_ROW_SQL in statements) == final_query


def test_ties_are_ordered_by_customer_id_when_pruning_certifies(client):
    ledger = LedgerBuilder()
    for customer_id in ("dave", "bea", "cleo", "abe", "eve"):
        ledger.add(customer_id, "earned", "2024-03-01T10:00:00+00:00", 70)
        ledger.add(customer_id, "confirmed", "2024-09-01T10:00:00+00:00", 30)
    ledger.add("fay", "earned", "2024-05-01T10:00:00+00:00", 99)
    LedgerSink(client).write(ledger.entries)

    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 3) == [("abe", 100), ("bea", 100), ("cleo", 100)]
    # The bounds tie at 100 too: a customer tied with the third place must not slip in before it.
    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 5) == [
        ("abe", 100),
        ("bea", 100),
        ("cleo", 100),
        ("dave", 100),
        ("eve", 100),
    ]
    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 6)[-1] == ("fay", 99)
    assert queries._top_earners_pruned(client, {**_range(2024, 1, 1, 2024, 12, 31), "year": 2024}, 3) == [
        ("abe", 100),
        ("bea", 100),
        ("cleo", 100),
    ]


def test_pruning_falls_back_when_the_best_bounds_were_earned_outside_the_range(client):
    """40 customers earned 1001 points in 2024, all but 1 of them in December; `winner` earned 50 in March.
    For January to July the bounds (1001) of the 40 exceed every sum, so no candidate set certifies."""
    ledger = LedgerBuilder()
    for number in range(40):
        ledger.add(f"big{number:02d}", "earned", "2024-03-05T10:00:00+00:00", 1)
        ledger.add(f"big{number:02d}", "earned", "2024-12-05T10:00:00+00:00", 1000)
    ledger.add("winner", "earned", "2024-03-06T10:00:00+00:00", 50)
    LedgerSink(client).write(ledger.entries)
    january_to_july = _range(2024, 1, 1, 2024, 7, 31)

    assert queries._top_earners_pruned(client, {**january_to_july, "year": 2024}, 1) is None
    assert earners(client, date(2024, 1, 1), date(2024, 7, 31), 1) == [("winner", 50)]
    assert earners(client, date(2024, 1, 1), date(2024, 7, 31), 2) == [("winner", 50), ("big00", 1)]
    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 2) == [("big00", 1001), ("big01", 1001)]


def test_top_earners_keep_their_balance(client):
    ledger = LedgerBuilder()
    ledger.add("ann", "earned", "2024-02-01T10:00:00+00:00", 500)
    ledger.add("ann", "redeemed", "2024-02-02T10:00:00+00:00", -200)
    ledger.add("ben", "earned", "2024-02-01T10:00:00+00:00", 400)
    LedgerSink(client).write(ledger.entries)

    assert top_earners(client, date(2024, 1, 1), date(2024, 12, 31), 2) == [
        TopEarner(customer_id="ann", points_earned=500, balance=300),
        TopEarner(customer_id="ben", points_earned=400, balance=400),
    ]


def test_projecting_the_ledger_again_in_other_batches_changes_no_top_earner(client):
    entries = skewed_ledger().entries
    sink = LedgerSink(client, batch_rows_max=37)
    sink.write(entries)
    expected = {(a, b): earners(client, a, b, 10) for a, b in RANGES}
    yearly = _yearly_rows(client)

    for start in range(0, len(entries), 53):
        sink.write(entries[start : start + 53])
    LedgerSink(client).write(list(reversed(entries)))

    assert {(a, b): earners(client, a, b, 10) for a, b in RANGES} == expected
    assert _yearly_rows(client) == yearly


def test_a_crash_between_the_daily_and_the_yearly_recompute_is_repaired_by_the_retry(client, monkeypatch):
    entries = skewed_ledger().entries
    half = len(entries) // 2
    LedgerSink(client).write(entries[:half])

    with _killed_at(client, monkeypatch, "INSERT INTO two_year_customer_points"), pytest.raises(ConnectionError):
        LedgerSink(client).write(entries[half:])
    LedgerSink(client).write(entries[half:])  # the restarted projector re-reads the batch

    _assert_exact_and_as_a_rebuild_makes_them(client)


def test_deferred_writes_bring_the_yearly_rows_up_to_date_at_the_recompute(client):
    entries = skewed_ledger().entries
    sink = LedgerSink(client)
    for start in range(0, len(entries), 40):
        sink.write(entries[start : start + 40], defer_recompute=True)
    sink.recompute_dirty()

    _assert_exact_and_as_a_rebuild_makes_them(client)


def test_rebuild_repairs_corrupted_yearly_rows(client):
    LedgerSink(client).write(skewed_ledger().entries)
    expected = earners(client, date(2024, 1, 1), date(2024, 12, 31), 10)
    client.command(
        "INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points) "
        "VALUES (2024, 'zed', 1000000, 1000000, ['2024-06-01'], [1000000])"
    )
    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 1) == [("zed", 1000000)]

    rebuild(client)

    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 10) == expected


def test_a_rolling_twelve_months_is_answered_from_the_two_year_rows_of_its_first_year(client):
    LedgerSink(client).write(skewed_ledger().entries)
    rolling = (date(2023, 7, 1), date(2024, 6, 30))
    expected = plain(client, *rolling, 3)
    assert earners(client, *rolling, 3) == expected
    # A row only the two-year table has (the daily table does not): it shows, so that table answered.
    client.command(
        "INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points, "
        "day_entries) VALUES (2023, 'zed', 0, 1000000, ['2024-06-30', '2024-07-01'], [600, 100], [1, 1])"
    )
    assert earners(client, *rolling, 3) == sorted([*expected, ("zed", 600)], key=lambda e: (-e[1], e[0]))[:3]


def test_a_batch_written_while_keeping_up_patches_only_its_own_customers_rows(client):
    entries = skewed_ledger().entries
    LedgerSink(client).write(entries)
    busiest_day, customers_that_day = client.query(
        "SELECT day, uniqExact(customer_id) AS customers FROM daily_customer_points "
        "GROUP BY day ORDER BY customers DESC, day LIMIT 1"
    ).result_rows[0]
    assert customers_that_day >= 2
    rows_before = client.command("SELECT count() FROM two_year_customer_points")
    late = LedgerBuilder()
    late.add("c007", "earned", f"{busiest_day.isoformat()}T23:00:00+00:00", 5)
    late.entries[0] = late.entries[0].model_copy(update={"sequence": 1_000, "entry_id": "late-c007"})

    LedgerSink(client).write(late.entries)

    # One new version of c007's two rows with that day (of its year and of the year before): the other customers
    # of that day were not rewritten.
    assert client.command("SELECT count() FROM two_year_customer_points") == rows_before + 2
    _assert_exact_and_as_a_rebuild_makes_them(client)


def test_a_crash_after_the_insert_leaves_the_day_for_the_next_sink_to_patch_for_every_customer(client, monkeypatch):
    ann = LedgerBuilder()
    ann.add("ann", "earned", "2024-05-01T10:00:00+00:00", 10)
    LedgerSink(client).write(ann.entries)
    ann.add("ann", "earned", "2024-05-01T11:00:00+00:00", 500)
    # Killed between the ledger insert and the recompute.
    with _killed_at(client, monkeypatch, "INSERT INTO daily_points"), pytest.raises(ConnectionError):
        LedgerSink(client).write(ann.entries[1:])
    # The batch is never read again (an embedded broker forgot it); another customer writes on the same day.
    bob = LedgerBuilder()
    bob.add("bob", "earned", "2024-05-01T12:00:00+00:00", 20)
    LedgerSink(client).write(bob.entries)

    assert earners(client, date(2024, 1, 1), date(2024, 12, 31), 2) == [("ann", 510), ("bob", 20)]
    _assert_exact_and_as_a_rebuild_makes_them(client)


@pytest.mark.parametrize(("days_max", "customers_max"), [(400, 2000), (7, 3)])
def test_yearly_rows_after_any_mix_of_live_deferred_and_restarted_writes_equal_a_rebuild(
    client, monkeypatch, days_max, customers_max
):
    # (7, 3): recomputes in windows of 7 days, and batches of more than 3 customers patch every customer.
    monkeypatch.setattr("projections.sink.DAYS_PER_RECOMPUTE_MAX", days_max)
    monkeypatch.setattr("projections.sink.CUSTOMERS_PER_PATCH_MAX", customers_max)
    entries = skewed_ledger(seed=5).entries
    randomness = random.Random(3)
    sink = LedgerSink(client)
    start = 0
    while start < len(entries):
        size = randomness.randint(1, 60)
        sink.write(entries[start : start + size], defer_recompute=randomness.random() < 0.4)
        if randomness.random() < 0.2:
            sink = LedgerSink(client)  # a restarted projector: it finds the dirty days in `dirty_days`
        start += size
    sink.recompute_dirty()

    _assert_exact_and_as_a_rebuild_makes_them(client)


def _assert_exact_and_as_a_rebuild_makes_them(client) -> None:
    """Every range's top earners equal the plain GROUP BY's, and the yearly rows equal what a rebuild writes."""
    for date_from, date_to in RANGES:
        assert earners(client, date_from, date_to, 10) == plain(client, date_from, date_to, 10)
    projected = _yearly_rows(client)
    rebuild(client)
    assert _yearly_rows(client) == projected


@contextlib.contextmanager
def _killed_at(client, monkeypatch, statement_start: str):
    """Within the block, the statement that starts so fails as if the process died there."""
    original = client.command

    def command(statement, *args, **kwargs):
        if str(statement).lstrip().startswith(statement_start):
            raise ConnectionError(f"killed at {statement_start}")
        return original(statement, *args, **kwargs)

    monkeypatch.setattr(client, "command", command)
    try:
        yield
    finally:
        monkeypatch.setattr(client, "command", original)


def _range(year_from: int, month_from: int, day_from: int, year_to: int, month_to: int, day_to: int) -> dict:
    return {"date_from": date(year_from, month_from, day_from), "date_to": date(year_to, month_to, day_to)}


def _yearly_rows(client) -> list[tuple]:
    return client.query(
        "SELECT year, customer_id, points_bound, entries, days, day_points, day_entries "
        "FROM two_year_customer_points FINAL ORDER BY year, customer_id"
    ).result_rows
