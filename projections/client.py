"""The ClickHouse client factory: one DSN selects the embedded chDB engine or a ClickHouse server."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

__all__ = ["connect"]

SCHEMES_SERVER = ("http", "https")


def connect(dsn: str) -> Client:
    """A clickhouse-connect client for `dsn`.

    - `chdb:///absolute/data/dir`: the embedded engine (package `chdb`) on that directory. One process
      can host one chDB directory at a time; several clients on the same directory share the engine,
      and a different directory can be opened only after every client of the first one is closed.
    - `http://user:password@host:8123/database` (or `https://`): a ClickHouse server. The database is
      created if it does not exist yet, so a fresh server needs no manual setup.
    """
    parsed = urlparse(dsn)
    if parsed.scheme == "chdb":
        return _connect_chdb(dsn, parsed.netloc, parsed.path)
    if parsed.scheme in SCHEMES_SERVER:
        return _connect_server(dsn, parsed.path)
    raise ValueError(f"unsupported ClickHouse DSN scheme {parsed.scheme!r}: use chdb:///path or http(s)://host")


def _connect_chdb(dsn: str, netloc: str, path: str) -> Client:
    if netloc or not path.startswith("/"):
        raise ValueError(f"a chDB DSN names an absolute directory, e.g. chdb:///var/lib/loyalty; got {dsn!r}")
    try:
        import chdb  # noqa: F401  (imported only to give a clear error when it is missing)
    except ImportError as error:
        raise ImportError(
            "the embedded ClickHouse engine needs the chdb package: pip install chdb "
            "(or use a ClickHouse server DSN, http://user:pass@host:8123/loyalty)"
        ) from error
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=dsn)


def _connect_server(dsn: str, path: str) -> Client:
    import clickhouse_connect

    database = unquote(path.lstrip("/").split("/")[0])
    if database and database != "default":
        bootstrap = clickhouse_connect.get_client(dsn=dsn, database="default")
        try:
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
        finally:
            bootstrap.close()
    return clickhouse_connect.get_client(dsn=dsn)
