"""The ledger sink: batched, idempotent inserts of ledger entries into ClickHouse, with the Kafka offsets.

Exactly-once effect on at-least-once delivery, without transactions (ClickHouse has none across tables):

1. `ledger_entries` is a ReplacingMergeTree whose sorting key ends with `entry_id`, so a re-inserted
   entry collapses with its first copy (queries read it with FINAL).
2. The daily aggregates (daily_points, daily_product_points, daily_customer_points) are *recomputed*
   from `ledger_entries FINAL` for every day the batch touched (and those days are replaced in the rows of
   two_year_customer_points by their new daily_customer_points rows), never incremented, so re-inserting a
   batch (or any part of it) recomputes the same numbers. Every write has its days marked in `dirty_days`
   before inserting its rows (a day its sink holds dirty already is not marked again); one that recomputes at
   once marks them clean after, one that defers the recompute leaves them for a later recompute (see
   `LedgerSink`).
3. The offsets are written last. A crash before step 3 makes the restarted projector resume from the older
   offsets and write the same entries again, which steps 1 and 2 make harmless. A crash after step 3
   loses nothing, since the rows (and the recompute or the dirty marks) were stored first.

Why not insert deduplication tokens on a plain MergeTree plus a SummingMergeTree view: a token dedupes
only an identical retried block. After a restart the consumer re-reads from the stored offset and the
batch boundaries differ (different size, interleaved partitions), so the retried entries arrive in a
different block with a different token and are counted twice. Deduplicating by entry id does not depend
on how entries were batched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date
from typing import Any

import pyarrow
import pyarrow.compute
import pyarrow.json
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

from schemas.ledger import Kind, LedgerEntry, Source

__all__ = ["LEDGER_ARROW_SCHEMA", "LEDGER_COLUMNS", "IdempotencyConflict", "LedgerSink", "PreparedJson"]

LEDGER_COLUMNS: tuple[str, ...] = tuple(LedgerEntry.model_fields)

# The ledger topic's JSON as Arrow reads it (one field per LedgerEntry field, in order; checked by a test).
# Timestamps are read as text first: Arrow's reader takes a time without a UTC offset as UTC, where
# LedgerEntry's path refuses it, so the offset is checked before the text is cast.
_TIMESTAMP = pyarrow.timestamp("us", tz="UTC")
_TIMESTAMP_COLUMNS = ("occurred_at", "available_at")
_WITH_OFFSET = r"(Z|[+-]\d\d:\d\d)$"
LEDGER_ARROW_SCHEMA = pyarrow.schema(
    [
        ("entry_id", pyarrow.string()),
        ("customer_id", pyarrow.string()),
        ("store_id", pyarrow.string()),
        ("kind", pyarrow.string()),
        ("sequence", pyarrow.uint64()),
        ("points", pyarrow.int64()),
        ("balance_after", pyarrow.int64()),
        ("pending_points", pyarrow.int64()),
        ("pending_after", pyarrow.int64()),
        ("source", pyarrow.string()),
        ("rule_id", pyarrow.string()),
        ("ruleset_version", pyarrow.string()),
        ("caused_by", pyarrow.string()),
        ("event_type", pyarrow.string()),
        ("fingerprint", pyarrow.string()),
        ("occurred_at", _TIMESTAMP),
        ("order_id", pyarrow.string()),
        ("sku", pyarrow.string()),
        ("category", pyarrow.string()),
        ("quantity", pyarrow.int64()),
        ("amount", pyarrow.string()),
        ("reference", pyarrow.string()),
        ("available_at", _TIMESTAMP),
        ("explanation", pyarrow.string()),
        ("schema_version", pyarrow.uint8()),
    ]
)
_REQUIRED_COLUMNS = tuple(
    name for name, field in LedgerEntry.model_fields.items() if not (field.default is None and not field.is_required())
)
_KINDS = pyarrow.array([kind.value for kind in Kind])
_SOURCES = pyarrow.array([source.value for source in Source])
_JSON_SCHEMA = pyarrow.schema(
    [
        pyarrow.field(field.name, pyarrow.string()) if field.name in _TIMESTAMP_COLUMNS else field
        for field in LEDGER_ARROW_SCHEMA
    ]
)
_JSON_PARSE_OPTIONS = pyarrow.json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="error")
# A retried or re-emitted entry is deduplicated by entry id (ReplacingMergeTree, read with FINAL); the
# insert-time dedupe of each block only costs time (inserts ran 250-320k rows/s with it, 450-500k without).
INSERT_SETTINGS = {"optimize_on_insert": 0}
BATCH_ROWS_MAX_LIMIT = 1_000_000
DAYS_PER_RECOMPUTE_MAX = 400
# A batch of at most this many customers patches only their two-year rows (their ids are a query parameter, which
# a ClickHouse server receives in the URL); a larger one patches every customer of its days.
CUSTOMERS_PER_PATCH_MAX = 2_000

RECOMPUTE_DAILY_POINTS_SQL = """
INSERT INTO daily_points
    (day, store_id, kind, source, rule_id, category,
     points, points_positive, pending_points, entries, entries_positive)
