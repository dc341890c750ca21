"""Rebuilding every projection derived from the ledger, into new tables swapped in atomically.

The daily tables (`daily_points`, `daily_product_points`, `daily_customer_points`, and
`two_year_customer_points` made from `daily_customer_points`: every table the sink's `RECOMPUTE_SQL` writes)
are functions of `ledger_entries` alone. `rebuild` recomputes each of them from the
deduplicated ledger into a new table `<name>__rebuild` of the same structure, with the very statements
the sink uses (so a rebuilt table cannot disagree with one the sink kept up to date), then swaps each new
table with the live one in one `EXCHANGE TABLES` statement, and drops the old data. A reader sees either
the old complete table or the new complete table, never a half-filled one.

`EXCHANGE TABLES` needs an Atomic database (the default on a ClickHouse server since 20.10; chDB's default
database supports it too). On a database that refuses it, the fallback is one `RENAME TABLE a TO a__old,
a__rebuild TO a` statement, which leaves a moment in which `a` does not exist (a reader gets an error,
never wrong figures).

Concurrent sink writes: in embedded mode the caller holds the client lock, so the sink waits. When the
sink of another process writes while the rebuild runs (a ClickHouse server), a day it recomputed into the
old table after the new one was filled would be lost by the swap; so after the swap, every day with ledger
rows ingested since the rebuild started (minus a margin for clock skew) is recomputed once more into the
live tables, which is idempotent. That repairs the daily tables; a `two_year_customer_points` row that the
other sink and this catch-up patch at the same moment can keep one of the two patches until the customer's
next entry (both read the same newest row), so on a server run the rebuild through the running system,
which makes its projector wait (docs/replay.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from projections.sink import DAYS_PER_RECOMPUTE_MAX, RECOMPUTE_SQL

__all__ = ["REBUILT_TABLES", "RebuildFailed", "rebuild"]

REBUILD_SUFFIX = "__rebuild"
OLD_SUFFIX = "__old"
INGESTION_MARGIN = timedelta(seconds=60)
DAYS_REBUILT_MAX = 100_000  # about 270 years of daily rows: a bound, not an expected size

_INSERT_TARGET = re.compile(r"^\s*INSERT INTO (\w+)\s")


def _target(statement: str) -> str:
    match = _INSERT_TARGET.match(statement)
    assert match is not None, f"a recompute statement must start with INSERT INTO <table>: {statement[:60]!r}"
    return match.group(1)


# Every table the sink derives from the ledger, in the order of its statements.
REBUILT_TABLES: tuple[str, ...] = tuple(dict.fromkeys(_target(statement) for statement in RECOMPUTE_SQL))
_READ_SOURCE = re.compile(r"\bFROM (" + "|".join(REBUILT_TABLES) + r")\b")


class RebuildFailed(RuntimeError):
    """The rebuild stopped before the swap; the live tables are unchanged."""


def rebuild(
    client: Client, *, progress: Callable[[str], None] | None = None, writers_excluded: bool = False
) -> dict[str, Any]:
    """Recompute every derived table from `ledger_entries` and swap the results in; return a report.

    `writers_excluded`: no sink can write meanwhile (the running system holds its client lock throughout), so
    the catch-up after the swap has nothing to repair and is skipped.

    The report: `tables` (name -> rows before and after), `days` (distinct ledger days recomputed),
    `swap` (`exchange` or `rename`), `days_caught_up` (days recomputed again after the swap because the
    sink wrote meanwhile) and `seconds`.
    """
    started = time.monotonic()
    say = progress or (lambda message: None)
    existing = _existing_tables(client)
    missing = [table for table in ("ledger_entries", *REBUILT_TABLES) if table not in existing]
    if missing:
        raise RebuildFailed(f"tables {missing} do not exist: run `loyalty projections migrate` first")
    ingested_since = client.query("SELECT now64(3)").result_rows[0][0] - INGESTION_MARGIN
    rows_before = {table: _rows(client, table) for table in REBUILT_TABLES}

    days = [
        row[0]
        for row in client.query(
            "SELECT DISTINCT toDate(occurred_at) AS day FROM ledger_entries ORDER BY day"
        ).result_rows
    ]
    if len(days) > DAYS_REBUILT_MAX:
        raise RebuildFailed(f"the ledger spans {len(days)} days, more than the bound of {DAYS_REBUILT_MAX}")
    try:
        for table in REBUILT_TABLES:
            client.command(f"DROP TABLE IF EXISTS {table}{REBUILD_SUFFIX} SYNC")
            client.command(f"CREATE TABLE {table}{REBUILD_SUFFIX} AS {table}")
        tables = ", ".join(table + REBUILD_SUFFIX for table in REBUILT_TABLES)
        say(f"recomputing {len(days)} {'day' if len(days) == 1 else 'days'} into {tables}")
        _recompute(client, days, suffix=REBUILD_SUFFIX)
    except ClickHouseError as error:
        _drop_new_tables(client)
        raise RebuildFailed(f"the rebuild failed before the swap, nothing changed: {str(error)[:300]}") from error
    except KeyboardInterrupt:  # no half-filled `__rebuild` table left for a query to read
        _drop_new_tables(client)
        raise

    swap = _swap(client)
    say(f"swapped in the rebuilt tables ({swap})")
    for table in REBUILT_TABLES:
        leftover = f"{table}{REBUILD_SUFFIX}" if swap == "exchange" else f"{table}{OLD_SUFFIX}"
        client.command(f"DROP TABLE IF EXISTS {leftover} SYNC")

    caught_up = (
        []
        if writers_excluded
        else [
            row[0]
            for row in client.query(
                "SELECT DISTINCT toDate(occurred_at) AS day FROM ledger_entries "
                "WHERE ingested_at >= {since:DateTime64(3, 'UTC')} ORDER BY day",
                parameters={"since": ingested_since},
            ).result_rows
        ]
    )
    _recompute(client, caught_up, suffix="")
    return {
        "tables": {
            table: {"rows_before": rows_before[table], "rows_after": _rows(client, table)} for table in REBUILT_TABLES
        },
        "days": len(days),
        "swap": swap,
        "days_caught_up": len(caught_up),
        "seconds": round(time.monotonic() - started, 3),
    }


def _recompute(client: Client, days: list[date], *, suffix: str) -> None:
    for start in range(0, len(days), DAYS_PER_RECOMPUTE_MAX):
        window = days[start : start + DAYS_PER_RECOMPUTE_MAX]
        parameters = {"day_first": window[0], "day_last": window[-1], "days": window}
        for statement in _retargeted(suffix):
            client.command(statement, parameters=parameters)


def _retargeted(suffix: str) -> list[str]:
    """The sink's recompute statements, writing into `<table><suffix>` instead of `<table>`, and reading
    `<table><suffix>` where they read a rebuilt table (two_year_customer_points is computed from the
    daily_customer_points rows just rebuilt, not from the live ones)."""
    if not suffix:
        return list(RECOMPUTE_SQL)
    statements = []
    for statement in RECOMPUTE_SQL:
        statement = _INSERT_TARGET.sub(f"INSERT INTO {_target(statement)}{suffix} ", statement, count=1)
        statement = _READ_SOURCE.sub(lambda match: f"FROM {match.group(1)}{suffix}", statement)
        statements.append(statement)
    return statements


def _swap(client: Client) -> str:
    pairs = ", ".join(f"{table} AND {table}{REBUILD_SUFFIX}" for table in REBUILT_TABLES)
    try:
        client.command(f"EXCHANGE TABLES {pairs}")
        return "exchange"
    except ClickHouseError as error:
        if "EXCHANGE" not in str(error).upper() and "NOT_IMPLEMENTED" not in str(error).upper():
            raise
    renames = ", ".join(
        f"{table} TO {table}{OLD_SUFFIX}, {table}{REBUILD_SUFFIX} TO {table}" for table in REBUILT_TABLES
    )
    client.command(f"RENAME TABLE {renames}")
    return "rename"


def _drop_new_tables(client: Client) -> None:
    for table in REBUILT_TABLES:
        try:
            client.command(f"DROP TABLE IF EXISTS {table}{REBUILD_SUFFIX} SYNC")
        except ClickHouseError:
            pass  # the error that stopped the rebuild is the one worth reporting


def _existing_tables(client: Client) -> set[str]:
    return {
        row[0] for row in client.query("SELECT name FROM system.tables WHERE database = currentDatabase()").result_rows
    }


def _rows(client: Client, table: str) -> int:
    return int(client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0])
