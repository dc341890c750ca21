"""A test double of the ClickHouse HTTP interface, backed by the real ClickHouse engine (chDB).

This is NOT a ClickHouse server. It is a small aiohttp process that owns one chDB directory and answers
the subset of the ClickHouse HTTP protocol that clickhouse-connect's `HttpClient` uses, so that the
server-DSN code path of the engine (`http://user:pass@host:port/db`) can be tested on a machine without a
ClickHouse server: the SQL is executed by the real ClickHouse engine, only the HTTP layer is ours.

What it answers (everything else is refused or ignored):

- `GET /ping` -> `Ok.`; queries on `/` by GET or POST: the statement is the `query` URL parameter, the
  body, or both (the parameter first, as ClickHouse concatenates them); `multipart/form-data` bodies with
  a `query` field and `param_*` fields (clickhouse-connect's form encoding for large bound parameters).
- `database` (a `USE` before the statement), `default_format` (the output format of a statement without
  a FORMAT clause; TabSeparated otherwise), server-side bound parameters `param_<name>` (chDB's `params`),
  and every other URL parameter as a query setting, applied with `SET` and reset afterwards (HTTP-only
  and transport parameters such as `query_id`, `session_id`, `wait_end_of_query` are ignored). `readonly`
  is refused as a URL setting: once set on chDB's session it could never be reset.
- `INSERT INTO t [(columns)] FORMAT <fmt>` followed by the data (the first line of the body, or the
  `query` parameter with the data as the body): the data is written to a temporary file and inserted
  with `INSERT INTO t (columns) FROM INFILE '<file>' FORMAT <fmt>`. A `Content-Encoding` of the body
  (lz4, zstd, gzip, ...) is decoded first; clients should still prefer `compress=False`.
- Response headers clickhouse-connect reads: `X-ClickHouse-Format` (for result-producing statements),
  `X-ClickHouse-Timezone`, `X-ClickHouse-Summary`, `X-ClickHouse-Query-Id`,
  `X-ClickHouse-Server-Display-Name`; engine errors as HTTP 500 with `X-ClickHouse-Exception-Code` and
  the `Code: N. DB::Exception: ...` text as body.
- Basic authentication (or `X-ClickHouse-User` / `X-ClickHouse-Key`, or `user` / `password` URL
  parameters) against `--user` / `--password`, when given; a mismatch is code 516.

Sessions, external data, progress headers, response compression and concurrency are not emulated: one
chDB connection serves one statement at a time. Only loopback addresses should be used.

Run: `python chdb_http_front.py --data-dir DIR --port PORT [--user U --password P]`; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("chdb-http-front")

# URL parameters that are part of the HTTP protocol (or of clickhouse-connect's transport), not settings.
TRANSPORT_PARAMETERS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "quota_key",
        "role",
        "user",
        "password",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "http_zlib_compression_level",
        "http_native_compression_disable_checksumming_on_decompress",
    }
)
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The statement line of an insert with data: `INSERT INTO t (a, b) [SETTINGS ...] FORMAT Native`.
INSERT_WITH_DATA = re.compile(
    r"^\s*(?P<head>INSERT\s+INTO\s+.+?)(?:\s+SETTINGS\s+(?P<settings>.+?))?\s+FORMAT\s+(?P<format>\w+)\s*$",
    re.IGNORECASE | re.DOTALL,
)
TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
RESULT_STATEMENT = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN|CHECK)\b", re.IGNORECASE)
ERROR_CODE = re.compile(r"Code:\s*(\d+)")
AUTHENTICATION_FAILED = "516"
SERVER_NAME = "chdb-http-front"


class Refused(Exception):
    """A request this test double does not support: answered as a ClickHouse error with `code`."""

    def __init__(self, message: str, code: str = "48") -> None:  # 48: NOT_IMPLEMENTED
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    statement: str
    data: bytes | None = None
    database: str = "default"
    default_format: str = "TabSeparated"
    parameters: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


class Engine:
    """One chDB connection, one statement at a time, with per-request database and settings."""

    def __init__(self, data_dir: str) -> None:
        import chdb

        self._connection = chdb.connect(data_dir)
        self._lock = threading.Lock()
        self._database = "default"
        self._applied: dict[str, str] = {}
        self.timezone = self._query("SELECT timezone()", "TabSeparated").bytes().decode().strip()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _query(self, sql: str, fmt: str, parameters: dict[str, str] | None = None):
        return self._connection.query(sql, fmt, params=parameters or {})

    def execute(self, request: Request) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            self._use(request.database)
            self._apply_settings(request.settings)
            started = time.monotonic()
            if request.data is not None:
                result = self._insert(request)
                summary = {"written_rows": str(result.rows_read()), "written_bytes": str(result.bytes_read())}
            else:
                result = self._query(request.statement, request.default_format, request.parameters)
                summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read())}
            summary["elapsed_ns"] = str(int((time.monotonic() - started) * 1e9))
            return result.bytes() or b"", summary

    def _insert(self, request: Request):
        match = INSERT_WITH_DATA.match(request.statement)
        if match is None:
            raise Refused(f"data sent with a statement that is not INSERT ... FORMAT: {request.statement[:200]!r}")
        settings = f" SETTINGS {match['settings']}" if match["settings"] else ""
        with tempfile.NamedTemporaryFile(suffix=".data", delete=False) as handle:
            handle.write(request.data or b"")
        try:
            path = handle.name.replace("\\", "\\\\").replace("'", "\\'")
            sql = f"{match['head']} FROM INFILE '{path}'{settings} FORMAT {match['format']}"
            return self._query(sql, "TabSeparated", request.parameters)
        finally:
            os.unlink(handle.name)

    def _use(self, database: str) -> None:
        if database != self._database:
            quoted = "`" + database.replace("\\", "\\\\").replace("`", "\\`") + "`"
            self._query(f"USE {quoted}", "TabSeparated")
            self._database = database

    def _apply_settings(self, settings: dict[str, str]) -> None:
        """Make the session's settings those of the request: reset the previous request's, set the new ones."""
        statements = [f"{name} = DEFAULT" for name in self._applied if name not in settings]
        for name, value in settings.items():
            if self._applied.get(name) != value:
                escaped = value.replace("\\", "\\\\").replace("'", "\\'")
                statements.append(f"{name} = '{escaped}'")
        if statements:
            self._applied = {}
            self._query("SET " + ", ".join(statements), "TabSeparated")
            self._applied = dict(settings)


def parse_request(params, body: bytes, form: dict[str, str] | None) -> Request:
    """The statement, data, database, format, bound parameters and settings of one HTTP request."""
    values = dict(params)
    if form:
        values.update(form)
    query = values.get("query", "")
    data: bytes | None = None
    if form is not None or not body:
        statement = query
    elif query:
        # The statement is in the URL: the body is either its data or the rest of the statement.
        if INSERT_WITH_DATA.match(query):
            statement, data = query, body
        else:
            statement = query + "\n" + body.decode()
    else:
        statement, data = _split_body(body)
    if not statement.strip():
        raise Refused("empty query", code="62")
    settings = {}
    for name, value in values.items():
        if name in TRANSPORT_PARAMETERS or name.startswith("param_"):
            continue
        if not SETTING_NAME.match(name):
            raise Refused(f"bad setting name {name[:80]!r}", code="115")
        if name == "readonly":
            raise Refused("the chDB front refuses `readonly` as a URL setting (chDB could not reset it)")
        settings[name] = value
    return Request(
        statement=statement,
        data=data,
        database=values.get("database") or "default",
        default_format=values.get("default_format") or "TabSeparated",
        parameters={name[len("param_") :]: value for name, value in values.items() if name.startswith("param_")},
        settings=settings,
    )


def _split_body(body: bytes) -> tuple[str, bytes | None]:
    """A body is a statement, or `INSERT ... FORMAT x` on its first line followed by the data."""
    head = body[:7].upper()
    if head.lstrip().startswith(b"INSERT"):
        newline = body.find(b"\n")
        first = body[:newline] if newline >= 0 else body
        match = INSERT_WITH_DATA.match(first.decode("utf-8", "replace"))
        if match is not None and match["format"].upper() != "VALUES":
            return first.decode(), body[newline + 1 :] if newline >= 0 else b""
    return body.decode(), None


def _decode_body(body: bytes, encoding: str | None) -> bytes:
    """The body without its Content-Encoding (as clickhouse-connect compresses inserts when asked to)."""
    if not body or not encoding or encoding == "identity":
        return body
    if encoding == "lz4":
        import lz4.frame

        return lz4.frame.decompress(body)
    if encoding == "zstd":
        from clickhouse_connect.driver.compression import _zstd_decompress

        return _zstd_decompress(body)
    if encoding == "gzip":
        import gzip

        return gzip.decompress(body)
    if encoding == "deflate":
        import zlib

        return zlib.decompress(body)
    raise Refused(f"unsupported Content-Encoding {encoding!r}")


def _authorized(request: web.Request, user: str | None, password: str | None) -> bool:
    if user is None:
        return True
    supplied_user, supplied_password = request.query.get("user"), request.query.get("password", "")
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            supplied_user, _, supplied_password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
    elif "X-ClickHouse-User" in request.headers:
        supplied_user = request.headers["X-ClickHouse-User"]
        supplied_password = request.headers.get("X-ClickHouse-Key", "")
    return (supplied_user or "default") == user and hmac.compare_digest(supplied_password or "", password or "")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=message.rstrip() + "\n",
        headers={"X-ClickHouse-Exception-Code": code, "X-ClickHouse-Server-Display-Name": SERVER_NAME},
    )


def build_app(engine: Engine, user: str | None, password: str | None) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def handle(request: web.Request) -> web.Response:
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        if not _authorized(request, user, password):
            message = f"Code: {AUTHENTICATION_FAILED}. DB::Exception: Authentication failed. (AUTHENTICATION_FAILED)"
            return _error(401, AUTHENTICATION_FAILED, message)
        try:
            form = None
            body = b""
            if request.content_type == "multipart/form-data":
                form = {}
                posted = await request.post()
                for name, value in posted.items():
                    if not isinstance(value, str):
                        raise Refused("external data is not supported by the chDB front")
                    form[name] = value
            else:
                body = _decode_body(await request.read(), request.headers.get("Content-Encoding"))
            parsed = parse_request(request.query, body, form)
            output, summary = await asyncio.to_thread(engine.execute, parsed)
        except Refused as error:
            return _error(400, error.code, f"Code: {error.code}. DB::Exception: {error}")
        except Exception as error:  # an engine error: ClickHouse's text, with its code
            message = str(error)
            start = message.find("Code: ")
            message = message[start:] if start > 0 else message
            found = ERROR_CODE.search(message)
            log.info("query failed: %s", message[:300])
            return _error(500, found.group(1) if found else "1", message)
        headers = {
            "X-ClickHouse-Server-Display-Name": SERVER_NAME,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": engine.timezone,
            "X-ClickHouse-Summary": json.dumps(summary),
        }
        if parsed.data is None:
            embedded = TRAILING_FORMAT.search(parsed.statement)
            if embedded or output or RESULT_STATEMENT.match(parsed.statement):
                headers["X-ClickHouse-Format"] = embedded.group(1) if embedded else parsed.default_format
        return web.Response(body=output, headers=headers, content_type="application/octet-stream")

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/ping", ping)
    app.router.add_route("GET", "/", handle)
    app.router.add_route("POST", "/", handle)

    async def close(app: web.Application) -> None:
        engine.close()

    app.on_cleanup.append(close)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="chDB directory (one process may open it at a time)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default=None, help="require this user (Basic authentication)")
    parser.add_argument("--password", default=os.environ.get("CHDB_HTTP_FRONT_PASSWORD"), help="its password")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = Engine(args.data_dir)
    log.info("serving the ClickHouse HTTP protocol for chDB %s on %s:%d", args.data_dir, args.host, args.port)
    web.run_app(
        build_app(engine, args.user, args.password), host=args.host, port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