SELECT
    toDate(occurred_at) AS day, store_id, kind, source, rule_id,
    ifNull(category, '') AS category_key,
    sum(points), sumIf(points, points > 0), sum(pending_points), count(), countIf(points > 0)
FROM ledger_entries FINAL
WHERE toDate(occurred_at) >= {day_first:Date} AND toDate(occurred_at) <= {day_last:Date}
  AND toDate(occurred_at) IN {days:Array(Date)}
GROUP BY day, store_id, kind, source, rule_id, category_key
SETTINGS do_not_merge_across_partitions_select_final = 1
"""

RECOMPUTE_DAILY_PRODUCT_POINTS_SQL = """
INSERT INTO daily_product_points (day, kind, sku, points, entries)
SELECT toDate(occurred_at) AS day, kind, ifNull(sku, '') AS sku_key, sum(points), count()
FROM ledger_entries FINAL
WHERE toDate(occurred_at) >= {day_first:Date} AND toDate(occurred_at) <= {day_last:Date}
  AND toDate(occurred_at) IN {days:Array(Date)}
  AND kind IN ('earned', 'confirmed', 'adjusted') AND points > 0
GROUP BY day, kind, sku_key
SETTINGS do_not_merge_across_partitions_select_final = 1
"""

# Only earned and confirmed points make a top earner (adjustments are not earnings).
RECOMPUTE_DAILY_CUSTOMER_POINTS_SQL = """
INSERT INTO daily_customer_points (day, customer_id, points_earned, entries)
SELECT toDate(occurred_at) AS day, customer_id, sum(points), count()
FROM ledger_entries FINAL
WHERE toDate(occurred_at) >= {day_first:Date} AND toDate(occurred_at) <= {day_last:Date}
  AND toDate(occurred_at) IN {days:Array(Date)}
  AND kind IN ('earned', 'confirmed')
GROUP BY day, customer_id
SETTINGS do_not_merge_across_partitions_select_final = 1
"""

# After daily_customer_points, from it: the (year, customer) rows of two_year_customer_points of the customers with a
# row on a recomputed day (see migration 0007; a day is in the rows of its year and of the year before). Each such
# row is patched, not recomputed from its two years: the recomputed days of its newest version are replaced by their
# rows just written to daily_customer_points (the newest version by argMax, not FINAL, which was twice as slow with
# a few unmerged parts). So the cost follows the customers touched: reading their whole year from
# daily_customer_points, which is ordered by day, scanned every day row of the year (200-300 ms per recompute at
# 10M ledger rows, 1M customers), where patching the one-year rows of the 50 or 500 customers of a batch took 30 or
# 50-65 ms, insert included. A patch writes the same row however often it is repeated, and days of a customer's
# row are never removed (daily rows only grow with the ledger). It reads the table the statement before it wrote,
# so it must stay after it. `{customers}` restricts it to some customers (see below).
_YEARLY_PATCH_SQL = """
INSERT INTO two_year_customer_points (year, customer_id, points_bound, entries, days, day_points, day_entries)
SELECT year, customer_id,
       arraySum((points, day_of) -> if(toYear(day_of) = year, greatest(points, 0), 0), all_points, all_days),
       arraySum(all_entries),
       arraySort(all_days),
       arraySort((points, day_of) -> day_of, all_points, all_days),
       arraySort((count, day_of) -> day_of, all_entries, all_days)
