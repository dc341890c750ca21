"""The ledger sink is idempotent and resumes exactly after a crash between rows and offsets."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from projections import IdempotencyConflict, LedgerSink, connect, migrate
from projections.queries import balance, balances, point_sources, points_status, top_earners
from projections.schema import migrations
from projections.sink import LEDGER_ARROW_SCHEMA, LEDGER_COLUMNS, _arrow_table
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


def test_a_migration_does_not_alter_a_distributed_table_of_a_cluster():
    """On a cluster the original names are Distributed tables over `*_local` ones the operators create and alter
    (docs/operations.md): migration 0022's ALTERs of raw_events are skipped there, and every other statement runs."""
    from types import SimpleNamespace

    from projections.schema import SCHEMA_MIGRATIONS_DDL

    engines = {"raw_events": "Distributed"}
    commands, inserted = [], []

    class Cluster:
        def command(self, statement):
            commands.append(statement)

        def query(self, sql, parameters=None):
            if "system.tables" in sql:
                name = parameters["name"]
                return SimpleNamespace(result_rows=[(engines[name],)] if name in engines else [])
            return SimpleNamespace(result_rows=[])  # no migration applied yet

        def insert(self, table, rows, column_names):
            inserted.append(rows[0][0])

    assert migrate(Cluster()) == [migration.version for migration in migrations()] == inserted
    expected = [SCHEMA_MIGRATIONS_DDL] + [
        statement
        for migration in migrations()
        for statement in migration.statements
        if not statement.upper().startswith("ALTER TABLE RAW_EVENTS")
    ]
    assert commands == expected
    assert any(
        statement.upper().startswith("ALTER TABLE RAW_EVENTS") for m in migrations() for statement in m.statements
    )
    engines["raw_events"] = "ReplacingMergeTree"  # one server: they run
    commands.clear()
    migrate(Cluster())
    assert sum(statement.startswith("ALTER TABLE raw_events") for statement in commands) == 3


def test_ledger_table_has_a_column_for_every_ledger_entry_field(client):
    described = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'ledger_entries'"
    ).result_rows
    assert set(LedgerEntry.model_fields) <= {row[0] for row in described}


@pytest.mark.parametrize("dsn", ["mysql://host/db", "chdb://relative/dir", "chdb:relative"])
def test_connect_rejects_unsupported_dsns(dsn):
    with pytest.raises(ValueError):
        connect(dsn)


def as_json(entries: list[LedgerEntry]) -> list[bytes]:
    """The entries as the ledger topic holds them (the worker's serialiser)."""
    return [LedgerEntry.__pydantic_serializer__.to_json(entry) for entry in entries]


def utc_day(entry: LedgerEntry) -> date:
    """The day the sink files the entry under (its UTC date)."""
    return entry.occurred_at.astimezone(UTC).date()


def stored_rows(client) -> list[tuple]:
    columns = ", ".join(LEDGER_COLUMNS)
    return client.query(f"SELECT {columns} FROM ledger_entries FINAL ORDER BY entry_id").result_rows


def test_the_json_path_stores_what_the_model_path_stores(chdb_dsn, tmp_path, scenario):
    assert _arrow_table(as_json(scenario)) is not None  # the Arrow path, not the per-entry fallback, runs
    by_models = connect(f"chdb://{tmp_path / 'models'}")
    try:
        migrate(by_models)
        LedgerSink(by_models).write(scenario, {(TOPIC, 0): 15})
        expected_rows, expected_dashboard = stored_rows(by_models), dashboard(by_models)
    finally:
        by_models.close()
    by_json = connect(chdb_dsn)
    try:
        migrate(by_json)
        sink = LedgerSink(by_json)
        assert sink.write_json(as_json(scenario), {(TOPIC, 0): 15}) == len(scenario)
        assert stored_rows(by_json) == expected_rows
        assert dashboard(by_json) == expected_dashboard
        assert sink.resume_offsets() == {(TOPIC, 0): 15}
    finally:
        by_json.close()


