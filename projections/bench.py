"""Measurements of the projections on a scratch database: insert throughput and dashboard query latency.

Run: `python -m projections.bench chdb:///tmp/loyalty-bench --insert-rows 1000000 --ledger-rows 10000000`.
Use an empty, scratch database: the query benchmark fills `ledger_entries` with synthetic rows generated
inside ClickHouse (INSERT ... SELECT FROM numbers), which is quicker than building models in Python.
Timings are printed, never asserted (speed targets live in `loyalty bench`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow

from projections import queries
from projections.client import connect
from projections.schema import migrate
from projections.sink import LEDGER_COLUMNS, RECOMPUTE_YEARLY_CUSTOMER_POINTS_SQL, LedgerSink
from schemas.ledger import Kind, LedgerEntry, Source

SYNTHETIC_FIRST_DAY = date(2024, 1, 1)
SYNTHETIC_DAYS = 365

# Ten entries per customer over a year; kinds in realistic proportions (mostly earning).
SYNTHETIC_LEDGER_SQL = """
INSERT INTO ledger_entries
    (entry_id, customer_id, store_id, kind, sequence, points, balance_after, pending_points, pending_after,
     source, rule_id, ruleset_version, caused_by, event_type, fingerprint, occurred_at, sku, category,
     quantity, explanation, schema_version)
SELECT
    concat('e', toString(number)) AS entry_id,
    concat('c', toString(number % {customers:UInt64})) AS customer_id,
    concat('store-', toString(number % 3)) AS store_id,
    multiIf(r < 60, 'earned', r < 65, 'pending', r < 70, 'confirmed', r < 85, 'redeemed',
            r < 90, 'expired', r < 95, 'reversed', r < 98, 'adjusted', 'recorded') AS kind,
    intDiv(number, {customers:UInt64}) + 1 AS sequence,
    multiIf(kind IN ('earned', 'confirmed'), 10 + r, kind = 'redeemed', -50, kind IN ('expired', 'reversed'), -10,
            kind = 'adjusted', 5, 0) AS points,
    (number % 997) AS balance_after,
    if(kind = 'pending', 20, 0) AS pending_points,
    0 AS pending_after,
    arrayElement(['purchase', 'review', 'referral', 'registration', 'blog_comment', 'social_share'],
                 1 + (number % 6)) AS source,
    concat('rule-', toString(number % 20)) AS rule_id,
    '2024.1' AS ruleset_version,
    concat('ev', toString(number)) AS caused_by,
    'purchase.completed' AS event_type,
    hex(number) AS fingerprint,
    toDateTime64('2024-01-01 00:00:00', 6, 'UTC')
        + toIntervalSecond((sequence - 1) * 36 * 86400 + (number % 36) * 86400 + (number % 86400)) AS occurred_at,
    concat('SKU-', toString(number % 5000)) AS sku,
    concat('category-', toString(number % 50)) AS category,
    1 AS quantity,
    '' AS explanation,
    1 AS schema_version
FROM (SELECT number, (number * 2654435761) % 100 AS r FROM numbers({first:UInt64}, {count:UInt64}))
"""

REBUILD_DAILY_POINTS_SQL = """
INSERT INTO daily_points
    (day, store_id, kind, source, rule_id, category,
     points, points_positive, pending_points, entries, entries_positive)
SELECT toDate(occurred_at) AS day, store_id, kind, source, rule_id, ifNull(category, '') AS c,
       sum(points), sumIf(points, points > 0), sum(pending_points), count(), countIf(points > 0)