FROM
(
    SELECT fresh.year AS year, fresh.customer_id AS customer_id,
           arrayConcat(arrayFilter(day_of -> NOT has({{days:Array(Date)}}, day_of), old.days), fresh.days) AS all_days,
           arrayConcat(
               arrayFilter((points, day_of) -> NOT has({{days:Array(Date)}}, day_of), old.day_points, old.days),
               fresh.day_points
           ) AS all_points,
           arrayConcat(
               arrayFilter((count, day_of) -> NOT has({{days:Array(Date)}}, day_of), old.day_entries, old.days),
               fresh.day_entries
           ) AS all_entries
    FROM
    (
        SELECT year, customer_id,
               groupArray(day) AS days, groupArray(points_earned) AS day_points, groupArray(entries) AS day_entries
        FROM
        (
            SELECT arrayJoin([toUInt16(toYear(day) - 1), toYear(day)]) AS year, customer_id, day, points_earned, entries
            FROM daily_customer_points FINAL
            WHERE day >= {{day_first:Date}} AND day <= {{day_last:Date}} AND day IN {{days:Array(Date)}}{customers}
        )
        GROUP BY year, customer_id
    ) AS fresh
    LEFT JOIN
    (
        SELECT year, customer_id,
               argMax(days, entries) AS days, argMax(day_points, entries) AS day_points,
               argMax(day_entries, entries) AS day_entries
        FROM two_year_customer_points
        WHERE year >= toYear({{day_first:Date}}) - 1 AND year <= toYear({{day_last:Date}})
          AND customer_id IN {touched}
        GROUP BY year, customer_id
    ) AS old ON old.year = fresh.year AND old.customer_id = fresh.customer_id
)
SETTINGS do_not_merge_across_partitions_select_final = 1, join_use_nulls = 0
"""
# Every customer with a row on a recomputed day: after deferred writes, at start, in a rebuild.
RECOMPUTE_YEARLY_CUSTOMER_POINTS_SQL = _YEARLY_PATCH_SQL.format(
    customers="",
    touched="(SELECT customer_id FROM daily_customer_points "
    "WHERE day >= {day_first:Date} AND day <= {day_last:Date} AND day IN {days:Array(Date)})",
)
# Only the customers of the batch just written, when no day was left dirty: nobody else's daily rows changed.
# This is the projector's path when it keeps up, where a recompute of today alone would otherwise patch every
# customer active today, at every flush.
RECOMPUTE_YEARLY_CUSTOMER_POINTS_OF_SQL = _YEARLY_PATCH_SQL.format(
    customers=" AND customer_id IN {customers:Array(String)}",
    touched="{customers:Array(String)}",
)

RECOMPUTE_SQL = (
    RECOMPUTE_DAILY_POINTS_SQL,
    RECOMPUTE_DAILY_PRODUCT_POINTS_SQL,
    RECOMPUTE_DAILY_CUSTOMER_POINTS_SQL,
    RECOMPUTE_YEARLY_CUSTOMER_POINTS_SQL,
)
# The same, after a batch whose customers are known and no day was left dirty.
RECOMPUTE_OF_SQL = (*RECOMPUTE_SQL[:-1], RECOMPUTE_YEARLY_CUSTOMER_POINTS_OF_SQL)


class IdempotencyConflict(ValueError):
    """One batch holds two different entries under the same entry id (the rules engine broke its contract)."""


class PreparedJson(Sequence[bytes]):
    """Ledger messages (a sequence of their bytes) with the Arrow table `LedgerSink.prepare_json` parsed and checked
    from them; `table` is None when a check failed (the write then takes the per-entry path, which names the
    message). Made without I/O and without the sink, so a caller can prepare one batch while another is written."""

    __slots__ = ("_values", "table")

    def __init__(self, values: Sequence[bytes], table: pyarrow.Table | None) -> None:
        self._values = values
        self.table = table

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index):  # type: ignore[override]
        return self._values[index]


class LedgerSink:
    """Writes batches of ledger entries and the offsets they came from; see the module docstring.

    `batch_rows_max` (default 20000, the setting `LOYALTY_SINK_BATCH_ROWS_MAX`) bounds the rows of one
    INSERT; a larger `write` is split into several inserts before the offsets are recorded.
    The schema must exist (`projections.schema.migrate`).

    A write with `defer_recompute=True` does not recompute the daily aggregates of the days it touched: it
    marks them in `dirty_days` (before the offsets), and the next write without it (or `recompute_dirty`)
    recomputes them, once for any number of deferred writes. The projector defers while it drains a
    backlog, so each day is recomputed once per catch-up instead of once per batch (a batch touching
    every day made the per-batch recompute cost grow with the ledger). Days left dirty by a crash are
    recomputed by the next sink's first recompute.
    """

    def __init__(self, client: Client, *, batch_rows_max: int = 20_000) -> None:
        if not 1 <= batch_rows_max <= BATCH_ROWS_MAX_LIMIT:
            raise ValueError(f"batch_rows_max must be in 1..{BATCH_ROWS_MAX_LIMIT}, got {batch_rows_max}")
        self._client = client
        self._batch_rows_max = batch_rows_max
        self._dirty: set[date] = set()
        self._dirty_loaded = False
        self._last_version = 0

    @property
    def dirty_days(self) -> int:
        """Days whose aggregates are behind the ledger because writes deferred their recompute."""
        return len(self._dirty)

    def write(
        self,
        entries: Iterable[LedgerEntry | Mapping[str, Any]],
        offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        defer_recompute: bool = False,
    ) -> int:
        """Store `entries`, then `offsets` ((topic, partition) -> next offset to read). Return the row count.

        Writing the same entries again changes no number. Entries may be LedgerEntry models or dicts of
        the same fields (validated here, before any I/O).
        """
        offset_rows = _offset_rows(offsets or {})
        unique = _unique_entries(entries)
        columns = _columns(unique)
        days = {entry.occurred_at.date() for entry in unique}
        only = self._mark_written(days, defer_recompute, {entry.customer_id for entry in unique})
        for start in range(0, len(unique), self._batch_rows_max):
            chunk = [column[start : start + self._batch_rows_max] for column in columns]
            self._client.insert(
                "ledger_entries", chunk, column_names=LEDGER_COLUMNS, column_oriented=True, settings=INSERT_SETTINGS
            )
        if not defer_recompute:
            self._recompute(days, only)
        self._store_offsets(offset_rows)
        return len(unique)

    @staticmethod
    def prepare_json(values: Sequence[bytes]) -> PreparedJson:
        """Parse and check ledger messages for `write_json`, without I/O (see `write_json`).

        The projector prepares the next batch in a thread while the previous one is being written: parsing is
        about half the CPU of a write, and the insert runs in ClickHouse's threads meanwhile. Nothing of a batch
        is written before all of it is checked.
        """
        table = _arrow_table(values) if values else None
        # The reader returns one chunk per 1 MB block it parsed (on both cores); sent as they are, they reach
        # ClickHouse as a dozen record batches that it converts and squashes one by one. One contiguous chunk
        # costs a copy here (about 2 ms for 20,000 rows) and saves about a fifth of the insert's time.
        return PreparedJson(values, None if table is None else table.combine_chunks())

    def write_json(
        self,
        values: Sequence[bytes],
        offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        defer_recompute: bool = False,
    ) -> int:
        """`write` for entries as the ledger topic holds them: one JSON document per entry (the projector's path).

        Arrow's C++ JSON reader builds the columns and the insert sends them as one Arrow block, so no
        Python object is made per entry. The columns are checked as `LedgerEntry` would check them (types,
        required fields, kind and source values, schema version); a batch that fails a check, or that holds
        one entry id twice (a re-emitted entry, which must be compared with its first copy), takes the
        per-entry path of `write`, which names the offending message. `values` may be a batch `prepare_json`
        made (parsed and checked already). Return the number of distinct entries.
        """
        offset_rows = _offset_rows(offsets or {})
        if not values:
            if not defer_recompute:
                self._recompute(set(), None)
            self._store_offsets(offset_rows)
            return 0
        prepared = values if isinstance(values, PreparedJson) else self.prepare_json(values)
        table = prepared.table
        if table is None:
            return self.write(_validated(prepared), offsets, defer_recompute=defer_recompute)
        days = set(pyarrow.compute.unique(pyarrow.compute.cast(table["occurred_at"], pyarrow.date32())).to_pylist())
        customers = set() if defer_recompute else set(pyarrow.compute.unique(table["customer_id"]).to_pylist())
        only = self._mark_written(days, defer_recompute, customers)
        for start in range(0, table.num_rows, self._batch_rows_max):
            self._client.insert_arrow(
                "ledger_entries", table.slice(start, self._batch_rows_max), settings=INSERT_SETTINGS
            )
        if not defer_recompute:
            self._recompute(days, only)
        self._store_offsets(offset_rows)
        return table.num_rows

    def recompute_dirty(self, days: set[date] | None = None) -> int:
        """Recompute the aggregates of `days` and of every dirty day (this sink's, and those a crashed sink
        left); return how many days were recomputed."""
        return self._recompute(days or set(), None)

    def _recompute(self, days: set[date], only_customers: set[str] | None) -> int:
        """`recompute_dirty`; `only_customers`: patch the two-year rows of these customers alone (see
        `_mark_written`), else of every customer with a row on a recomputed day."""
        self._load_dirty()
        dirty = set(self._dirty)
        every = dirty | days
        if not every:
            return 0
        started_at = self._next_version()  # a day marked dirty again after this point stays dirty
        self._recompute_aggregates(every, only_customers)
        if dirty:
            try:
                self._mark(dirty, dirty=False, version=started_at)
            except Exception:
                # The mark may have reached the table all the same (an answer lost on the way): then a later write
                # on these days, trusting this sink's "dirty already", would not mark them again, and a crash before
                # its recompute would leave them clean and stale. Read the table's dirty days again instead.
                self._dirty.clear()
                self._dirty_loaded = False
                raise
        self._dirty -= dirty
        return len(every)

    def _mark_written(self, days: set[date], defer: bool, customers: set[str]) -> set[str] | None:
        """Before a batch's rows are inserted: have its days marked dirty, deferred or not. A crash between the insert
        and the recompute then leaves them dirty, and the next sink recomputes them for every customer (a
        restarted projector may never read that batch again: an embedded broker forgets its log).

        Returns the customers whose two-year rows alone the batch's own recompute may patch: the batch's, when
        it recomputes at once, no day was dirty before it and they are few; else None (every customer of the
        days).
        """
        if not days:
            return None
        self._load_dirty()
        # A day dirty already (a deferred write, a failed attempt) may hold rows of customers not in this batch.
        dirty_before = bool(self._dirty)
        # A day this sink holds dirty is dirty in the table too (marked by this sink, or left by an earlier one and
        # loaded), and stays so until this sink's own recompute marks it clean: the projector is the only writer
        # (docs/operations.md). So only the days not dirty yet are marked: on a backlog, where every batch touches
        # the same days, that is one small INSERT (a part of its own, 5-10 ms here) for the first batch instead
        # of one per batch.
        fresh = days - self._dirty
        if fresh:
            self._mark(fresh, dirty=True, version=self._next_version())
            self._dirty |= fresh
        if defer or dirty_before or len(customers) > CUSTOMERS_PER_PATCH_MAX:
            return None
        return customers

    def _load_dirty(self) -> None:
        """Once per sink: the days other sinks left dirty, and the newest mark's version."""
        if self._dirty_loaded:
            return
        rows = self._client.query("SELECT day FROM dirty_days FINAL WHERE dirty = 1").result_rows
        self._dirty.update(day for (day,) in rows)
        self._last_version = int(self._client.command("SELECT max(version) FROM dirty_days"))
        self._dirty_loaded = True

    def _next_version(self) -> int:
        """Nanoseconds of the clock, but always above every earlier mark, even one made by a sink on another
        host whose clock was ahead: a later mark must win over an earlier one."""
        self._last_version = max(time.time_ns(), self._last_version + 1)
        return self._last_version

    def _mark(self, days: set[date], *, dirty: bool, version: int) -> None:
        ordered = sorted(days)
        self._client.insert(
            "dirty_days",
            [ordered, [int(dirty)] * len(ordered), [version] * len(ordered)],
            column_names=("day", "dirty", "version"),
            column_oriented=True,
        )

    def _store_offsets(self, offset_rows: list[tuple[str, int, int]]) -> None:
        if offset_rows:
            self._client.insert(
                "sink_offsets",
                [list(column) for column in zip(*offset_rows, strict=True)],
                column_names=("topic", "partition", "next_offset"),
                column_oriented=True,
            )

    def resume_offsets(self) -> dict[tuple[str, int], int]:
        """The stored position per (topic, partition): the next offset to consume."""
        result = self._client.query(
            "SELECT topic, partition, max(next_offset) FROM sink_offsets GROUP BY topic, partition"
        )
        return {(topic, partition): next_offset for topic, partition, next_offset in result.result_rows}

    def _recompute_aggregates(self, days: set[date], customers: set[str] | None) -> None:
        # occurred_at is UTC-aware and the column is UTC, so .date() of a UTC-normalised value is the
        # same day that toDate(occurred_at) computes in ClickHouse.
        ordered = sorted(days)
        statements = RECOMPUTE_SQL if customers is None else RECOMPUTE_OF_SQL
        for start in range(0, len(ordered), DAYS_PER_RECOMPUTE_MAX):
            window = ordered[start : start + DAYS_PER_RECOMPUTE_MAX]
            parameters: dict[str, Any] = {"day_first": window[0], "day_last": window[-1], "days": window}
            if customers is not None:
                parameters["customers"] = sorted(customers)
            for statement in statements:
                self._client.command(statement, parameters=parameters)


def _unique_entries(entries: Iterable[LedgerEntry | Mapping[str, Any]]) -> list[LedgerEntry]:
    by_id: dict[str, LedgerEntry] = {}
    for item in entries:
        entry = item if isinstance(item, LedgerEntry) else LedgerEntry.model_validate(item)
        entry = _in_utc(entry)
        seen = by_id.get(entry.entry_id)
        if seen is None:
            by_id[entry.entry_id] = entry
        elif seen != entry:
            raise IdempotencyConflict(f"entry id {entry.entry_id!r} appears twice with different content")
    return list(by_id.values())


def _arrow_table(values: Sequence[bytes]) -> pyarrow.Table | None:
    """The batch as an Arrow table, or None when a check fails or an entry id repeats (see `write_json`)."""
    # With no empty message, one row per message proves one document per message. `bytes.isspace` refuses
    # anything but bytes (a tombstone's None, a str) with a TypeError, and `all`/`map` keep the loop in C.
    try:
        if not all(values) or any(map(bytes.isspace, values)):
            return None
    except TypeError:
        return None
    joined = b"\n".join(values)
    try:
        # A BufferReader lets the reader slice the joined bytes in place; a BytesIO is read through Python calls.
        table = pyarrow.json.read_json(pyarrow.BufferReader(joined), parse_options=_JSON_PARSE_OPTIONS)
    except pyarrow.ArrowInvalid:
        return None
    if table.num_rows != len(values):
        return None  # a message holding several documents
    # Arrow's JSON reader does not check UTF-8; `validate(full=True)` does. Every string it read is a piece of
    # the input, or made from one by an escape: so when the input is ASCII and holds no backslash at all (the
    # ledger as the worker writes it), every string is ASCII, which is valid UTF-8. Both tests run in C at
    # memory speed (well under 1 ms for 20,000 messages), against about 2 ms for the validation.
    if not (joined.isascii() and joined.find(b"\\") < 0):
        try:
            table.validate(full=True)
        except pyarrow.ArrowInvalid:
            return None
    for name in _TIMESTAMP_COLUMNS:
        text = table[name]
        if (
            text.null_count < len(text)
            # The worker writes UTC times with a Z (pydantic); a suffix test is 10 times cheaper than the regex.
            and not pyarrow.compute.all(pyarrow.compute.ends_with(text, "Z")).as_py()
            and not pyarrow.compute.all(pyarrow.compute.match_substring_regex(text, _WITH_OFFSET)).as_py()
        ):
            return None  # a time without its UTC offset
        try:
            table = table.set_column(table.schema.get_field_index(name), name, pyarrow.compute.cast(text, _TIMESTAMP))
        except pyarrow.ArrowInvalid:
            return None
    if any(table[name].null_count for name in _REQUIRED_COLUMNS):
        return None
    if not pyarrow.compute.all(pyarrow.compute.is_in(table["kind"], value_set=_KINDS)).as_py():
        return None
    if not pyarrow.compute.all(pyarrow.compute.is_in(table["source"], value_set=_SOURCES)).as_py():
        return None
    if not pyarrow.compute.all(pyarrow.compute.equal(table["schema_version"], 1)).as_py():
        return None
    if pyarrow.compute.count_distinct(table["entry_id"]).as_py() != table.num_rows:
        return None
    return table


def _validated(values: Sequence[bytes]) -> list[LedgerEntry]:
    entries = []
    for number, value in enumerate(values):
        if not isinstance(value, bytes):
            raise ValueError(f"ledger message {number} of the batch has no value (got {type(value).__name__})")
        try:
            entries.append(LedgerEntry.model_validate_json(value))
        except ValidationError as error:
            raise ValueError(f"ledger message {number} of the batch is not a valid ledger entry: {error}") from error
    return entries


def _in_utc(entry: LedgerEntry) -> LedgerEntry:
    changes = {}
    for name in _TIMESTAMP_COLUMNS:
        value = getattr(entry, name)
        if value is None:
            continue
        if value.tzinfo is None:
            raise ValueError(f"entry {entry.entry_id!r}: {name} must carry a UTC offset, got {value}")
        if value.utcoffset():
            changes[name] = value.astimezone(UTC)
    return entry.model_copy(update=changes) if changes else entry


def _columns(entries: list[LedgerEntry]) -> list[list[Any]]:
    rows = [entry.__dict__ for entry in entries]
    return [[row[name] for row in rows] for name in LEDGER_COLUMNS]


def _offset_rows(offsets: Mapping[tuple[str, int], int]) -> list[tuple[str, int, int]]:
    rows = []
    for key, next_offset in offsets.items():
        topic, partition = key
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"offset key {key!r}: topic must be a non-empty string")
        if not isinstance(partition, int) or partition < 0:
            raise ValueError(f"offset key {key!r}: partition must be an integer >= 0")
        if not isinstance(next_offset, int) or next_offset < 0:
            raise ValueError(f"offset of {key!r} must be an integer >= 0, got {next_offset!r}")
        rows.append((topic, partition, next_offset))
    return rows
