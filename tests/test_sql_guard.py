"""Analysts' SQL is accepted only as one read-only SELECT, and runs read-only with row and time limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from projections import connect, migrate
from streams import sql_guard
from streams.sql_guard import SqlFailed, SqlRefused, check_read_only_sql, run_read_only_sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "SELECT 1"),
        ("  select count() from ledger_entries FINAL;  ", "select count() from ledger_entries FINAL"),
        ("WITH t AS (SELECT 1 AS x) SELECT x FROM t", "WITH t AS (SELECT 1 AS x) SELECT x FROM t"),
        ("(SELECT 1) UNION ALL (SELECT 2)", "(SELECT 1) UNION ALL (SELECT 2)"),
        ("SELECT 'DROP TABLE x; INSERT' AS text", "SELECT 'DROP TABLE x; INSERT' AS text"),
        ("SELECT 'it''s', 'a\\'b'", "SELECT 'it''s', 'a\\'b'"),
        ('SELECT "settings" FROM t', 'SELECT "settings" FROM t'),
        ("SELECT name, value FROM system.settings", "SELECT name, value FROM system.settings"),
        ("SELECT format('{} {}', 'a', 'b')", "SELECT format('{} {}', 'a', 'b')"),
        ("SELECT 1 -- a comment\n, 2", "SELECT 1  \n, 2"),
        ("SELECT /* nested /* comment */ still */ 1", "SELECT   1"),
        ("SELECT 0x1F, 1.5e-3, 2", "SELECT 0x1F, 1.5e-3, 2"),
        (
            "SELECT customer_id, argMax(balance_after, sequence) FROM ledger_entries GROUP BY customer_id",
            "SELECT customer_id, argMax(balance_after, sequence) FROM ledger_entries GROUP BY customer_id",
        ),
    ],
)
def test_one_select_is_accepted_and_returned_without_comments(sql, expected):
    assert check_read_only_sql(sql) == expected


@pytest.mark.parametrize(
    ("sql", "reason_part"),
    [
        ("INSERT INTO ledger_entries SELECT * FROM ledger_entries", "not 'INSERT'"),
        ("ALTER TABLE ledger_entries DELETE WHERE 1", "not 'ALTER'"),
        ("DROP TABLE ledger_entries", "not 'DROP'"),
        ("CREATE TABLE x (a UInt8) ENGINE = Memory", "not 'CREATE'"),
        ("TRUNCATE TABLE ledger_entries", "not 'TRUNCATE'"),
        ("RENAME TABLE a TO b", "not 'RENAME'"),
        ("SYSTEM DROP MARK CACHE", "not 'SYSTEM'"),
        ("KILL QUERY WHERE 1", "not 'KILL'"),
        ("OPTIMIZE TABLE ledger_entries FINAL", "not 'OPTIMIZE'"),
        ("GRANT ALL ON *.* TO analyst", "not 'GRANT'"),
        ("SET readonly = 0", "not 'SET'"),
        ("SHOW TABLES", "not 'SHOW'"),
        ("SELECT 1 SETTINGS max_result_rows = 0", "SETTINGS is not accepted"),
        ("SELECT 1; DROP TABLE ledger_entries", "only one statement"),
        ("SELECT 1;;", "only one statement"),
        ("SELECT 1; SELECT 2", "only one statement"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT file('/etc/passwd')", "file()"),
        ("SELECT * FROM url('http://127.0.0.1:9/', 'CSV')", "url()"),
        ("SELECT * FROM s3('https://bucket/x.csv')", "s3()"),
        ("SELECT * FROM s3Cluster('c', 'https://bucket/x.csv')", "s3Cluster()"),
        ("SELECT * FROM hdfs('hdfs://h/x', 'TSV')", "hdfs()"),
        ("SELECT * FROM remote('127.0.0.1', system.one)", "remote()"),
        ("SELECT * FROM remoteSecure('127.0.0.1', system.one)", "remoteSecure()"),
        ("SELECT * FROM mysql('127.0.0.1:3306', 'd', 't', 'u', 'p')", "mysql()"),
        ("SELECT * FROM postgresql('127.0.0.1:5432', 'd', 't', 'u', 'p')", "postgresql()"),
        ("SELECT * FROM jdbc('jdbc:x', 't')", "jdbc()"),
        ("SELECT * FROM odbc('DSN=x', 't')", "odbc()"),
        ("SELECT * FROM executable('script.sh', 'TSV', 'x String')", "executable()"),
        ("SELECT * FROM input('x String')", "input()"),
        ("SELECT * FROM cluster('default', system.one)", "cluster()"),
        ("SELECT * FROM azureBlobStorage('x')", "azureBlobStorage()"),
        ("SELECT * FROM gcs('https://x')", "gcs()"),
        ("SELECT * FROM deltaLake('https://x')", "deltaLake()"),
        ("SELECT * FROM icebergS3('https://x')", "icebergS3()"),
        ("SELECT * FROM hudi('https://x')", "hudi()"),
        ("SELECT * FROM sqlite('/tmp/x.db', 't')", "sqlite()"),
        ("SELECT * FROM mongodb('127.0.0.1', 'd', 't', 'u', 'p', 'x String')", "mongodb()"),
        ("SELECT * FROM redis('127.0.0.1:6379', 'k', 'k String')", "redis()"),
        ("SELECT * FROM FILE('/etc/passwd')", "FILE()"),
        ("SELECT * FROM \"file\"('/etc/passwd')", '"file"()'),
        ("SELECT * FROM file /* spaced */ ('/etc/passwd')", "file()"),
        ("SELECT 1 INTO OUTFILE '/tmp/out.csv'", "INTO is not accepted"),
        ("SELECT 1 FORMAT CSV", "FORMAT clause"),
        ("SELECT 1 /* ; */ -- \n; DROP TABLE ledger_entries", "only one statement"),
        ("SELECT 1 /* unclosed", "comment is not closed"),
        ("SELECT 'unclosed", "string literal starting at position 7 is not closed"),
        ("SELECT $$x$$", "heredoc"),
        ("/* SELECT */ DROP TABLE ledger_entries", "not 'DROP'"),
        ("-- SELECT\nDROP TABLE ledger_entries", "not 'DROP'"),
        ("SELECT 1file('/etc/passwd')", "file()"),
        ("", "empty"),
        (" ; ", "empty"),
        ("SELECT 1\x00", "NUL"),
    ],
)
def test_refused_with_a_reason(sql, reason_part):
    with pytest.raises(SqlRefused) as refused:
        check_read_only_sql(sql)
    assert reason_part in refused.value.reason


def test_a_query_longer_than_the_limit_is_refused():
    with pytest.raises(SqlRefused, match="longer than"):
        check_read_only_sql("SELECT " + "1 + " * sql_guard.SQL_LENGTH_MAX + "1")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[object]:
    opened = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(opened)
    yield opened
    opened.close()


def test_run_returns_columns_and_json_ready_rows(client):
    result = run_read_only_sql(
        client,
        "SELECT number AS n, toDate('2024-01-02') AS day, toDecimal64(1.5, 2) AS money, nan AS x "
        "FROM numbers(2) ORDER BY n",
    )
    assert result.columns == ["n", "day", "money", "x"]
    assert result.rows == [[0, "2024-01-02", "1.50", "NaN"], [1, "2024-01-02", "1.50", "NaN"]]
    assert result.truncated is False


def test_run_cuts_the_result_at_rows_max_and_says_so(client):
    result = run_read_only_sql(client, "SELECT number FROM numbers(100000)", rows_max=10)
    assert result.rows == [[number] for number in range(10)]
    assert result.truncated is True


def test_an_empty_result_still_names_its_columns(client):
    result = run_read_only_sql(client, "SELECT customer_id, points FROM ledger_entries WHERE 0")
    assert (result.columns, result.rows, result.truncated) == (["customer_id", "points"], [], False)


def test_the_answer_stops_at_the_byte_limit_even_inside_one_block_of_the_engine(client, monkeypatch):
    """The engine checks max_result_bytes after each block; rows of 100 KB in one block of 500 passed it whole."""
    monkeypatch.setattr(sql_guard, "RESULT_BYTES_MAX", 1024 * 1024)
    result = run_read_only_sql(client, "SELECT number, repeat('x', 100000) AS s FROM numbers(500)")
    assert result.truncated is True
    assert 5 <= len(result.rows) <= 11 and result.rows[0][0] == 0


def test_run_stops_a_query_at_the_time_limit(client):
    with pytest.raises(SqlFailed, match="(?i)timeout|time limit|estimated query execution time"):
        run_read_only_sql(client, "SELECT count() FROM numbers(100000000000)", execution_time_max_s=1)


def test_engine_errors_are_reported_as_sql_failed(client):
    with pytest.raises(SqlFailed, match="(?i)unknown table|does not exist"):
        run_read_only_sql(client, "SELECT * FROM no_such_table")


def test_the_engine_refuses_writes_even_if_the_check_were_bypassed(client, monkeypatch):
    monkeypatch.setattr(sql_guard, "check_read_only_sql", lambda sql: sql)
    for statement in (
        "INSERT INTO sink_offsets (topic, partition, next_offset) SELECT 't', 0, 1",
        "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString', 'x String')",
        "SELECT 1 SETTINGS max_result_rows = 0",
    ):
        with pytest.raises(SqlFailed, match="readonly"):
            run_read_only_sql(client, statement)
    assert client.command("SELECT count() FROM sink_offsets") == 0


def test_the_shared_client_stays_writable_after_read_only_queries(client):
    run_read_only_sql(client, "SELECT 1")
    with pytest.raises(SqlFailed):
        run_read_only_sql(client, "SELECT * FROM no_such_table")
    client.insert("sink_offsets", [["loyalty.ledger", 0, 5]], column_names=["topic", "partition", "next_offset"])
    assert client.command("SELECT value FROM system.settings WHERE name = 'readonly'") in (0, "0")
    assert client.command("SELECT count() FROM sink_offsets") == 1


def test_run_refuses_before_any_query():
    class NoClient:
        def __getattr__(self, name):
            raise AssertionError("no query may run")

    with pytest.raises(SqlRefused):
        run_read_only_sql(NoClient(), "DROP TABLE ledger_entries")
