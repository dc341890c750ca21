"""The read side: balances, history and the dashboard's four sections, as typed results.

Every query takes its inputs as bound parameters (`{name:Type}` placeholders passed through
clickhouse-connect's `parameters=`); no SQL text is ever built from a caller's value.

Exactness: ledger rows are read with FINAL (a re-delivered entry is stored twice until a merge collapses
it), or through argMax over a customer's `sequence`, which duplicates cannot change. Dashboard sums come
from `daily_points FINAL`, which the sink recomputes from the deduplicated ledger (see `projections.sink`).
Days are UTC days of `occurred_at`; a date range includes both ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from clickhouse_connect.driver.client import Client

from projections.sink import LEDGER_COLUMNS
from schemas.ledger import LedgerEntry

__all__ = [
    "Balance",
    "ExpiringPoints",
    "LiabilityDay",
    "PeriodStatus",
    "PointSource",
    "PointsStatus",
    "TopEarner",
    "balance",
    "balances",
    "expiring_soon",
    "history",
    "liability",
    "point_sources",
    "points_status",
    "top_earners",
]

Granularity = Literal["day", "week", "month"]
SourceDimension = Literal["source", "rule", "product", "category"]

DAYS_PER_RANGE_MAX = 3700  # ten years and a bit: bounds every per-day loop and result
HISTORY_LIMIT_MAX = 10_000
TOP_EARNERS_LIMIT_MAX = 1_000
CUSTOMER_IDS_PER_QUERY_MAX = 100_000

# FINAL may dedupe each partition on its own: a duplicate has the same occurred_at, hence the same month.
FINAL_SETTINGS = "SETTINGS do_not_merge_across_partitions_select_final = 1"


@dataclass(frozen=True)
class Balance:
    """A customer's position. `available` can be negative (a reversal after a redemption): `debt` is then
    its absolute value. `lifetime_earned` counts earned and confirmed points; `lifetime_redeemed` is
    positive."""

    customer_id: str
    available: int
    pending: int
    lifetime_earned: int
    lifetime_redeemed: int
    debt: int
    last_activity: datetime
    entries: int


@dataclass(frozen=True)
class PeriodStatus:
    """Points status of one period. `period_start`/`period_end` are clipped to the requested range, so the
    first week of a range that starts on a Wednesday runs from that Wednesday. Every figure is positive
    for the usual direction (`redeemed` 300 means 300 points were redeemed) except `adjusted`, which is
    signed. `outstanding` is the sum of every available-balance change up to the end of `period_end`,
    including history before the range (pending points are not outstanding)."""

    period_start: date
    period_end: date
    issued: int
    redeemed: int
    expired: int
    reversed: int
    adjusted: int
    pending_issued: int
    outstanding: int


@dataclass(frozen=True)
class PointsStatus:
    granularity: Granularity
    date_from: date
    date_to: date
    store_id: str | None
    periods: tuple[PeriodStatus, ...]
    totals: PeriodStatus


@dataclass(frozen=True)
class PointSource:
    """Points given in the range under one key. `key` is None for entries without that detail (e.g. the
    category of a review award)."""

    key: str | None
    points: int
    entries: int


@dataclass(frozen=True)
class TopEarner:
    customer_id: str
    points_earned: int
    balance: int


@dataclass(frozen=True)
class LiabilityDay:
    day: date
    outstanding_points: int
    outstanding_value: Decimal


BALANCE_SQL = f"""
SELECT
    count(),
    argMax(balance_after, sequence),
    argMax(pending_after, sequence),
    sumIf(points, kind IN ('earned', 'confirmed') AND points > 0),
    -sumIf(points, kind = 'redeemed'),
    max(occurred_at)
