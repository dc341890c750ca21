"""What the crash tests share: producing a log while workers run, and comparing the outputs with the batch driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from reliability_support import REORDER_SETTLE_MS

from streams.batch import ProcessResult
from streams.routing import routes_for

REPOSITORY = Path(__file__).resolve().parents[2]


class StreamingProducer:
    """Produces a log in event-time order, `chunk_lines` at a time with a pause in between, in a thread.

    Each chunk is flushed before the next is sent, so the five input topics stay roughly in step (the
    worker's event-time watermark relies on that).
    """

    def __init__(self, bootstrap: str, lines: list[str], *, chunk_lines: int, pause_s: float) -> None:
        from streams.producer import make_producer

        self.lines = lines
        self.chunk_lines = chunk_lines
        self.pause_s = pause_s
        self.produced_lines = 0
        self.messages = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stopping = threading.Event()
        self._producer = make_producer(bootstrap)
        self._thread = threading.Thread(target=self._run, name="streaming-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for start in range(0, len(self.lines), self.chunk_lines):
                if self._stopping.is_set():
                    return
                for line in self.lines[start : start + self.chunk_lines]:
                    raw = line.encode()
                    for route in routes_for(raw):
                        self._producer.send(route.topic, value=raw, key=route.key, headers=list(route.headers))
                        self.messages += 1
                self._producer.flush()
                self.produced_lines = min(len(self.lines), start + self.chunk_lines)
                time.sleep(self.pause_s)
        except BaseException as error:  # surfaced by the test through `self.error`
            self.error = error
        finally:
            self.done.set()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=60)
        self._producer.close()


def ledger_by_entry_id(records: list) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Entries by id; and the ids written more than once with different content (must be empty)."""
    entries: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    for record in records:
        entry = json.loads(record.value)
        if entries.setdefault(entry["entry_id"], entry) != entry:
            changed.append(entry["entry_id"])
    return entries, changed


def expected_ledger(expected: ProcessResult) -> dict[str, dict[str, Any]]:
    return {entry.entry_id: entry.model_dump(mode="json") for entry in expected.ledger}


def describe_difference(streamed: dict[str, dict], wanted: dict[str, dict]) -> str:
    """A short explanation of how two ledgers differ, for assertion messages and the report."""
    missing = sorted(set(wanted) - set(streamed))
    extra = sorted(set(streamed) - set(wanted))
    differing = [entry_id for entry_id in set(wanted) & set(streamed) if wanted[entry_id] != streamed[entry_id]]
    fields: Counter[str] = Counter()
    customers = set()
    for entry_id in differing:
        customers.add(wanted[entry_id]["customer_id"])
        for name, value in wanted[entry_id].items():
            if streamed[entry_id].get(name) != value:
                fields[name] += 1
    lines = [
        f"{len(missing)} missing, {len(extra)} extra, {len(differing)} with other content "
        f"(fields {dict(fields)}, {len(customers)} customers)"
    ]
    for entry_id in differing[:3]:
        changed = {
            name: (value, streamed[entry_id].get(name))
            for name, value in wanted[entry_id].items()
            if streamed[entry_id].get(name) != value
        }
        lines.append(f"  {entry_id} {wanted[entry_id]['customer_id']} {wanted[entry_id]['caused_by']}: {changed}")
    for entry_id in missing[:10]:
        entry = wanted[entry_id]
        what = f"{entry['customer_id']} {entry['caused_by']} {entry.get('kind')} {entry.get('rule_id')}"
        lines.append(f"  missing {what}")
    for entry_id in extra[:3]:
        lines.append(f"  extra {streamed[entry_id]['customer_id']} {streamed[entry_id]['caused_by']}")
    return "\n".join(lines)


def dead_letters_by_input(records: list) -> dict[str, tuple[bytes, str]]:
    """Dead letters by the input position they came from (a re-delivery may dead-letter a message twice)."""
    letters: dict[str, tuple[bytes, str]] = {}
    for record in records:
        headers = dict(record.headers)
        position = headers["loyalty-input"].decode()
        letter = (record.value, headers["loyalty-reason"].decode())
        assert letters.setdefault(position, letter)[0] == letter[0], f"two different dead letters for {position}"
    return letters


def expected_dead_letters(lines: list[str], expected: ProcessResult) -> Counter[bytes]:
    return Counter(lines[rejection.line - 1].encode() for rejection in expected.rejected)


def run_cli(environment: dict[str, str], *arguments: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "streams.cli", *arguments, "--json"],
        env=environment,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def projected_balances(bootstrap: str, data_dir: Path, log_path: Path, ledger_rows: int, timeout_s: float = 120):
    """Run `loyalty up` on the broker until ClickHouse holds `ledger_rows` distinct entries; its balances after.

    Its worker joins the same consumer group and finds the input offsets committed: it only re-folds the
    ledger. `up` is stopped (SIGTERM) before chDB is opened here, since one process owns the directory.
    """
    environment = dict(
        os.environ,
        LOYALTY_KAFKA_BOOTSTRAP=bootstrap,
        LOYALTY_DATA_DIR=str(data_dir),
        LOYALTY_PARTITIONS="4",
        LOYALTY_HTTP_PORT="0",
        LOYALTY_SESSION_TIMEOUT_S="2",
        LOYALTY_REORDER_WAIT_MS="60000",
        LOYALTY_REORDER_SETTLE_MS=str(REORDER_SETTLE_MS),  # see reliability_support
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "up"],
            env=environment,
            cwd=REPOSITORY,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not (data_dir / "run.json").exists():
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "loyalty up did not start"
                time.sleep(0.2)
            status: dict = {}
            while time.monotonic() < deadline:
                status = run_cli(environment, "status")
                if status["ledger_rows_projected"] >= ledger_rows:
                    break
                assert process.poll() is None, log_path.read_text()[-3000:]
                time.sleep(1)
            assert status.get("ledger_rows_projected") == ledger_rows, (status, log_path.read_text()[-3000:])
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    from projections.client import connect
    from projections.queries import balances

    client = connect(f"chdb://{(data_dir / 'clickhouse').resolve()}")
    try:
        return balances(client)
    finally:
        client.close()
