"""The ClickHouse client factory: one DSN selects the embedded chDB engine or a ClickHouse server.

`connect(dsn)` connects now (and fails now); `ReconnectingClient(dsn)` connects on first use and again
after a failure, for the long-running process that must outlive a ClickHouse outage (`loyalty up`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urlparse

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError, StreamFailureError

__all__ = ["ClickHouseUnavailable", "ReconnectingClient", "connect", "redact"]

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
    from clickhouse_connect.driver.exceptions import ProgrammingError

    with _descriptor_2_captured() as said:
        try:
            client = clickhouse_connect.get_client(dsn=dsn)
            failure = None
        except ProgrammingError as error:
            failure = error
    if failure is None:
        if said[0]:  # whatever the engine said while opening, now that it cannot interleave with an error of ours
            sys.stderr.write(said[0])
            sys.stderr.flush()
        return client
    # The engine's own line names the cause; clickhouse-connect's message only says the engine did not start.
    engine = next((line.strip() for line in said[0].splitlines() if "DB::Exception" in line), "")
    if "Cannot lock file" in engine:
        raise ProgrammingError(
            f"the chDB directory {path} is open in another process (a running `loyalty up`?): {engine}"
        ) from failure
    raise ProgrammingError(f"{failure}{f' ({engine})' if engine else ''}") from failure


@contextlib.contextmanager
def _descriptor_2_captured() -> Iterator[list[str]]:
    """What is written to file descriptor 2 meanwhile, in `said[0]` afterwards: the embedded engine writes its own
    errors there past Python (such as a directory another process has locked), which would print a raw engine line
    before the error we raise with that line in it."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield said
            finally:
                os.dup2(saved, 2)
                captured.seek(0)
                said.append(captured.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)


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


class ClickHouseUnavailable(ConnectionError):
    """ClickHouse could not be reached (or could not be prepared). The message never holds the DSN's password."""


def redact(text: str, dsn: str) -> str:
    """`text` without the DSN's credentials: the password (plain and URL-encoded) and any `user:password@`."""
    password = urlparse(dsn).password
    if password:
        for secret in {password, unquote(password), quote(unquote(password), safe="")}:
            if secret:
                text = text.replace(secret, "***")
    return CREDENTIALS_IN_URL.sub(r"\1***@", text)


def describe_unreachable(error: BaseException, dsn: str) -> str:
    """A one-line reason, e.g. `connection refused`, from clickhouse-connect's long transport error."""
    cause: BaseException | None = error
    reason = None
    while cause is not None:
        if isinstance(getattr(cause, "reason", None), BaseException):  # urllib3's MaxRetryError
            cause = cause.reason
            continue
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
            break
        cause = cause.__cause__ or cause.__context__
    if reason is None:
        reason = f"{type(error).__name__}: " + OBJECT_REPR.sub("", str(error)).strip()
    return redact(reason[:400], dsn)


CREDENTIALS_IN_URL = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)
OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*")


class ReconnectingClient:
    """A clickhouse-connect client that connects on first use, and again after a failed attempt.

    `loyalty up` with a server DSN starts, and keeps running, while ClickHouse is unreachable: the ledger
    waits in Kafka and the projector retries. Every call goes to the underlying client (`query`, `command`,
    `insert`, ...); a call that cannot reach ClickHouse raises `ClickHouseUnavailable` with a short reason
    (never the password), also kept in `last_error` until the next successful call.
    `prepare(client)` (the schema migrations) runs on each new connection before any call goes through;
    if it fails, the connection is dropped and the next call starts over. Connection attempts are at most
    one per `retry_interval_s`, so that API requests during an outage fail fast instead of each waiting for
    a connect timeout.

    Errors of a reachable server (SQL errors, an error in the middle of a streamed result) pass through
    unchanged.
    """

    def __init__(self, dsn: str, *, prepare: Callable[[Client], object] | None = None, retry_interval_s: float = 1.0):
        self.dsn = dsn
        self.prepare = prepare
        self.retry_interval_s = retry_interval_s
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._client: Client | None = None
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def target(self) -> str:
        """The DSN without credentials, for logs: scheme://host:port/database."""
        parsed = urlparse(self.dsn)
        if parsed.scheme == "chdb":
            return f"chdb://{parsed.path}"
        host = parsed.hostname or ""
        return f"{parsed.scheme}://{host}{f':{parsed.port}' if parsed.port else ''}{parsed.path}"

    def ensure(self) -> Client:
        """The connected client, connecting (and preparing) first if needed; ClickHouseUnavailable if not."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._last_attempt < self.retry_interval_s and self.last_error:
                raise ClickHouseUnavailable(self.last_error)
            self._last_attempt = time.monotonic()
            client = None
            try:
                client = connect(self.dsn)
                if self.prepare is not None:
                    self.prepare(client)
            except Exception as error:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                if isinstance(error, ValueError | ImportError) and not isinstance(error, ClickHouseError):
                    raise  # a wrong DSN or a missing package: no retry helps
                self._failed(error)
                raise ClickHouseUnavailable(self.last_error) from None
            self._client = client
            self._succeeded()
            return client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attribute = getattr(self.ensure(), name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args, **kwargs):
            try:
                result = attribute(*args, **kwargs)
            except OperationalError as error:  # the transport failed: ClickHouse is (again) unreachable
                if isinstance(error, StreamFailureError):
                    raise  # the server answered, with an error in the middle of a result: not an outage
                self._failed(error)
                raise ClickHouseUnavailable(self.last_error) from None
            self._succeeded()
            return result

        return call

    def _failed(self, error: BaseException) -> None:
        self.last_error = f"ClickHouse at {self.target} is unavailable: {describe_unreachable(error, self.dsn)}"
        self.last_error_at = time.time()

    def _succeeded(self) -> None:
        self.last_error = None
        self.last_error_at = None