FROM ledger_entries FINAL
WHERE customer_id = {{customer_id:String}}
{FINAL_SETTINGS}
"""

BALANCES_ALL_SQL = """
SELECT customer_id, argMax(balance_after, sequence) FROM ledger_entries GROUP BY customer_id
"""

BALANCES_SOME_SQL = """
SELECT customer_id, argMax(balance_after, sequence)
FROM ledger_entries
WHERE customer_id IN {customer_ids:Array(String)}
GROUP BY customer_id
"""

HISTORY_SQL = f"""
SELECT {", ".join(LEDGER_COLUMNS)}
FROM ledger_entries FINAL
WHERE customer_id = {{customer_id:String}}
ORDER BY sequence, entry_id
LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}
{FINAL_SETTINGS}
"""

STORE_FILTER = "({store_id:Nullable(String)} IS NULL OR store_id = {store_id:Nullable(String)})"

DAILY_BY_KIND_SQL = f"""
SELECT day, kind, sum(points), sum(pending_points)
FROM daily_points FINAL
WHERE day >= {{date_from:Date}} AND day <= {{date_to:Date}} AND {STORE_FILTER}
GROUP BY day, kind
{FINAL_SETTINGS}
"""

OUTSTANDING_BEFORE_SQL = f"""
SELECT sum(points)
FROM daily_points FINAL
WHERE day < {{date_from:Date}} AND {STORE_FILTER}
{FINAL_SETTINGS}
"""

# The dimension picks one of four constant statements; it never reaches SQL text itself. Products are not
# in daily_points (too many of them): that dimension reads daily_product_points.
POINT_SOURCES_DAILY_SQL = """
SELECT {column} AS key, sum(points_positive) AS points, sum(entries_positive) AS entries
FROM daily_points FINAL
WHERE day >= {{date_from:Date}} AND day <= {{date_to:Date}} AND kind IN ('earned', 'confirmed', 'adjusted')
GROUP BY key
HAVING entries > 0
ORDER BY points DESC, key
{settings}
"""
POINT_SOURCES_BY_PRODUCT_SQL = f"""
SELECT sku AS key, sum(points) AS points_given, sum(entries) AS entries_given
FROM daily_product_points FINAL
WHERE day >= {{date_from:Date}} AND day <= {{date_to:Date}}
GROUP BY key
ORDER BY points_given DESC, key
{FINAL_SETTINGS}
"""
POINT_SOURCES_SQL: dict[str, str] = {
    "source": POINT_SOURCES_DAILY_SQL.format(column="source", settings=FINAL_SETTINGS),
    "rule": POINT_SOURCES_DAILY_SQL.format(column="rule_id", settings=FINAL_SETTINGS),
    "category": POINT_SOURCES_DAILY_SQL.format(column="category", settings=FINAL_SETTINGS),
    "product": POINT_SOURCES_BY_PRODUCT_SQL,
}

# Two queries, not one with a CTE: ClickHouse inlines a CTE at every use, so a CTE of the top earners read
# by both the outer query and the balance subquery ran the whole aggregation twice (274 vs 135 ms for a
# year at 10M ledger rows, measured 2026-11-23). This is the plain form, the definition of the answer: `top_earners`
# reads two_year_customer_points instead (see there) and answers exactly what this query answers.
TOP_EARNERS_SQL = f"""
SELECT customer_id, sum(points_earned) AS points
FROM daily_customer_points FINAL
WHERE day >= {{date_from:Date}} AND day <= {{date_to:Date}}
GROUP BY customer_id
ORDER BY points DESC, customer_id
LIMIT {{limit:UInt32}}
{FINAL_SETTINGS}
"""

# A customer row's sum over the range: `days` is ascending, so the range's days are those between `first` (the
# count of days before the range) and `past` (of days up to its end); `first < past` when it has one there.
_RANGE_DAYS = (
    "arrayCount(day_of -> day_of < {date_from:Date}, days) AS first, "
    "arrayCount(day_of -> day_of <= {date_to:Date}, days) AS past"
)
_RANGE_SUM = "arraySum(arraySlice(day_points, first + 1, past - first))"

# A range within the two years of one row (any range of at most 366 days): each customer's row holds its daily
# earnings, days ascending, so the range's sum is the sum of a slice of `day_points`, with no GROUP BY over a
# string key (over the 550k day rows of 31 days that took 35-40 ms at 10M ledger rows, 1M customers). Without
# FINAL: a customer may have several rows (versions not merged yet), and the first `rows` rows in this order are
# only the candidates that `_top_earners_scanned` certifies (FINAL merged every part with the small parts that
# the sink's patches leave: 52 against 27 ms for 31 days with four of them).
TOP_EARNERS_SCAN_SQL = f"""
SELECT customer_id, {_RANGE_SUM} AS points
FROM
(
    SELECT customer_id, day_points, {_RANGE_DAYS}
    FROM two_year_customer_points
    WHERE year = {{year:UInt16}}
)
WHERE first < past
ORDER BY points DESC, customer_id
LIMIT {{rows:UInt32}}
"""

# The same with FINAL, the answer itself: what a scan that its candidates cannot certify falls back to.
TOP_EARNERS_IN_ROW_SQL = f"""
SELECT customer_id, {_RANGE_SUM} AS points
FROM
(
    SELECT customer_id, day_points, {_RANGE_DAYS}
    FROM two_year_customer_points FINAL
    WHERE year = {{year:UInt16}}
)
WHERE first < past
ORDER BY points DESC, customer_id
LIMIT {{limit:UInt32}}
{FINAL_SETTINGS}
"""

# A range longer than one row's two years: the rows of every other year from its first (their two years do not
# overlap), each row's slice summed, added up per customer.
TOP_EARNERS_ACROSS_ROWS_SQL = f"""
SELECT customer_id, sum(points) AS total
FROM
(
    SELECT customer_id, {_RANGE_SUM} AS points
    FROM
    (
        SELECT customer_id, day_points, {_RANGE_DAYS}
        FROM two_year_customer_points FINAL
        WHERE year >= {{year_from:UInt16}} AND year <= {{year_to:UInt16}} AND (year - {{year_from:UInt16}}) % 2 = 0
    )
    WHERE first < past
)
GROUP BY customer_id
ORDER BY total DESC, customer_id
LIMIT {{limit:UInt32}}
{FINAL_SETTINGS}
"""

# The customers with the highest bounds (earnings of `year` alone), in the order that certification relies on.
# Without FINAL: a customer may appear in several rows (versions not merged yet), and its first row in this order
# has the highest of its bounds, which is at least the bound of its newest row.
TOP_EARNERS_BOUNDS_SQL = """
SELECT customer_id, points_bound
FROM two_year_customer_points
WHERE year = {year:UInt16}
ORDER BY points_bound DESC, customer_id
LIMIT {rows:UInt32}
"""

# The candidates' sums over the range from their newest rows (most entries), and whether they have a day in the
# range (a customer without one is not in the plain GROUP BY's answer at all).
_CANDIDATES = f"""
    SELECT customer_id, argMax({_RANGE_SUM}, entries) AS points, argMax(first < past, entries) AS has_day
    FROM
    (
        SELECT customer_id, entries, day_points, {_RANGE_DAYS}
        FROM two_year_customer_points
        WHERE year = {{year:UInt16}} AND customer_id IN {{customer_ids:Array(String)}}
    )
    GROUP BY customer_id