def test_the_json_path_stores_a_batch_the_reader_parses_in_several_blocks(chdb_dsn, tmp_path, scenario):
    # Several 1 MB blocks of JSON come out of the reader as several chunks; the sink joins them into one before
    # inserting, and splits the insert by batch_rows_max: every row must arrive once and unchanged.
    entries = [
        entry.model_copy(update={"entry_id": f"{entry.entry_id}-{copy}", "customer_id": f"{entry.customer_id}-{copy}"})
        for copy in range(250)
        for entry in scenario
    ]
    values = as_json(entries)
    assert _arrow_table(values)["entry_id"].num_chunks > 1
    by_models = connect(f"chdb://{tmp_path / 'models'}")
    try:
        migrate(by_models)
        LedgerSink(by_models, batch_rows_max=1_000).write(entries)
        expected_rows = stored_rows(by_models)
    finally:
        by_models.close()
    by_json = connect(chdb_dsn)
    try:
        migrate(by_json)
        sink = LedgerSink(by_json, batch_rows_max=1_000)
        assert sink.write_json(values, {(TOPIC, 0): len(values)}) == len(entries)
        assert stored_rows(by_json) == expected_rows
        assert by_json.command("SELECT count() FROM ledger_entries") == len(entries)
        assert sink.resume_offsets() == {(TOPIC, 0): len(values)}
    finally:
        by_json.close()


@pytest.mark.parametrize("value", [lambda value: value.decode(), bytearray], ids=["str", "bytearray"])
def test_the_json_path_names_a_message_that_is_not_bytes(client, scenario, value):
    values = as_json(scenario)
    with pytest.raises(ValueError, match="ledger message 1 of the batch has no value"):
        LedgerSink(client).write_json([values[0], value(values[1]), *values[2:]])
    assert balances(client) == {}


def test_the_json_path_compares_a_repeated_entry_id_with_its_first_copy(client, scenario):
    values = as_json(scenario)
    assert LedgerSink(client).write_json(values + values[:3]) == len(scenario)
    changed = as_json([scenario[0].model_copy(update={"points": 999})])
    with pytest.raises(IdempotencyConflict):
        LedgerSink(client).write_json(values + changed)


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        (b'{"entry_id": "x"}', "customer_id"),
        (b"not json", "Invalid JSON"),
        (None, "kind"),  # a kind the ledger does not know
        ("invalid utf-8", "unicode"),
    ],
)
def test_the_json_path_names_a_message_that_is_not_a_ledger_entry(client, scenario, broken, named):
    values = as_json(scenario)
    if broken is None:
        broken = values[2].replace(b'"kind":"', b'"kind":"minted_')
    elif broken == "invalid utf-8":
        broken = values[2].replace(b'"explanation":"', b'"explanation":"\xff')
        assert _arrow_table([broken]) is None
    with pytest.raises(ValueError, match=f"ledger message 4 of the batch(.|\\n)*{named}"):
        LedgerSink(client).write_json([*values[:4], broken, *values[4:]])
    assert balances(client) == {}


@pytest.mark.parametrize(
    "explanation",
    [b'"caf\xc3\xa9 \xe2\x82\xac"', b'"caf\\u00e9 \\u20ac"', b'"tab\\tand \\"quote\\""', b'"nul \\u0000"'],
    ids=["utf-8", "escaped", "escapes", "nul"],
)
def test_the_json_path_stores_non_ascii_and_escaped_text_as_the_model_path_does(client, scenario, explanation):
    # Input that is ASCII without a backslash skips Arrow's UTF-8 validation; anything else takes it.
    values = as_json(scenario)
    text = values[2].replace(b'"explanation":""', b'"explanation":' + explanation)
    assert text != values[2]
    assert _arrow_table([*values[:2], text, *values[3:]]) is not None
    LedgerSink(client).write_json([*values[:2], text, *values[3:]])
    stored = client.query(
        "SELECT explanation FROM ledger_entries WHERE entry_id = {id:String}", parameters={"id": scenario[2].entry_id}
    ).result_rows
    assert stored == [(LedgerEntry.model_validate_json(text).explanation,)]


def test_the_json_path_refuses_a_lone_surrogate_escape_as_the_model_path_does(client, scenario):
    values = as_json(scenario)
    broken = values[2].replace(b'"explanation":""', b'"explanation":"\\ud800"')
    assert broken != values[2] and _arrow_table([broken]) is None
    with pytest.raises(ValueError, match="ledger message 2 of the batch is not a valid ledger entry"):
        LedgerSink(client).write_json([*values[:2], broken, *values[3:]])
    assert balances(client) == {}


