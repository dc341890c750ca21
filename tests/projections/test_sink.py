"""The ledger sink is idempotent and resumes exactly after a crash between rows and offsets."""

from __future__ import annotations

from datetime import date

import pytest

from projections import IdempotencyConflict, LedgerSink, connect, migrate
from projections.queries import balance, balances, point_sources, points_status, top_earners
from projections.schema import migrations
from projections.sink import LEDGER_COLUMNS
from schemas.ledger import LedgerEntry

TOPIC = "loyalty.ledger"


def dashboard(client):
    """Every figure the projections serve, to compare before and after a retry."""
    return (
        balances(client),
        [balance(client, customer) for customer in ("alice", "bob", "carol")],
        points_status(client, date(2023, 12, 1), date(2024, 2, 29), "week"),
        point_sources(client, date(2023, 12, 1), date(2024, 2, 29), "category"),
        top_earners(client, date(2023, 12, 1), date(2024, 2, 29)),
    )


def test_writing_the_same_batch_twice_changes_no_number(client, scenario):
    sink = LedgerSink(client)
    sink.write(scenario, {(TOPIC, 0): 15})
    before = dashboard(client)
    sink.write(scenario, {(TOPIC, 0): 15})
    assert dashboard(client) == before
    assert before[0] == {"alice": 115, "bob": -130, "carol": 310}


def test_a_retry_with_different_batch_boundaries_changes_no_number(client, scenario):
    LedgerSink(client).write(scenario)
    before = dashboard(client)
    LedgerSink(client, batch_rows_max=4).write(list(reversed(scenario[3:11])))
    assert dashboard(client) == before
    stored = client.query("SELECT count(), uniqExact(entry_id) FROM ledger_entries").result_rows[0]
    assert stored == (len(scenario) + 8, len(scenario))  # duplicates stored, but never counted


def test_duplicates_inside_one_batch_are_written_once(client, scenario):
    assert LedgerSink(client).write(scenario + scenario[:5]) == len(scenario)


def test_a_sink_killed_after_the_rows_resumes_from_the_stored_offsets(chdb_dsn, client, scenario):
    first, second = scenario[:8], scenario[8:]
    sink = LedgerSink(client)
    sink.write(first, {(TOPIC, 0): 8, (TOPIC, 1): 3})
    # The crash: half of the next batch reached ledger_entries; the aggregates and offsets did not.
    half = second[: len(second) // 2]
    client.insert(
        "ledger_entries",
        [[entry.__dict__[name] for entry in half] for name in LEDGER_COLUMNS],
        column_names=LEDGER_COLUMNS,
        column_oriented=True,
    )
    client.close()

    restarted = connect(chdb_dsn)
    try:
        sink = LedgerSink(restarted)
        assert sink.resume_offsets() == {(TOPIC, 0): 8, (TOPIC, 1): 3}
        sink.write(second, {(TOPIC, 0): 15, (TOPIC, 1): 3})
        assert sink.resume_offsets() == {(TOPIC, 0): 15, (TOPIC, 1): 3}
        assert balances(restarted) == {"alice": 115, "bob": -130, "carol": 310}
        assert points_status(restarted, date(2024, 1, 1), date(2024, 1, 31), "month").totals.issued == 700
    finally:
        restarted.close()


def test_a_stale_offset_never_moves_the_position_back(client, scenario):
    sink = LedgerSink(client)
    sink.write(scenario, {(TOPIC, 0): 15})
    sink.write(scenario[:3], {(TOPIC, 0): 3})
    assert sink.resume_offsets() == {(TOPIC, 0): 15}


def test_a_reused_entry_id_with_other_content_is_rejected_before_writing(client, scenario):
    changed = scenario[0].model_copy(update={"points": 999})
    with pytest.raises(IdempotencyConflict):
        LedgerSink(client).write([*scenario, changed])
    assert balances(client) == {}


def test_entries_may_be_dicts_of_the_ledger_fields(client, scenario):
    LedgerSink(client).write([entry.model_dump(mode="json") for entry in scenario])
    assert balances(client) == {"alice": 115, "bob": -130, "carol": 310}


@pytest.mark.parametrize(
    ("offsets", "batch_rows_max"),
    [({(TOPIC, -1): 5}, 10), ({(TOPIC, 0): -5}, 10), ({("", 0): 5}, 10), ({}, 0)],
)
def test_sink_misuse_raises_before_any_write(offsets, batch_rows_max):
    class NoClient:
        def __getattr__(self, name):
            raise AssertionError("no write may happen")

    with pytest.raises(ValueError):
        LedgerSink(NoClient(), batch_rows_max=batch_rows_max).write([], offsets)


def test_migrate_is_idempotent(client):
    assert migrate(client) == []
    versions = client.query("SELECT version FROM schema_migrations ORDER BY version").result_rows
    assert [row[0] for row in versions] == [migration.version for migration in migrations()]


def test_ledger_table_has_a_column_for_every_ledger_entry_field(client):
    described = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'ledger_entries'"
    ).result_rows
    assert set(LedgerEntry.model_fields) <= {row[0] for row in described}


@pytest.mark.parametrize("dsn", ["mysql://host/db", "chdb://relative/dir", "chdb:relative"])
def test_connect_rejects_unsupported_dsns(dsn):
    with pytest.raises(ValueError):
        connect(dsn)