"""
TOP_EARNERS_CANDIDATES_SQL = f"SELECT customer_id, points, has_day FROM ({_CANDIDATES})"

# Candidates tried per limit by bound pruning, before the scan: certification needs the limit-th best sum among
# the candidates to beat the next bound, so a few more than `limit` are taken, then many more.
TOP_EARNERS_CANDIDATES_PER_LIMIT = (4, 32)
# Pruning is tried for ranges of at least half a year within one calendar year. A bound is a customer's whole
# year, so for shorter ranges it certifies only when the top earners earned nearly all of their year in the range
# (measured: on 1M customers earning evenly through the year it never did for 31 days), and a failed attempt only
# adds its cost (about 15 ms) to the scan.
TOP_EARNERS_PRUNE_DAYS_MIN = 183
# Ranges of at most this many days take the plain GROUP BY: it reads the range's day rows, where the scan reads a
# row per customer of the year whatever the range. Measured on the bench's ledger (10M rows, 1M customers, 650k
# of them earning in the year, 18k a day): 14 days 58 against 84 CPU ms (top_earners with the balances, machine
# loaded), 21 days 65 against 73, 31 days 88 against 85; from about two months on the scan wins (90 days:
# 41-50 against 72-84 ms p50 wall). The fewer customers a day has against a year, the later the scan wins.
TOP_EARNERS_GROUP_BY_DAYS_MAX = 35
# Rows the scan reads before certifying: (per limit, more). Unmerged versions of a customer take rows without
# adding a candidate; a second, larger read, then the FINAL query, if the first does not certify.
TOP_EARNERS_SCAN_ROWS = ((2, 16), (8, 64))


def balance(client: Client, customer_id: str) -> Balance | None:
    """The customer's balance, or None for a customer with no ledger entry."""
    _check_customer_id(customer_id)
    row = client.query(BALANCE_SQL, parameters={"customer_id": customer_id}).result_rows[0]
    entries, available, pending, earned, redeemed, last_activity = row
    if entries == 0:
        return None
    return Balance(
        customer_id=customer_id,
        available=available,
        pending=pending,
        lifetime_earned=earned,
        lifetime_redeemed=redeemed,
        debt=max(0, -available),
        last_activity=_utc(last_activity),
        entries=entries,
    )