def test_a_backlog_marks_each_day_dirty_once_and_every_day_is_recomputed(client, scenario):
    # Deferred writes over the same days mark them once: a day this sink holds dirty is dirty in the table until
    # its own recompute. A day first touched by a later write is marked then.
    sink = LedgerSink(client)
    january = [entry for entry in scenario if utc_day(entry).month == 1]
    rest = [entry for entry in scenario if utc_day(entry).month != 1]
    january_days = {utc_day(entry) for entry in january}
    sink.write_json(as_json(january), {(TOPIC, 0): 1}, defer_recompute=True)
    sink.write_json(as_json(january[::-1]), {(TOPIC, 0): 2}, defer_recompute=True)
    marks = client.query("SELECT day, count() FROM dirty_days WHERE dirty = 1 GROUP BY day ORDER BY day").result_rows
    assert marks == [(day, 1) for day in sorted(january_days)]
    sink.write_json(as_json(rest), {(TOPIC, 0): 3}, defer_recompute=True)
    marked = {day for (day,) in client.query("SELECT day FROM dirty_days FINAL WHERE dirty = 1").result_rows}
    assert marked == {utc_day(entry) for entry in scenario}
    assert sink.recompute_dirty() == len(marked)
    assert client.query("SELECT count() FROM dirty_days FINAL WHERE dirty = 1").result_rows == [(0,)]
    assert dashboard(client)[0] == {"alice": 115, "bob": -130, "carol": 310}
    assert points_status(client, date(2024, 1, 1), date(2024, 1, 31), "month").totals.issued == 700
    # After the recompute the days are clean: the next deferred write marks its days again.
    sink.write_json(as_json(january[:1]), {(TOPIC, 0): 4}, defer_recompute=True)
    assert client.query("SELECT day FROM dirty_days FINAL WHERE dirty = 1").result_rows == [(utc_day(january[0]),)]


def test_a_prepared_batch_stores_what_its_messages_store_and_a_retry_changes_no_number(chdb_dsn, tmp_path, scenario):
    values = as_json(scenario)
    prepared = LedgerSink.prepare_json(values)
    assert prepared.table is not None and list(prepared) == values
    by_values = connect(f"chdb://{tmp_path / 'values'}")
    try:
        migrate(by_values)
        LedgerSink(by_values).write_json(values, {(TOPIC, 0): 15})
        expected_rows, expected_dashboard = stored_rows(by_values), dashboard(by_values)
    finally:
        by_values.close()
    by_prepared = connect(chdb_dsn)
    try:
        migrate(by_prepared)
        sink = LedgerSink(by_prepared)
        assert sink.write_json(prepared, {(TOPIC, 0): 15}) == len(scenario)
        assert sink.write_json(prepared, {(TOPIC, 0): 15}) == len(scenario)  # the projector's retry
        assert stored_rows(by_prepared) == expected_rows
        assert dashboard(by_prepared) == expected_dashboard
    finally:
        by_prepared.close()


def test_a_prepared_batch_with_a_bad_message_is_refused_and_named_before_any_row_is_written(client, scenario):
    values = as_json(scenario)
    broken = values[6].replace(b'"kind":"', b'"kind":"minted_')
    prepared = LedgerSink.prepare_json([*values[:6], broken, *values[7:]])
    assert prepared.table is None
    with pytest.raises(ValueError, match="ledger message 6 of the batch is not a valid ledger entry"):
        LedgerSink(client).write_json(prepared, {(TOPIC, 0): 15})
    assert balances(client) == {}
    assert LedgerSink(client).resume_offsets() == {}


def test_the_json_path_refuses_a_time_without_its_utc_offset_as_the_model_path_does(client, scenario):
    values = as_json(scenario)
    naive = values[1].replace(b'Z"', b'"', 1)
    assert naive != values[1]
    assert _arrow_table([*values[:1], naive]) is None
    with pytest.raises(ValueError, match="occurred_at must carry a UTC offset"):
        LedgerSink(client).write_json([*values[:1], naive])
    pending = scenario[0].model_copy(update={"available_at": datetime(2024, 1, 20, 12, 0)})
    with pytest.raises(ValueError, match="available_at must carry a UTC offset"):
        LedgerSink(client).write([pending])
    assert balances(client) == {}