FROM ledger_entries FINAL
WHERE toYYYYMM(occurred_at) = {month:UInt32}
GROUP BY day, store_id, kind, source, rule_id, c
SETTINGS do_not_merge_across_partitions_select_final = 1
"""


REBUILD_DAILY_PRODUCT_POINTS_SQL = """
INSERT INTO daily_product_points (day, kind, sku, points, entries)
SELECT toDate(occurred_at) AS day, kind, ifNull(sku, '') AS s, sum(points), count()
FROM ledger_entries FINAL
WHERE toYYYYMM(occurred_at) = {month:UInt32} AND kind IN ('earned', 'confirmed', 'adjusted') AND points > 0
GROUP BY day, kind, s
SETTINGS do_not_merge_across_partitions_select_final = 1
"""

REBUILD_DAILY_CUSTOMER_POINTS_SQL = """
INSERT INTO daily_customer_points (day, customer_id, points_earned, entries)
SELECT toDate(occurred_at) AS day, customer_id, sum(points), count()
FROM ledger_entries FINAL
WHERE toYYYYMM(occurred_at) = {month:UInt32} AND kind IN ('earned', 'confirmed')
GROUP BY day, customer_id
SETTINGS do_not_merge_across_partitions_select_final = 1
"""

AGGREGATE_TABLES = ("daily_points", "daily_product_points", "daily_customer_points", "two_year_customer_points")


def synthetic_entries(rows: int, customers: int) -> list[LedgerEntry]:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return [
        LedgerEntry.model_construct(
            entry_id=f"bench-{number}",
            customer_id=f"c{number % customers}",
            store_id="store-1",
            kind=Kind.earned,
            sequence=number // customers + 1,
            points=10,
            balance_after=10 * (number // customers + 1),
            pending_points=0,
            pending_after=0,
            source=Source.purchase,
            rule_id="rule-1",
            ruleset_version="2024.1",
            caused_by=f"ev-{number}",
            event_type="purchase.completed",
            fingerprint="fp",
            occurred_at=start + timedelta(seconds=number * 7),
            order_id=None,
            sku=f"SKU-{number % 5000}",
            category="shoes",
            quantity=1,
            amount=None,
            reference=None,
            available_at=None,
            explanation="",
            schema_version=1,
        )
        for number in range(rows)
    ]


def bench_inserts(dsn: str, rows: int, batch_rows: int) -> None:
    client = connect(dsn)
    migrate(client)
    entries = synthetic_entries(rows, customers=max(1, rows // 10))
    rows_of_values = [[entry.__dict__[name] for name in LEDGER_COLUMNS] for entry in entries]
    columns = [[entry.__dict__[name] for entry in entries] for name in LEDGER_COLUMNS]
    arrow_table = pyarrow.table(
        {name: pyarrow.array(column) for name, column in zip(LEDGER_COLUMNS, columns, strict=True)}
    )

    def run(label: str, insert_batch: Callable[[int, int], None]) -> None:
        client.command("TRUNCATE TABLE ledger_entries")
        began = time.perf_counter()
        for start in range(0, rows, batch_rows):
            insert_batch(start, min(start + batch_rows, rows))
        elapsed = time.perf_counter() - began
        print(f"insert {label:<28} {rows} rows in batches of {batch_rows}: {rows / elapsed:>10,.0f} rows/s")

    run(
        "row-oriented",
        lambda a, b: client.insert("ledger_entries", rows_of_values[a:b], column_names=LEDGER_COLUMNS),
    )
    run(
        "column-oriented",
        lambda a, b: client.insert(
            "ledger_entries", [c[a:b] for c in columns], column_names=LEDGER_COLUMNS, column_oriented=True
        ),
    )
    run("arrow", lambda a, b: client.insert_arrow("ledger_entries", arrow_table.slice(a, b - a)))
    for table in ("ledger_entries", *AGGREGATE_TABLES):
        client.command(f"TRUNCATE TABLE {table}")
    sink = LedgerSink(client, batch_rows_max=batch_rows)
    began = time.perf_counter()
    for start in range(0, rows, batch_rows):
        sink.write(entries[start : start + batch_rows], {("loyalty.ledger", 0): start + batch_rows})
    elapsed = time.perf_counter() - began
    print(
        f"insert {'LedgerSink.write (models)':<28} {rows} rows, with daily recompute: {rows / elapsed:>10,.0f} rows/s"
    )
    client.close()


def fill_ledger(client, rows: int, customers: int, chunk_rows: int = 2_000_000) -> None:
    began = time.perf_counter()
    for first in range(0, rows, chunk_rows):
        count = min(chunk_rows, rows - first)
        client.command(SYNTHETIC_LEDGER_SQL, parameters={"customers": customers, "first": first, "count": count})
    print(f"generated {rows:,} ledger rows in {time.perf_counter() - began:.1f} s")
    build_aggregates(client)


def build_aggregates(client) -> None:
    """Every aggregate table from the ledger, by month (and by year for two_year_customer_points)."""
    began = time.perf_counter()
    months = [row[0] for row in client.query("SELECT DISTINCT toYYYYMM(occurred_at) FROM ledger_entries").result_rows]
    for month in months:
        for statement in (
            REBUILD_DAILY_POINTS_SQL,
            REBUILD_DAILY_PRODUCT_POINTS_SQL,
            REBUILD_DAILY_CUSTOMER_POINTS_SQL,
        ):
            client.command(statement, parameters={"month": month})
    # The sink's own statement over a whole year at a time (a year fits in one recompute window): the rows it
    # builds are the rows the projector keeps up to date.
    for year in sorted({month // 100 for month in months}):
        days = [
            day
            for (day,) in client.query(
                "SELECT DISTINCT day FROM daily_customer_points WHERE toYear(day) = {year:UInt16} ORDER BY day",
                parameters={"year": year},
            ).result_rows
        ]
        if days:
            parameters = {"day_first": days[0], "day_last": days[-1], "days": days}
            client.command(RECOMPUTE_YEARLY_CUSTOMER_POINTS_SQL, parameters=parameters)
    sizes = ", ".join(f"{table} {client.command(f'SELECT count() FROM {table}'):,}" for table in AGGREGATE_TABLES)
    print(f"built the daily aggregates ({sizes} rows) in {time.perf_counter() - began:.1f} s")


def bench_queries(dsn: str, rows: int, customers: int, repeats: int) -> None:
    client = connect(dsn)
    migrate(client)
    if client.command("SELECT count() FROM ledger_entries") < rows:
        for table in ("ledger_entries", *AGGREGATE_TABLES):
            client.command(f"TRUNCATE TABLE {table}")
        fill_ledger(client, rows, customers)
    elif any(client.command(f"SELECT count() FROM {table}") == 0 for table in AGGREGATE_TABLES):
        # A scratch database filled before a migration added an aggregate table: build them again.
        for table in AGGREGATE_TABLES:
            client.command(f"TRUNCATE TABLE {table}")
        build_aggregates(client)
    randomness = random.Random(7)

    def some_customer() -> str:
        return f"c{randomness.randrange(customers)}"

    def some_month() -> tuple[date, date]:
        first = SYNTHETIC_FIRST_DAY + timedelta(days=randomness.randrange(SYNTHETIC_DAYS - 31))
        return first, first + timedelta(days=30)

    def some_days(days: int) -> tuple[date, date]:
        first = SYNTHETIC_FIRST_DAY + timedelta(days=randomness.randrange(SYNTHETIC_DAYS - days))
        return first, first + timedelta(days=days - 1)

    def across_year_end(days: int) -> tuple[date, date]:
        first = date(SYNTHETIC_FIRST_DAY.year, 12, 31) - timedelta(days=randomness.randrange(1, days - 1))
        return first, first + timedelta(days=days - 1)

    year = (SYNTHETIC_FIRST_DAY, SYNTHETIC_FIRST_DAY + timedelta(days=SYNTHETIC_DAYS - 1))
    rolling_year = (date(2024, 7, 1), date(2025, 6, 30))
    cases: list[tuple[str, Callable[[], object]]] = [
        ("balance", lambda: queries.balance(client, some_customer())),
        ("history (100 entries)", lambda: queries.history(client, some_customer())),
        ("points_status 31 days by day", lambda: queries.points_status(client, *some_month(), "day")),
        ("points_status year by week", lambda: queries.points_status(client, *year, "week")),
        ("points_status year by month, store", lambda: queries.points_status(client, *year, "month", "store-1")),
        ("point_sources 31 days by source", lambda: queries.point_sources(client, *some_month(), "source")),
        ("point_sources year by product", lambda: queries.point_sources(client, *year, "product")),
        ("top_earners 7 days", lambda: queries.top_earners(client, *some_days(7))),
        ("top_earners 31 days", lambda: queries.top_earners(client, *some_month())),
        ("top_earners 31 days across a year end", lambda: queries.top_earners(client, *across_year_end(31))),
        ("top_earners 90 days", lambda: queries.top_earners(client, *some_days(90))),
        ("top_earners year", lambda: queries.top_earners(client, *year)),
        # Across the year end: with --customers 500000 the synthetic ledger spans two years (20 entries each).
        ("top_earners rolling 12 months", lambda: queries.top_earners(client, *rolling_year)),
        ("liability year", lambda: queries.liability(client, *year, Decimal("0.01"))),
        (
            "top_earners 31 days from ledger FINAL",
            lambda: client.query(
                "SELECT customer_id, sum(points) p FROM ledger_entries FINAL "
                "WHERE toDate(occurred_at) BETWEEN {a:Date} AND {b:Date} AND kind IN ('earned', 'confirmed') "
                "GROUP BY customer_id ORDER BY p DESC LIMIT 10 "
                "SETTINGS do_not_merge_across_partitions_select_final = 1",
                parameters=dict(zip(("a", "b"), some_month(), strict=True)),
            ),
        ),
        (
            "points_status 31 days from ledger FINAL",
            lambda: client.query(
                "SELECT toDate(occurred_at) d, kind, sum(points) FROM ledger_entries FINAL "
                "WHERE toDate(occurred_at) BETWEEN {a:Date} AND {b:Date} GROUP BY d, kind "
                "SETTINGS do_not_merge_across_partitions_select_final = 1",
                parameters=dict(zip(("a", "b"), some_month(), strict=True)),
            ),
        ),
    ]
    parts = client.command("SELECT count() FROM system.parts WHERE active AND table = 'ledger_entries'")
    print(f"ledger_entries: {client.command('SELECT count() FROM ledger_entries'):,} rows in {parts} active parts")
    for label, call in cases:
        call()  # warm-up
        timings = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            timings.append((time.perf_counter() - began) * 1000)
        timings.sort()
        p95 = timings[min(len(timings) - 1, int(len(timings) * 0.95))]
        print(f"query {label:<42} p50 {statistics.median(timings):7.1f} ms   p95 {p95:7.1f} ms")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", help="a scratch database, e.g. chdb:///tmp/loyalty-bench")
    parser.add_argument("--insert-rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=20_000)
    parser.add_argument("--ledger-rows", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-inserts", action="store_true")
    options = parser.parse_args()
    if not options.skip_inserts:
        bench_inserts(options.dsn, options.insert_rows, options.batch_rows)
    bench_queries(options.dsn, options.ledger_rows, options.customers, options.repeats)


if __name__ == "__main__":
    main()