def balances(client: Client, customer_ids: Iterable[str] | None = None) -> dict[str, int]:
    """Available balance per customer (all customers when `customer_ids` is None)."""
    if customer_ids is None:
        return dict(client.query(BALANCES_ALL_SQL).result_rows)
    wanted = sorted(set(customer_ids))
    if len(wanted) > CUSTOMER_IDS_PER_QUERY_MAX:
        raise ValueError(f"at most {CUSTOMER_IDS_PER_QUERY_MAX} customer ids per call, got {len(wanted)}")
    for customer_id in wanted:
        _check_customer_id(customer_id)
    if not wanted:
        return {}
    return dict(client.query(BALANCES_SOME_SQL, parameters={"customer_ids": wanted}).result_rows)


def history(client: Client, customer_id: str, *, limit: int = 100, offset: int = 0) -> list[LedgerEntry]:
    """The customer's entries in `sequence` order, `limit` of them after skipping `offset`."""
    _check_customer_id(customer_id)
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise ValueError(f"limit must be in 1..{HISTORY_LIMIT_MAX}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    result = client.query(HISTORY_SQL, parameters={"customer_id": customer_id, "limit": limit, "offset": offset})
    return [entry_of_row(row) for row in result.result_rows]


def entry_of_row(row: Sequence[Any]) -> LedgerEntry:
    """A `ledger_entries` row (the columns `LEDGER_COLUMNS`, in that order) as the entry it stores."""
    fields = dict(zip(LEDGER_COLUMNS, row, strict=True))
    fields["occurred_at"] = _utc(fields["occurred_at"])
    if fields["available_at"] is not None:
        fields["available_at"] = _utc(fields["available_at"])
    return LedgerEntry.model_validate(fields)


def points_status(
    client: Client,
    date_from: date,
    date_to: date,
    granularity: Granularity = "day",
    store_id: str | None = None,
) -> PointsStatus:
    """Issued, redeemed, expired, reversed, adjusted, pending issued and outstanding per period."""
    days = _days(date_from, date_to)
    if granularity not in ("day", "week", "month"):
        raise ValueError(f"granularity must be day, week or month, got {granularity!r}")
    parameters = {"date_from": date_from, "date_to": date_to, "store_id": store_id}
    outstanding = _scalar(client.query(OUTSTANDING_BEFORE_SQL, parameters=parameters).result_rows)
    by_day: dict[date, dict[str, tuple[int, int]]] = {}
    for day, kind, points, pending_points in client.query(DAILY_BY_KIND_SQL, parameters=parameters).result_rows:
        by_day.setdefault(day, {})[kind] = (points, pending_points)

    periods: list[PeriodStatus] = []
    current: dict[str, Any] | None = None
    for day in days:
        start = max(_period_start(day, granularity), date_from)
        if current is None or current["period_start"] != start:
            if current is not None:
                periods.append(PeriodStatus(**current))
            current = dict.fromkeys(("issued", "redeemed", "expired", "reversed", "adjusted", "pending_issued"), 0)
            current["period_start"] = start
        kinds = by_day.get(day, {})
        points = {kind: figures[0] for kind, figures in kinds.items()}
        current["issued"] += points.get("earned", 0) + points.get("confirmed", 0)
        current["redeemed"] -= points.get("redeemed", 0)
        current["expired"] -= points.get("expired", 0)
        current["reversed"] -= points.get("reversed", 0)
        current["adjusted"] += points.get("adjusted", 0)
        current["pending_issued"] += kinds.get("pending", (0, 0))[1]
        outstanding += sum(points.values())
        current["period_end"] = day
        current["outstanding"] = outstanding
    assert current is not None
    periods.append(PeriodStatus(**current))

    totals = PeriodStatus(
        period_start=date_from,
        period_end=date_to,
        issued=sum(period.issued for period in periods),
        redeemed=sum(period.redeemed for period in periods),
        expired=sum(period.expired for period in periods),
        reversed=sum(period.reversed for period in periods),
        adjusted=sum(period.adjusted for period in periods),
        pending_issued=sum(period.pending_issued for period in periods),
        outstanding=outstanding,
    )
    return PointsStatus(
        granularity=granularity,
        date_from=date_from,
        date_to=date_to,
        store_id=store_id,
        periods=tuple(periods),
        totals=totals,
    )


def point_sources(client: Client, date_from: date, date_to: date, by: SourceDimension = "source") -> list[PointSource]:
    """Where points came from: positive points of kinds earned, confirmed and adjusted, per key.

    Pending points are left out on purpose: they are counted once, when confirmed, so that the points
    shown here are points customers can spend. The total equals `issued` of `points_status` plus the
    positive admin adjustments.
    """
    _days(date_from, date_to)
    if by not in POINT_SOURCES_SQL:
        raise ValueError(f"by must be one of {sorted(POINT_SOURCES_SQL)}, got {by!r}")
    result = client.query(POINT_SOURCES_SQL[by], parameters={"date_from": date_from, "date_to": date_to})
    return [PointSource(key=key or None, points=points, entries=entries) for key, points, entries in result.result_rows]


def top_earners(client: Client, date_from: date, date_to: date, limit: int = 10) -> list[TopEarner]:
    """The customers who earned most (earned + confirmed points) in the range, with their current balance.

    Ties are ordered by customer id. The answer is always exactly the plain `GROUP BY customer_id` over
    `daily_customer_points` (TOP_EARNERS_SQL); the plan depends on the range (`two_year_customer_points`' row of
    year y holds a customer's days of y and y + 1):
    - at most TOP_EARNERS_GROUP_BY_DAYS_MAX (35) days: that GROUP BY, which reads only the range's day rows;
    - half a year or more within one calendar year: threshold pruning by the rows' bounds (`_top_earners_pruned`);
    - otherwise, and when pruning cannot certify, up to 366 days: one slice sum per customer row of the range's
      first year, no GROUP BY; the first rows of that scan, without FINAL, are candidates, certified exact
      (`_top_earners_scanned`), else the same query with FINAL. Paired runs on 2 shared CPUs (with the balances,
      p50/p95 ms): a rolling twelve months over a two-year ledger of 10M rows, 500k customers 121/136 -> 41/44;
      90 days 64/80 -> 41/44;
    - longer: the rows of every other year, sliced and added up per customer.
    """
    _days(date_from, date_to)
    if not 1 <= limit <= TOP_EARNERS_LIMIT_MAX:
        raise ValueError(f"limit must be in 1..{TOP_EARNERS_LIMIT_MAX}, got {limit}")
    range_parameters = {"date_from": date_from, "date_to": date_to}
    if date_to.year > date_from.year + 1:
        earners = client.query(
            TOP_EARNERS_ACROSS_ROWS_SQL,
            parameters={**range_parameters, "year_from": date_from.year, "year_to": date_to.year, "limit": limit},
        ).result_rows
    else:
        row_parameters = {**range_parameters, "year": date_from.year}
        found = None
        if (date_to - date_from).days + 1 <= TOP_EARNERS_GROUP_BY_DAYS_MAX:
            found = client.query(TOP_EARNERS_SQL, parameters={**range_parameters, "limit": limit}).result_rows
        elif date_to.year == date_from.year and (date_to - date_from).days + 1 >= TOP_EARNERS_PRUNE_DAYS_MIN:
            found = _top_earners_pruned(client, row_parameters, limit)
        if found is None:
            found = _top_earners_scanned(client, row_parameters, limit)
        if found is None:
            found = client.query(TOP_EARNERS_IN_ROW_SQL, parameters={**row_parameters, "limit": limit}).result_rows
        earners = found
    if not earners:
        return []
    balances = dict(
        client.query(
            BALANCES_SOME_SQL, parameters={"customer_ids": [customer_id for customer_id, _ in earners]}
        ).result_rows
    )
    return [
        TopEarner(customer_id=customer_id, points_earned=points, balance=balances.get(customer_id, 0))
        for customer_id, points in earners
    ]


def _top_earners_scanned(client: Client, parameters: dict[str, Any], limit: int) -> list[tuple[str, int]] | None:
    """The top `limit` earners of a range within the two years of the rows of `parameters["year"]`, certified
    exact, or None when not certified.

    Read without FINAL, every version of a customer's row is a row of the scan, its newest (which gives the
    customer's exact sum) among them. Take the first n rows in (sum descending, customer id) order, compute
    their customers' exact sums from their newest rows, and let (S, c) be the n-th row: every other customer's
    rows, the newest included, come after it, so its exact sum is below S, or equal to S with an id above c.
    When the limit-th best candidate ranks no later than (S, c), the top `limit` candidates are the answer; when
    the scan returned fewer than n rows, every customer with a day in the range is a candidate.
    """
    for per_limit, more in TOP_EARNERS_SCAN_ROWS:
        wanted = limit * per_limit + more
        rows = client.query(TOP_EARNERS_SCAN_SQL, parameters={**parameters, "rows": wanted}).result_rows
        ranked = _exact_candidates(client, parameters, list(dict.fromkeys(customer_id for customer_id, _ in rows)))
        if len(rows) < wanted:
            return ranked[:limit]
        last_customer_id, last_points = rows[-1]
        if len(ranked) >= limit and _rank(ranked[limit - 1]) <= (-last_points, last_customer_id):
            return ranked[:limit]
    return None


def _exact_candidates(client: Client, parameters: dict[str, Any], customer_ids: list[str]) -> list[tuple[str, int]]:
    """The candidates' exact sums over the range (from their newest rows), those with a day in it, best first."""
    if not customer_ids:
        return []
    sums = client.query(TOP_EARNERS_CANDIDATES_SQL, parameters={**parameters, "customer_ids": customer_ids}).result_rows
    return sorted(((customer_id, int(points)) for customer_id, points, has_day in sums if has_day), key=_rank)


def _rank(earner: tuple[str, int]) -> tuple[int, str]:
    return (-earner[1], earner[0])


def _top_earners_pruned(client: Client, parameters: dict[str, Any], limit: int) -> list[tuple[str, int]] | None:
    """The top `limit` earners of a range within the calendar year `parameters["year"]`, certified exact, or
    None when not certified.

    A customer's sum over any days of the year is at most its `points_bound` (the sum of its positive daily
    earnings of the year). Take the first n customers in (bound descending, customer id) order, compute
    their exact sums, and let (B, c) be the first row after them: every other customer has a bound below B,
    or equal to B and an id from c on, so none of them ranks before a candidate that has a sum above B,
    or equal to B and an id below c. When the limit-th best candidate ranks so, the top `limit` candidates
    are the answer.
    """
    for per_limit in TOP_EARNERS_CANDIDATES_PER_LIMIT:
        wanted = limit * per_limit
        # Room for unmerged versions of a customer, which take rows without adding a customer.
        rows = client.query(TOP_EARNERS_BOUNDS_SQL, parameters={**parameters, "rows": 2 * wanted + 1}).result_rows
        candidates: dict[str, int] = {}
        threshold: tuple[int, str] | None = None
        for customer_id, bound in rows:
            if customer_id in candidates:
                continue
            if len(candidates) == wanted:
                threshold = (bound, customer_id)
                break
            candidates[customer_id] = bound
        if threshold is None and len(rows) == 2 * wanted + 1:
            # Every row read belongs to a candidate: customers not read come after the last row read.
            threshold = (rows[-1][1], rows[-1][0])
        if not candidates:
            return []  # no customer has a row of this year
        ranked = _exact_candidates(client, parameters, list(candidates))
        if threshold is None:
            return ranked[:limit]  # every customer of the year is a candidate
        if len(ranked) >= limit:
            customer_id, points = ranked[limit - 1]
            bound, bound_customer_id = threshold
            if (-points, customer_id) < (-bound, bound_customer_id):
                return ranked[:limit]
    return None


def liability(client: Client, date_from: date, date_to: date, point_value: Decimal) -> list[LiabilityDay]:
    """Outstanding points at the end of each day of the range, and their value at `point_value` each.

    Outstanding is the sum of every customer's available balance, so a customer in debt (negative balance)
    lowers it; pending points are not a liability until confirmed.
    """
    if not isinstance(point_value, Decimal):
        raise TypeError(f"point_value must be a Decimal, got {type(point_value).__name__}")
    status = points_status(client, date_from, date_to, "day")
    return [
        LiabilityDay(
            day=period.period_start,
            outstanding_points=period.outstanding,
            outstanding_value=period.outstanding * point_value,
        )
        for period in status.periods
    ]


def _days(date_from: date, date_to: date) -> list[date]:
    for value in (date_from, date_to):
        if isinstance(value, datetime) or not isinstance(value, date):
            raise TypeError(f"dates must be datetime.date (not datetime), got {value!r}")
    span = (date_to - date_from).days + 1
    if span < 1:
        raise ValueError(f"date_from {date_from} is after date_to {date_to}")
    if span > DAYS_PER_RANGE_MAX:
        raise ValueError(f"a range covers at most {DAYS_PER_RANGE_MAX} days, got {span}")
    return [date_from + timedelta(days=offset) for offset in range(span)]


def _period_start(day: date, granularity: Granularity) -> date:
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    return day.replace(day=1)


def _check_customer_id(customer_id: str) -> None:
    if not isinstance(customer_id, str):
        raise TypeError(f"customer_id must be a string, got {type(customer_id).__name__}")


def _scalar(rows: list[Any]) -> int:
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- points expiring soon (reminder e-mails) -------------------------------------------------------

EXPIRY_DAYS_MAX = 3650
EXPIRING_WITHIN_DAYS_MAX = 3650
EXPIRING_LIMIT_MAX = 100_000

# The rules engine (streams.rules.engine._expire) expires the whole available balance once `days` have
# passed since the customer's last activity: the latest activity moment of its entries, as the state fold keeps
# it (streams.rules.state.activity_moment): an entry of kind earned or redeemed with points != 0 at its time, a
# pending entry with pending_points > 0 at the end of its return window (`available_at`), a confirmed entry with
# points != 0 at its `available_at` (older confirmations without one: at their time). A customer with no such
# entry never expires.
_ACTIVITY = "(kind IN ('earned', 'confirmed', 'redeemed') AND points != 0) OR (kind = 'pending' AND pending_points > 0)"
_ACTIVITY_MOMENT = "if(kind IN ('pending', 'confirmed') AND available_at IS NOT NULL, available_at, occurred_at)"
EXPIRING_INACTIVITY_SQL = f"""
SELECT customer_id, balance, balance AS expiring, last_activity
FROM
(
    SELECT customer_id,
           argMax(balance_after, sequence) AS balance,
           maxIf(assumeNotNull({_ACTIVITY_MOMENT}), {_ACTIVITY}) AS last_activity,
           countIf({_ACTIVITY}) AS activities
    FROM ledger_entries FINAL
    WHERE occurred_at <= {{as_of:DateTime64(6, 'UTC')}}
      AND ({{customer_id:Nullable(String)}} IS NULL OR customer_id = {{customer_id:Nullable(String)}})
    GROUP BY customer_id
)
WHERE balance > 0 AND activities > 0 AND last_activity <= {{awarded_by:DateTime64(6, 'UTC')}}
ORDER BY last_activity, customer_id
LIMIT {{limit:UInt32}}
{FINAL_SETTINGS}
"""

# Expiry by lot, as the state fold keeps lots (streams.rules.state._evolve_lots): every entry with
# points > 0 appends a lot, every entry with points < 0 (redeemed, reversed, expired, adjusted) takes from
# the oldest lots first, and a decrease larger than the lots left (debt) takes only what is there. Taking
# is therefore always a prefix of the lots in `sequence` order, of size `consumed` = all decreases minus
# what fell into debt; what fell into debt is the deepest the running balance ever went below zero (a
# running sum clamped at zero equals the running sum minus its lowest value so far). The engine expires,
# in `sequence` order up to the first lot that is not old enough, what is left of each lot, capped by the
# balance: min(balance, max(0, old lots - consumed)).
EXPIRING_LOT_SQL = f"""
SELECT customer_id, balance, expiring, first_lot_at
FROM
(
    SELECT customer_id,
           argMax(balance_after, sequence) AS balance,
           -sumIf(points, points < 0) - greatest(0, -min(balance_after)) AS consumed,
           arraySort(groupArrayIf((sequence, occurred_at, points), points > 0)) AS lots,
           arrayMap(lot -> lot.2, lots) AS lot_times,
           arrayMap(lot -> lot.3, lots) AS lot_points,
           arrayCumSum(arrayMap(moment -> toUInt32(moment > {{awarded_by:DateTime64(6, 'UTC')}}), lot_times))
               AS younger_seen,
           arraySum((points_of_lot, younger) -> if(younger = 0, points_of_lot, 0), lot_points, younger_seen)
               AS old_points,
           least(balance, greatest(0, old_points - consumed)) AS expiring,
           arrayFirst((moment, running) -> running > consumed, lot_times, arrayCumSum(lot_points)) AS first_lot_at
    FROM ledger_entries FINAL
    WHERE occurred_at <= {{as_of:DateTime64(6, 'UTC')}}
      AND ({{customer_id:Nullable(String)}} IS NULL OR customer_id = {{customer_id:Nullable(String)}})
    GROUP BY customer_id
)
WHERE balance > 0 AND expiring > 0
ORDER BY first_lot_at, customer_id
LIMIT {{limit:UInt32}}
{FINAL_SETTINGS}
"""

EXPIRING_SQL = {"inactivity": EXPIRING_INACTIVITY_SQL, "lot": EXPIRING_LOT_SQL}


@dataclass(frozen=True)
class ExpiringPoints:
    """Points of one customer that expire by the horizon unless the customer acts.

    `expires_at` is when the first of these points expire (it can be before `as_of`: the expiry is due and
    the engine records it at the customer's next event or clock tick). `balance` is the available balance
    at `as_of`; `points` never exceeds it.
    """

    customer_id: str
    points: int
    balance: int
    expires_at: datetime


def expiring_soon(
    client: Client,
    *,
    as_of: datetime,
    within_days: int,
    mode: Literal["inactivity", "lot"],
    days: int,
    limit: int = 1_000,
    customer_id: str | None = None,
) -> list[ExpiringPoints]:
    """Customers whose available points expire by `as_of + within_days`, soonest first, with how many.

    `mode` and `days` are the rule set's expiry settings (`expiry.mode`, `expiry.days`). The ledger is read
    up to `as_of` (entries after it are ignored), so the answer is what the engine would expire at a
    `clock.tick` at the horizon if nothing else happened in between. Pending points are not counted (they
    are not available yet). `customer_id` narrows the answer to one customer.
    """
    if mode not in EXPIRING_SQL:
        raise ValueError(f"mode must be inactivity or lot, got {mode!r}")
    if not isinstance(as_of, datetime) or as_of.tzinfo is None:
        raise ValueError(f"as_of must be a datetime with a UTC offset, got {as_of!r}")
    for name, value, high in (("within_days", within_days, EXPIRING_WITHIN_DAYS_MAX), ("days", days, EXPIRY_DAYS_MAX)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueError(f"{name} must be an integer in 0..{high}, got {value!r}")
    if days < 1:
        raise ValueError("days must be at least 1")
    if not 1 <= limit <= EXPIRING_LIMIT_MAX:
        raise ValueError(f"limit must be in 1..{EXPIRING_LIMIT_MAX}, got {limit}")
    if customer_id is not None:
        _check_customer_id(customer_id)
    as_of = as_of.astimezone(UTC)
    horizon = as_of + timedelta(days=within_days)
    parameters = {
        "as_of": as_of,
        "awarded_by": horizon - timedelta(days=days),
        "customer_id": customer_id,
        "limit": limit,
    }
    result = client.query(EXPIRING_SQL[mode], parameters=parameters)
    return [
        ExpiringPoints(
            customer_id=row_customer,
            points=int(expiring),
            balance=int(current),
            expires_at=_utc(moment) + timedelta(days=days),
        )
        for row_customer, current, expiring, moment in result.result_rows
    ]