def test_the_json_path_stores_a_time_with_an_offset_in_utc(client, scenario):
    values = as_json(scenario[:1])
    shifted = values[0].replace(b'"occurred_at":"2024-01-01T10:00:00Z"', b'"occurred_at":"2024-01-01T12:00:00+02:00"')
    assert shifted != values[0] and _arrow_table([shifted]) is not None
    LedgerSink(client).write_json([shifted])
    stored = client.query("SELECT occurred_at FROM ledger_entries").result_rows
    assert stored == [(datetime(2024, 1, 1, 10, 0),)]


@pytest.mark.parametrize(
    "messages",
    [
        lambda values: [values[0][:-1] + b"}" + values[1], b"", *values[2:]],  # two documents, then none
        lambda values: [values[0] + b" " + values[1], b"  ", *values[2:]],
        lambda values: [None, *values[1:]],  # a tombstone
    ],
)
def test_the_json_path_takes_one_document_per_message(client, scenario, messages):
    with pytest.raises(ValueError, match="ledger message [01] of the batch"):
        LedgerSink(client).write_json(messages(as_json(scenario)))
    assert balances(client) == {}


def test_deferred_recomputes_catch_up_at_the_next_write_and_after_a_crash(chdb_dsn, client, scenario):
    first, second = scenario[:8], scenario[8:]
    sink = LedgerSink(client)
    sink.write_json(as_json(first), {(TOPIC, 0): 8}, defer_recompute=True)
    assert sink.dirty_days > 0
    assert points_status(client, date(2024, 1, 1), date(2024, 1, 31), "month").totals.issued == 0
    assert balances(client) != {}  # the ledger itself is current; only the daily aggregates wait
    # The crash: the second batch is written with its recompute deferred, and the process dies.
    sink.write_json(as_json(second), {(TOPIC, 0): 15}, defer_recompute=True)
    client.close()

    restarted = connect(chdb_dsn)
    try:
        sink = LedgerSink(restarted)
        assert sink.dirty_days == 0  # not loaded yet
        assert sink.recompute_dirty() >= 2  # what a projector does first when it starts
        assert sink.dirty_days == 0
        assert points_status(restarted, date(2024, 1, 1), date(2024, 1, 31), "month").totals.issued == 700
        assert dashboard(restarted)[0] == {"alice": 115, "bob": -130, "carol": 310}
        assert restarted.query("SELECT count() FROM dirty_days FINAL WHERE dirty = 1").result_rows == [(0,)]
        assert LedgerSink(restarted).recompute_dirty() == 0
    finally:
        restarted.close()


def test_the_arrow_schema_follows_the_ledger_entry():
    assert tuple(LEDGER_ARROW_SCHEMA.names) == LEDGER_COLUMNS


class LostCleanMark:
    """A client whose first INSERT of clean marks reaches the table but whose answer is lost (it raises)."""

    def __init__(self, client) -> None:
        self._client = client
        self.lost = False

    def __getattr__(self, name):
        return getattr(self._client, name)

    def insert(self, table, data, *args, **kwargs):
        result = self._client.insert(table, data, *args, **kwargs)
        if table == "dirty_days" and not any(data[1]) and not self.lost:
            self.lost = True
            raise ConnectionError("the answer to the clean mark was lost")
        return result


def test_a_clean_mark_whose_answer_was_lost_leaves_no_day_stale_after_a_crash(chdb_dsn, client, ledger):
    ledger.add("alice", "earned", "2024-01-01T10:00:00+00:00", 100, rule_id="purchase-base")
    ledger.add("bob", "earned", "2024-01-01T11:00:00+00:00", 7, rule_id="purchase-base")
    first, second = ledger.entries[:1], ledger.entries[1:]
    lossy = LostCleanMark(client)
    sink = LedgerSink(lossy)
    sink.write_json(as_json(first), {(TOPIC, 0): 1}, defer_recompute=True)
    with pytest.raises(ConnectionError):
        sink.recompute_dirty()  # the day is recomputed and marked clean in the table; the sink hears an error
    assert lossy.lost
    # A later deferred write on the same day, then a crash before its recompute.
    sink.write_json(as_json(second), {(TOPIC, 0): 2}, defer_recompute=True)
    client.close()

    restarted = connect(chdb_dsn)
    try:
        LedgerSink(restarted).recompute_dirty()  # what a projector does first when it starts
        assert points_status(restarted, date(2024, 1, 1), date(2024, 1, 1), "day").totals.issued == 107
    finally:
        restarted.close()
