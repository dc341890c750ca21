"""`loyalty bench`: the engine's speed and memory figures, measured in one run on the embedded broker and chDB.

What is measured (see docs/performance.md for the targets and the latest figures):

1. ceiling: plain aiokafka produce (batched `send` + gather) and consume (manual assignment, `getmany`)
   of the simulated log's lines, messages/s;
2. baseline: the canonical Faust pattern (`group_by`, a Table update and an awaited `send` per event), run
   as a subprocess worker (`python -m streams.bench baseline ...`), events/s from its first output message;
3. worker drain: `loyalty worker` draining the pre-loaded mixed log into the ledger, input messages/s from
   the first ledger message until every input offset is committed, checked against `process_lines`; also
   the worker's CPU seconds in that interval and input messages per CPU second (steadier on a shared machine);
4. projection ingest: `LedgerSink.write_json` of the batch driver's ledger for the same log, as the ledger
   topic's JSON messages in full batches, with the projector's deferred recompute, rows/s;
5. replay: `streams.replay.replay_messages` over the log's messages sorted per customer, events/s, in one
   process and in one process per CPU (`loyalty replay`'s default; both results must be equal);
6. dashboard queries: p50/p95 per section on a synthetic ledger (`projections.bench.fill_ledger`);
7. end-to-end latency at a steady rate through `loyalty up`: produce -> ledger topic, and
   produce -> balance visible over the HTTP API (sampled `customer.registered` events of new customers);
8. peak RSS (VmHWM) of the worker process after the drain, and of a worker holding the states of
   `memory_customers` customers (default 1,000,000): on a fresh broker, the batch driver's ledger of two
   events per customer (a registration and a purchase) is pre-loaded into `loyalty.ledger`, and a worker
   starts and restores every partition from it, exactly as after a restart.

Everything runs on 127.0.0.1 in temporary directories; every process the bench starts is stopped. Timings
are printed, never asserted: `tests/test_bench.py` checks the `--small` run for correctness only.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.processes import stop_process

REPOSITORY = Path(__file__).resolve().parents[1]

CEILING_TOPIC = "bench.ceiling"
BASELINE_INPUT_TOPIC = "bench.baseline.in"
BASELINE_OUTPUT_TOPIC = "bench.baseline.out"
BASELINE_APP_ID = "loyalty-bench-baseline"
# Tansu holds a JoinGroup for half the session timeout; 6 s keeps the join short for the baseline.
BASELINE_SESSION_TIMEOUT_S = 6.0
WORKER_SESSION_TIMEOUT_S = 2.0
# The whole log is in the topics before the worker starts: release by watermark / caught-up only, so that
# the stream ledger equals the batch driver's exactly (as in tests/integration/test_pipeline.py).
DRAIN_REORDER_WAIT_MS = 120_000

produce_chunk_messages = 20_000
consume_records_max = 20_000
poll_interval_s = 0.1
process_stop_timeout_s = 20.0
phase_timeout_s = 1800.0
startup_timeout_s = 120.0
latency_poll_interval_s = 0.05
latency_sample_interval_s = 0.2
latency_settle_s = 10.0
sink_batch_rows = 20_000

# Issue 8's targets; `met` in the report compares against them.
TARGETS: dict[str, tuple[str, float]] = {
    "worker_drain_events_per_s": (">=", 25_000),
    "ratio_worker_to_ceiling": (">=", 0.7),
    "projection_ingest_rows_per_s": (">=", 500_000),
    "replay_events_per_s": (">=", 150_000),
    "query_p95_ms_max": ("<=", 50),
    "latency_balance_p99_ms": ("<=", 2000),
    "worker_memory_peak_rss_mb": ("<=", 500),
}


@dataclass
class BenchOptions:
    events: int = 1_000_000
    customers: int = 1_000_000
    partitions: int = 4
    baseline_events: int = 50_000
    ledger_rows: int = 10_000_000
    query_customers: int = 1_000_000
    query_repeats: int = 30
    memory_customers: int = 1_000_000
    latency_rate: float = 5000.0
    latency_seconds: float = 30.0
    seed: int = 8
    small: bool = False
    progress: Callable[[str], None] = field(default=lambda message: None)

    @classmethod
    def small_run(cls, **overrides: Any) -> BenchOptions:
        options = cls(
            events=20_000,
            customers=2_000,
            baseline_events=3_000,
            ledger_rows=20_000,
            query_customers=2_000,
            query_repeats=10,
            memory_customers=2_000,
            latency_rate=300.0,
            latency_seconds=6.0,
            small=True,
        )
        for name, value in overrides.items():
            if value is not None:
                setattr(options, name, value)
        return options


def _log(options: BenchOptions, message: str) -> None:
    options.progress(message)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


# --- the log -------------------------------------------------------------------------------------


@dataclass
class Log:
    lines: list[bytes]
    # (topic, key, headers, line number) per Kafka message, in log order.
    messages: list[tuple[str, bytes | None, tuple[tuple[str, bytes], ...], int]]


def build_log(events: int, customers: int, seed: int) -> Log:
    from streams.routing import routes_for
    from streams.simulate import generate_events

    lines = [
        line.encode()
        for line in generate_events(
            events=events, customers=customers, seed=seed, duplicate_share=0.02, bad_share=0.002
        )
    ]
    messages = []
    for number, raw in enumerate(lines):
        for route in routes_for(raw):
            messages.append((route.topic, route.key, route.headers, number))
    return Log(lines, messages)


# --- Kafka helpers -------------------------------------------------------------------------------


async def _producer(bootstrap: str):
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=4 * 1024 * 1024,
        enable_idempotence=False,
    )
    await producer.start()
    return producer


async def produce_all(
    bootstrap: str, items: Iterator[tuple[str, bytes | None, bytes, tuple, int | None]]
) -> dict[tuple[str, int], int]:
    """Send (topic, key, value, headers, partition) items, batched; returns the end offset per partition."""
    producer = await _producer(bootstrap)
    ends: dict[tuple[str, int], int] = {}
    try:
        futures = []

        async def settle() -> None:
            for metadata in await asyncio.gather(*futures):
                tp = (metadata.topic, metadata.partition)
                ends[tp] = max(ends.get(tp, 0), metadata.offset + 1)
            futures.clear()

        for topic, key, value, headers, partition in items:
            futures.append(
                await producer.send(topic, value=value, key=key, headers=list(headers) or None, partition=partition)
            )
            if len(futures) >= produce_chunk_messages:
                await settle()
        await settle()
    finally:
        await producer.stop()
    return ends


async def consume_count(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float) -> int:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, partition) for partition in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        count = 0
        deadline = time.monotonic() + timeout_s
        while count < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=consume_records_max)
            count += sum(len(records) for records in batch.values())
        return count
    finally:
        await consumer.stop()


def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    # kafka-python's admin: aiokafka's OffsetFetch request does not parse on Tansu.
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="loyalty-bench")
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


class TopicWatcher:
    """Counts the records of a topic as they arrive (manual assignment, from the beginning), with the arrival
    time of the first, and optionally hands every record to a callback."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, on_record: Callable | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.on_record = on_record
        self.count = 0
        self.first_at: float | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._ready.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, partition) for partition in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._ready.set()
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=50, max_records=consume_records_max)
                now = time.monotonic()
                for records in batch.values():
                    if records and self.first_at is None:
                        self.first_at = now
                    self.count += len(records)
                    if self.on_record is not None:
                        for record in records:
                            self.on_record(record, now)
        finally:
            self._ready.set()
            await consumer.stop()


def _python_env(**variables: str) -> dict[str, str]:
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), **variables)
    return environment


def start_worker(bootstrap: str, partitions: int, group: str, log_path: Path, **variables: str) -> subprocess.Popen:
    """`loyalty worker` in a subprocess (no metrics port), its output in `log_path`."""
    environment = _python_env(
        LOYALTY_KAFKA_BOOTSTRAP=bootstrap,
        LOYALTY_PARTITIONS=str(partitions),
        LOYALTY_SESSION_TIMEOUT_S=str(WORKER_SESSION_TIMEOUT_S),
        LOYALTY_WORKER_ID=group,
        LOYALTY_METRICS_PORT="0",
        **variables,
    )
    with log_path.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=environment,
            cwd=REPOSITORY,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far, in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# --- 1. ceiling ----------------------------------------------------------------------------------


async def produce_batches(bootstrap: str, topic: str, partitions: int, values: list[bytes]) -> None:
    """The producer ceiling: `create_batch`/`send_batch`, unkeyed, partitions in turn, all acks awaited."""
    producer = await _producer(bootstrap)
    try:
        futures = []
        partition = 0
        batch = producer.create_batch()
        for value in values:
            if batch.append(key=None, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                partition = (partition + 1) % partitions
                batch = producer.create_batch()
                if batch.append(key=None, value=value, timestamp=None) is None:
                    raise ValueError(f"a message of {len(value)} bytes does not fit in a batch")
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def bench_ceiling(bootstrap: str, log: Log, options: BenchOptions) -> dict[str, float]:
    count = len(log.lines)
    _log(options, f"ceiling: producing {count} messages with plain aiokafka")
    began = time.perf_counter()
    await produce_batches(bootstrap, CEILING_TOPIC, options.partitions, log.lines)
    produce_s = time.perf_counter() - began
    began = time.perf_counter()
    await produce_all(bootstrap, ((CEILING_TOPIC, None, raw, (), None) for raw in log.lines))
    send_s = time.perf_counter() - began
    began = time.perf_counter()
    consumed = await consume_count(bootstrap, CEILING_TOPIC, options.partitions, 2 * count, phase_timeout_s)
    consume_s = time.perf_counter() - began
    if consumed != 2 * count:
        raise RuntimeError(f"ceiling: consumed {consumed} of {2 * count} messages")
    return {
        "ceiling_produce_msgs_per_s": _rate(count, produce_s),
        "ceiling_produce_send_msgs_per_s": _rate(count, send_s),
        "ceiling_consume_msgs_per_s": _rate(consumed, consume_s),
        "ceiling_messages": count,
        "message_bytes_mean": sum(len(raw) for raw in log.lines) / max(1, count),
    }


# --- 2. baseline: the canonical Faust pattern ----------------------------------------------------


def baseline_app(bootstrap: str, partitions: int):
    """An agent with `group_by`, a Table update and an awaited `send` per event: what the Faust docs teach."""
    import faust

    app = faust.App(
        BASELINE_APP_ID,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(Path(tempfile.gettempdir()) / f"{BASELINE_APP_ID}-data"),
        topic_partitions=partitions,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=BASELINE_SESSION_TIMEOUT_S,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=BASELINE_SESSION_TIMEOUT_S,
    )
    source = app.topic(BASELINE_INPUT_TOPIC, value_serializer="json")
    awards = app.topic(BASELINE_OUTPUT_TOPIC, value_serializer="json")
    points = app.Table("bench-points", default=int, partitions=partitions)

    def customer_of(event: dict) -> str:
        return str(event.get("customer_id") or "")

    @app.agent(source)
    async def award_points(stream):
        async for event in stream.group_by(customer_of, name="customer"):
            customer_id = customer_of(event)
            points[customer_id] += 1
            await awards.send(key=customer_id, value={"customer_id": customer_id, "points": points[customer_id]})

    return app


def _has_customer(raw: bytes) -> bool:
    try:
        document = json.loads(raw)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("customer_id"), str)


def run_baseline_worker(bootstrap: str, partitions: int) -> None:
    import faust

    app = baseline_app(bootstrap, partitions)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


async def bench_baseline(bootstrap: str, log: Log, options: BenchOptions, workdir: Path) -> dict[str, float]:
    # Only lines with a customer id: the baseline has no dead-letter path.
    values = [raw for raw in log.lines if _has_customer(raw)][: options.baseline_events]
    count = len(values)
    _log(options, f"baseline: canonical Faust agent over {count} events")
    await produce_all(bootstrap, ((BASELINE_INPUT_TOPIC, None, raw, (), None) for raw in values))
    watcher = TopicWatcher(bootstrap, BASELINE_OUTPUT_TOPIC, options.partitions)
    await watcher.start()
    log_path = workdir / "baseline.log"
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streams.bench",
                "baseline",
                "--bootstrap",
                bootstrap,
                "--partitions",
                str(options.partitions),
            ],
            env=_python_env(),
            cwd=workdir,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    try:
        while watcher.count < count:
            if process.poll() is not None:
                raise RuntimeError(f"the baseline worker exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() - started > phase_timeout_s:
                raise RuntimeError(f"baseline: {watcher.count} of {count} outputs after {phase_timeout_s}s")
            await asyncio.sleep(poll_interval_s / 5)
        finished = time.monotonic()
    finally:
        await asyncio.to_thread(stop_process, process, process_stop_timeout_s)
        await watcher.stop()
    assert watcher.first_at is not None
    return {
        "baseline_events": count,
        "baseline_join_s": watcher.first_at - started,
        "baseline_events_per_s": _rate(count, finished - watcher.first_at),
    }


# --- 3 and 8. our worker draining the pre-loaded log ---------------------------------------------


async def bench_worker(
    bootstrap: str,
    log: Log,
    expected_entry_ids: set[str],
    options: BenchOptions,
    workdir: Path,
    profile: str | None = None,
) -> dict[str, Any]:
    from schemas.topics import LEDGER

    _log(options, f"worker: pre-loading {len(log.messages)} input messages")
    ends = await produce_all(
        bootstrap,
        ((topic, key, log.lines[number], headers, None) for topic, key, headers, number in log.messages),
    )
    input_messages = sum(ends.values())
    assert input_messages == len(log.messages)
    seen_ids: set[str] = set()
    records = {"count": 0}

    def on_ledger(record, now: float) -> None:
        records["count"] += 1
        # entry_id is the first field of a serialised LedgerEntry; json.loads keeps this independent of that.
        seen_ids.add(json.loads(record.value)["entry_id"])

    watcher = TopicWatcher(bootstrap, LEDGER, options.partitions, on_ledger)
    await watcher.start()
    group = "loyalty-bench-worker"
    log_path = workdir / "worker.log"
    _log(options, "worker: starting `loyalty worker` and waiting for the drain")
    process = start_worker(
        bootstrap,
        options.partitions,
        group,
        log_path,
        LOYALTY_REORDER_WAIT_MS=str(DRAIN_REORDER_WAIT_MS),
        LOYALTY_LOG_LEVEL="WARNING",
    )
    profiler = None
    started = time.monotonic()
    cpu_at_first: float | None = None
    try:
        committed_total = 0
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() - started > phase_timeout_s:
                raise RuntimeError(f"worker: {committed_total} of {input_messages} committed after {phase_timeout_s}s")
            if profile and profiler is None and watcher.first_at is not None:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "-o",
                        profile,
                        "--format",
                        "raw",
                        "-d",
                        "20",
                        "-p",
                        str(process.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if watcher.first_at is not None:
                if cpu_at_first is None:
                    cpu_at_first = cpu_seconds(process.pid)
                committed = await asyncio.to_thread(committed_offsets, bootstrap, group)
                committed_total = sum(min(committed.get(tp, 0), end) for tp, end in ends.items())
                if committed_total >= input_messages:
                    break
            await asyncio.sleep(poll_interval_s)
        finished = time.monotonic()
        drain_cpu_s = cpu_seconds(process.pid) - (cpu_at_first or 0.0)
        # Let the watcher read the ledger's tail (every entry is acked before its input offset is committed).
        deadline = time.monotonic() + 30
        while len(seen_ids) < len(expected_entry_ids) and time.monotonic() < deadline:
            await asyncio.sleep(poll_interval_s)
        rss_mb = peak_rss_mb(process.pid)
    finally:
        if profiler is not None:
            await asyncio.to_thread(profiler.wait, 60)
        await asyncio.to_thread(stop_process, process, process_stop_timeout_s)
        await watcher.stop()
    assert watcher.first_at is not None
    # Reported, not raised: a difference is a finding of the run (the test of the small run requires none).
    missing, unexpected = len(expected_entry_ids - seen_ids), len(seen_ids - expected_entry_ids)
    drain_s = finished - watcher.first_at
    return {
        "worker_input_messages": input_messages,
        "worker_log_events": len(log.lines),
        "worker_ledger_entries": len(seen_ids),
        "worker_ledger_records": records["count"],
        "worker_ledger_missing": missing,
        "worker_ledger_unexpected": unexpected,
        "worker_join_s": watcher.first_at - started,
        "worker_drain_s": drain_s,
        "worker_drain_events_per_s": _rate(input_messages, drain_s),
        # The worker's own CPU time in the drain: on a shared machine, events per CPU second varies less.
        "worker_drain_cpu_s": drain_cpu_s,
        "worker_drain_events_per_cpu_s": _rate(input_messages, drain_cpu_s),
        "worker_peak_rss_mb": rss_mb,
    }


# --- 8. worker memory at many customers ----------------------------------------------------------

memory_chunk_customers = 20_000


def customer_lines(first: int, count: int, start: datetime) -> list[bytes]:
    """Two events per customer (a registration, then a one-line purchase), customer by customer."""
    lines = []
    for number in range(first, first + count):
        customer = f"m{number:07d}"
        envelope = {
            "schema_version": 1,
            "occurred_at": (start + timedelta(seconds=number)).isoformat(),
            "customer_id": customer,
            "store_id": f"s{1 + number % 3}",
        }
        lines.append(json.dumps({"event_id": f"{customer}-r", "event_type": "customer.registered", **envelope}))
        purchase = {
            "event_id": f"{customer}-p",
            "event_type": "purchase.completed",
            **envelope,
            "order_id": f"{customer}-o",
            "currency": "USD",
            "lines": [
                {"sku": f"sku-{number % 300}", "category": "books", "quantity": 1 + number % 3, "unit_price": "12.50"}
            ],
        }
        lines.append(json.dumps(purchase))
    return [line.encode() for line in lines]


def memory_ledger(customers: int, partitions: int, ruleset, counts: dict[str, int]) -> Iterator[tuple]:
    """The batch driver's ledger for `customer_lines`, as (topic, key, value, headers, partition) items, made
    chunk by chunk so that the bench itself never holds more than one chunk of entries."""
    from collections import Counter

    from schemas.topics import LEDGER
    from streams.batch import process_lines
    from streams.routing import partition_for
    from streams.worker import EVENT_ENTRIES_HEADER

    start = datetime(2026, 1, 1, tzinfo=UTC)
    for first in range(0, customers, memory_chunk_customers):
        result = process_lines(customer_lines(first, min(memory_chunk_customers, customers - first), start), ruleset)
        assert not result.rejected, result.rejected[:3]
        per_event = Counter((entry.customer_id, entry.caused_by) for entry in result.ledger)
        counts["customers"] += len(result.states)
        counts["entries"] += len(result.ledger)
        for entry in result.ledger:
            key = entry.customer_id.encode()
            headers = ((EVENT_ENTRIES_HEADER, str(per_event[(entry.customer_id, entry.caused_by)]).encode()),)
            yield LEDGER, key, entry.model_dump_json().encode(), headers, partition_for(key, partitions)


async def bench_worker_memory(options: BenchOptions, workdir: Path) -> dict[str, float]:
    """Peak RSS of a worker that holds `memory_customers` customers' states (restored from the ledger)."""
    import re

    from schemas.topics import ALL_TOPICS
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.rules.ruleset import load_ruleset

    counts = {"customers": 0, "entries": 0}
    restored = re.compile(r"restored ledger partitions \[([0-9, ]*)\]: (\d+) entries folded")
    with EmbeddedBroker(log_path=workdir / "broker-memory.log") as broker:
        await asyncio.to_thread(ensure_topics, broker.bootstrap, ALL_TOPICS, options.partitions)
        _log(options, f"memory: pre-loading the ledger of {options.memory_customers} customers")
        began = time.monotonic()
        await produce_all(
            broker.bootstrap, memory_ledger(options.memory_customers, options.partitions, load_ruleset(None), counts)
        )
        preload_s = time.monotonic() - began
        log_path = workdir / "worker-memory.log"
        _log(options, f"memory: {counts['entries']} entries pre-loaded; starting a worker that restores them")
        process = start_worker(
            broker.bootstrap, options.partitions, "loyalty-bench-memory", log_path, LOYALTY_LOG_LEVEL="INFO"
        )
        started = time.monotonic()
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the memory worker exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() - started > phase_timeout_s:
                    raise RuntimeError(f"memory: the worker did not restore within {phase_timeout_s}s")
                found = restored.findall(log_path.read_text(errors="replace"))
                partitions = {int(number) for numbers, _ in found for number in numbers.split(",") if number.strip()}
                if partitions >= set(range(options.partitions)):
                    break
                await asyncio.sleep(poll_interval_s)
            restore_s = time.monotonic() - started
            rss_mb = peak_rss_mb(process.pid)
        finally:
            await asyncio.to_thread(stop_process, process, process_stop_timeout_s)
    return {
        "memory_customers": counts["customers"],
        "memory_ledger_entries": counts["entries"],
        "memory_entries_folded": sum(int(folded) for _, folded in found),
        "memory_preload_s": preload_s,
        "memory_restore_s": restore_s,
        "worker_memory_peak_rss_mb": rss_mb,
    }


# --- 4. projection ingest, 6. queries ------------------------------------------------------------


def bench_projection_ingest(client, ledger: list, options: BenchOptions) -> dict[str, float]:
    """The projector's write path on a backlog: the ledger's JSON messages (as the ledger topic holds them) in
    full batches through `LedgerSink.write_json`, deferring the aggregates' recompute by the projector's rule
    (`defers_recompute`; the last batch recomputes), each batch parsed and checked (`LedgerSink.prepare_json`) in a
    thread while the one before it is written, as the projector does; Kafka is not involved."""
    from projections.sink import LedgerSink
    from schemas.ledger import LedgerEntry
    from streams.projector import defers_recompute

    serialize = LedgerEntry.__pydantic_serializer__.to_json
    values = [serialize(entry) for entry in ledger]
    _log(options, f"projections: LedgerSink.write_json of {len(values)} ledger messages")
    sink = LedgerSink(client, batch_rows_max=sink_batch_rows)
    batches = [values[start : start + sink_batch_rows] for start in range(0, len(values), sink_batch_rows)]
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-prepare") as preparing:
        began = recomputed_at = time.perf_counter()
        written = 0
        upcoming = preparing.submit(sink.prepare_json, batches[0]) if batches else None
        for number in range(len(batches)):
            prepared = upcoming.result()
            full = number + 1 < len(batches)  # the last batch is the one that catches up
            if full:
                upcoming = preparing.submit(sink.prepare_json, batches[number + 1])
            defer = defers_recompute(full, time.perf_counter() - recomputed_at)
            written += sink.write_json(
                prepared, {("loyalty.ledger", 0): (number + 1) * sink_batch_rows}, defer_recompute=defer
            )
            if not defer:
                recomputed_at = time.perf_counter()
        elapsed = time.perf_counter() - began
    projected = int(client.command("SELECT uniqExact(entry_id) FROM ledger_entries"))
    if projected != len({entry.entry_id for entry in ledger}):
        raise RuntimeError(f"projection: {projected} rows stored of {len(ledger)}")
    if sink.dirty_days:
        raise RuntimeError(f"projection: {sink.dirty_days} days left without their aggregates")
    return {"projection_rows": written, "projection_ingest_rows_per_s": _rate(written, elapsed)}


QUERY_SECTIONS = ("balance", "history", "points_status", "point_sources", "top_earners")


def bench_queries(client, options: BenchOptions) -> dict[str, float]:
    from projections import queries
    from projections.bench import AGGREGATE_TABLES, SYNTHETIC_DAYS, SYNTHETIC_FIRST_DAY, fill_ledger

    _log(
        options,
        f"queries: filling a synthetic ledger of {options.ledger_rows} rows, {options.query_customers} customers",
    )
    for table in ("ledger_entries", *AGGREGATE_TABLES):
        client.command(f"TRUNCATE TABLE {table}")
    with contextlib.redirect_stdout(io.StringIO()):
        fill_ledger(client, options.ledger_rows, options.query_customers)
    randomness = random.Random(options.seed)
    customers = options.query_customers

    def some_customer() -> str:
        return f"c{randomness.randrange(customers)}"

    def some_month() -> tuple[date, date]:
        first = SYNTHETIC_FIRST_DAY + timedelta(days=randomness.randrange(SYNTHETIC_DAYS - 31))
        return first, first + timedelta(days=30)

    year = (SYNTHETIC_FIRST_DAY, SYNTHETIC_FIRST_DAY + timedelta(days=SYNTHETIC_DAYS - 1))
    cases: dict[str, list[Callable[[], object]]] = {
        "balance": [lambda: queries.balance(client, some_customer())],
        "history": [lambda: queries.history(client, some_customer())],
        "points_status": [
            lambda: queries.points_status(client, *some_month(), "day"),
            lambda: queries.points_status(client, *year, "week"),
        ],
        "point_sources": [
            lambda: queries.point_sources(client, *some_month(), "source"),
            lambda: queries.point_sources(client, *year, "product"),
        ],
        "top_earners": [
            lambda: queries.top_earners(client, *some_month()),
            lambda: queries.top_earners(client, *year),
        ],
    }
    figures: dict[str, float] = {}
    for section, calls in cases.items():
        timings = []
        for call in calls:
            call()  # warm-up
            for _ in range(options.query_repeats):
                began = time.perf_counter()
                call()
                timings.append((time.perf_counter() - began) * 1000)
        figures[f"query_{section}_p50_ms"] = statistics.median(timings)
        figures[f"query_{section}_p95_ms"] = _percentile(timings, 0.95)
    figures["query_p95_ms_max"] = max(figures[f"query_{section}_p95_ms"] for section in QUERY_SECTIONS)
    figures["query_ledger_rows"] = int(client.command("SELECT count() FROM ledger_entries"))
    return figures


# --- 5. replay -----------------------------------------------------------------------------------


def replay_input(log: Log) -> list:
    """The log's Kafka messages as `RawArchive.stream_for_replay` returns them: `ArchivedMessage`s per routing key
    in (occurred_at, topic rank, position) order, built in memory so that only the core is timed."""
    from projections.archive import UNKNOWN_TIME, ArchivedMessage
    from schemas.topics import REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK

    archived = []
    for position, (topic, key, headers, number) in enumerate(log.messages):
        raw = log.lines[number]
        try:
            document = json.loads(raw)
            moment = datetime.fromisoformat(document["occurred_at"]).astimezone(UTC)
            event_id = str(document.get("event_id") or "")[:128]
        except Exception:  # unreadable: sorts first and is rejected again, as in the archive
            moment, event_id = UNKNOWN_TIME, ""
        referee_side = 1 if (SIDE_HEADER, REFEREE_SIDE) in headers else 0
        routing_key = (key or b"").decode(errors="replace")
        archived.append(
            ArchivedMessage(topic, 0, position, routing_key, raw, referee_side, TOPIC_RANK[topic], event_id, moment)
        )
    archived.sort(key=lambda message: (message.routing_key, message.occurred_at, message.topic_rank, message.offset))
    return archived


def bench_replay(log: Log, ruleset, options: BenchOptions) -> dict[str, float]:
    from streams.replay import replay_messages
    from streams.settings import load_settings

    messages = replay_input(log)
    processes = load_settings().resolved_replay_processes()
    _log(options, f"replay: {len(messages)} messages through the core, in 1 and in {processes} processes")
    began = time.perf_counter()
    alone = replay_messages(messages, ruleset)
    elapsed_alone = time.perf_counter() - began
    began = time.perf_counter()
    result = replay_messages(messages, ruleset, processes=processes)  # as `loyalty replay` runs by default
    elapsed = time.perf_counter() - began
    if dataclasses.asdict(result) != dataclasses.asdict(alone):
        raise RuntimeError(f"replay in {processes} processes differs from replay in one")
    return {
        "replay_events": result.events,
        "replay_processes": processes,
        "replay_events_per_s": _rate(result.events, elapsed),
        "replay_events_per_s_one_process": _rate(alone.events, elapsed_alone),
        # Without a refetch from the archive, derived events are not decided again (0 with the default rules).
        "replay_derived_skipped": result.derived_skipped,
    }


def replay_digest(result) -> str:
    """A short hash of every figure of a replay result: equal digests, equal results (to compare code versions)."""
    import hashlib

    figures = dataclasses.asdict(result)
    for optional in ("orders", "pending", "restate"):  # kept only for an apply: digests comparable with older code
        if figures.get(optional) is None:
            figures.pop(optional, None)
    figures.pop("derived", None)  # the derived events themselves (for an apply's second step); their figures count
    document = json.dumps(figures, sort_keys=True).encode()
    return hashlib.sha256(document).hexdigest()[:16]


def _cpu_of_self_and_children() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def replay_only(args: argparse.Namespace) -> dict[str, Any]:
    """`python -m streams.bench replay`: the replay section alone, repeated, for comparing code versions quickly.

    The log is simulated as in the bench (seed 8 by default), its messages are turned into `ArchivedMessage`s
    once, and `replay_messages` is timed `--repeats` times per process count (best and median events/s). The
    result's digest must be the same for every run and process count, and across code versions that must not
    change results."""
    from streams.replay import replay_messages
    from streams.rules.ruleset import load_ruleset

    ruleset = load_ruleset(args.rules)
    messages = replay_input(build_log(args.events, args.customers, args.seed))
    figures: dict[str, Any] = {"messages": len(messages), "ruleset": ruleset.version, "runs": {}}
    digests = set()
    for processes in args.processes:
        seconds, cpu_seconds = [], []
        for _ in range(args.repeats):
            cpu_began = _cpu_of_self_and_children()
            began = time.perf_counter()
            result = replay_messages(messages, ruleset, processes=processes)
            seconds.append(time.perf_counter() - began)
            cpu_seconds.append(_cpu_of_self_and_children() - cpu_began)  # the pool's processes are joined by now
            digests.add(replay_digest(result))
        figures["events"] = result.events
        figures["runs"][processes] = {
            "events_per_s_best": round(result.events / min(seconds)),
            "events_per_s_median": round(result.events / statistics.median(seconds)),
            "seconds": [round(value, 3) for value in seconds],
            # Steadier than events/s on a shared host: CPU seconds of this process and its replay processes.
            "events_per_cpu_s_best": round(result.events / min(cpu_seconds)),
        }
        print(f"replay in {processes} process(es): {figures['runs'][processes]}", file=sys.stderr, flush=True)
    if len(digests) != 1:
        raise RuntimeError(f"replay results differ between runs or process counts: {sorted(digests)}")
    figures["digest"] = digests.pop()
    return figures


# --- 5b. replay memory ---------------------------------------------------------------------------


def replay_memory_archive(directory: Path, events: int, customers: int) -> None:
    """The archive and ledger of a live run of the simulated log (seed 8), in chDB at `directory`/clickhouse."""
    from projections import LedgerSink, connect, migrate
    from projections.archive import ArchivedMessage, RawArchive
    from schemas.topics import REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK
    from streams.batch import process_lines
    from streams.routing import partition_for, routes_for
    from streams.rules.ruleset import load_ruleset
    from streams.simulate import generate_events

    lines = [line.encode() for line in generate_events(events=events, customers=customers, seed=8)]
    client = connect(f"chdb://{directory / 'clickhouse'}")
    migrate(client)
    archive, offsets, batch = RawArchive(client), {}, []
    for raw in lines:
        document = json.loads(raw)
        moment = datetime.fromisoformat(document["occurred_at"]).astimezone(UTC)
        for route in routes_for(raw):
            partition = partition_for(route.key, partitions=4)
            offset = offsets.get((route.topic, partition), 0)
            offsets[(route.topic, partition)] = offset + 1
            side = 1 if (SIDE_HEADER, REFEREE_SIDE) in route.headers else 0
            batch.append(
                ArchivedMessage(
                    route.topic, partition, offset, route.key.decode(), raw, side, TOPIC_RANK[route.topic],
                    str(document["event_id"]), moment,
                )
            )  # fmt: skip
        if len(batch) >= 50_000:
            archive.write(batch, {})
            batch = []
    archive.write(batch, {})
    ledger = process_lines(lines, load_ruleset(None)).ledger
    sink = LedgerSink(client)
    for start in range(0, len(ledger), 50_000):
        sink.write(ledger[start : start + 50_000])
    client.close()


def _status_kib(field_name: str, pid: int | str = "self") -> int:
    """A memory field of /proc/<pid>/status in KiB (0 when the process is gone or has no such field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def replay_memory_peak(directory: Path, processes: int) -> dict:
    """Peak resident memory of `loyalty replay --dry-run` offline on `directory`: its process and its process tree."""
    environment = _python_env(LOYALTY_DATA_DIR=str(directory), LOYALTY_REPLAY_PROCESSES=str(processes))
    environment.pop("LOYALTY_CLICKHOUSE_DSN", None)
    command = [sys.executable, "-m", "streams.cli", "replay", "--rules",
               str(REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"), "--dry-run", "--json"]  # fmt: skip
    output, errors = directory / "report.json", directory / "replay.err"
    began = time.monotonic()
    with output.open("wb") as sink, errors.open("wb") as error_sink:
        process = subprocess.Popen(command, env=environment, cwd=directory, stdout=sink, stderr=error_sink)
        peak_main = peak_tree = 0
        try:
            while process.poll() is None:
                sizes = [_status_kib("VmRSS", pid) for pid in _descendants(process.pid)]
                peak_main, peak_tree = max(peak_main, sizes[0]), max(peak_tree, sum(sizes))
                time.sleep(0.05)
        finally:
            stop_process(process, process_stop_timeout_s)
    if process.returncode:
        raise RuntimeError(f"replay failed: {errors.read_text()[-2000:]}")
    report = json.loads(output.read_text())
    return {
        "events_replayed": report["events_replayed"],
        "customers": len(report["customers"]),
        "seconds": round(time.monotonic() - began, 1),
        "peak_rss_main_mib": round(peak_main / 1024),
        "peak_rss_tree_mib": round(peak_tree / 1024),
    }


def replay_memory_only(args: argparse.Namespace) -> dict[str, Any]:
    """`python -m streams.bench replay-memory`: does a replay's memory grow with the customers, not the events?

    For each of `--events` (comma-separated) it simulates a log over `--customers` (seed 8; the simulator mints a
    customer per referral, so customers grow too), stores its archive (every input message, as `loyalty up` archives
    it) and the batch driver's ledger in a fresh chDB directory (in a subprocess: one process opens one chDB
    directory), runs `loyalty replay --rules seasonal-promotion.yaml --dry-run --json` offline on it and reads the
    resident memory of that process and of its replay processes every 50 ms (/proc)."""
    runs = []
    for events, directory in _simulated_archives(args.events_list, args.customers, "replay-memory-"):
        run = {"events": events, "processes": args.processes, **replay_memory_peak(directory, args.processes)}
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)
    return {"customers_asked": args.customers, "runs": runs}


def _simulated_archives(sizes: list[int], customers: int, prefix: str) -> Iterator[tuple[int, Path]]:
    """For each of `sizes` (events): a fresh chDB directory holding the simulated log's archive and the batch driver's
    ledger (`replay_memory_archive`, in a subprocess: one process opens one chDB directory), removed once the caller
    is done with it."""
    for events in sizes:
        directory = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            subprocess.run(
                [sys.executable, "-m", "streams.bench", "replay-memory-archive", str(directory), str(events),
                 str(customers)],
                check=True, cwd=REPOSITORY, env=_python_env(),
            )  # fmt: skip
            yield events, directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def live_expiry_peak(directory: Path, ruleset_version: str | None) -> dict:
    """In this (fresh) process: the peak resident memory of `replay._live_expiry` on the chDB directory `directory`, as
    an apply into the packaged full-lifecycle rule set (expiry by lot) with its markers past every archived message
    reads it (`_peak_of_read`). `ruleset_version`: the version the rule set is given instead of its own; the ledger's
    (`default-1`) makes every entry one of the apply's version, whose condition then looks each entry's cause up in the
    archive."""
    from streams import replay
    from streams.rules.ruleset import load_ruleset

    ruleset = load_ruleset(REPOSITORY / "streams/rules/rulesets/full-lifecycle.yaml")
    if ruleset_version:
        ruleset = ruleset.model_copy(update={"version": ruleset_version})
    result, figures = _peak_of_read(directory, lambda client, markers: replay._live_expiry(client, markers, ruleset))
    keys = result[1] if result is not None else {}  # (mode, keys[, newest entry times])
    return {
        "entries": figures.pop("entries"),
        "customers": len(keys),
        "lots": sum(len(lots) for lots in keys.values()),
        "ruleset_version": ruleset.version,
        "slice_entries": getattr(replay, "live_expiry_slice_entries", None),  # None: read in one query (before)
        **figures,
    }


def _peak_of_read(directory: Path, read: Callable[[Any, dict[tuple[str, int], int]], Any]) -> tuple[Any, dict]:
    """In this (fresh) process: `read(client, markers)` on the chDB directory `directory`, the markers past every
    archived message, and its peak resident memory: the process's peak is reset (/proc/self/clear_refs) once the
    directory is open and the markers read. Gives what `read` returned and the figures (entries, seconds, base and
    peak above it)."""
    import gc

    from projections import connect

    client = connect(f"chdb://{directory / 'clickhouse'}")
    try:
        rows = client.query("SELECT topic, partition, max(offset) FROM raw_events GROUP BY topic, partition")
        markers = {(topic, int(partition)): int(offset) + 1 for topic, partition, offset in rows.result_rows}
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
        base = _status_kib("VmRSS")
        began = time.monotonic()
        result = read(client, markers)
        seconds = time.monotonic() - began
        peak = _status_kib("VmHWM")
        entries = client.query("SELECT count() FROM ledger_entries FINAL").result_rows[0][0]
    finally:
        client.close()
    return result, {
        "entries": int(entries),
        "seconds": round(seconds, 2),
        "base_rss_mib": round(base / 1024),
        "peak_above_base_mib": round((peak - base) / 1024),
    }


def live_figures_peak(directory: Path, version: str | None, with_markers: bool) -> dict:
    """In this (fresh) process: the peak resident memory of `replay.live_figures` on the chDB directory `directory`,
    with the markers past every archived message and the apply's `version` (default: full-lifecycle's own) as an
    apply reads it, or without markers (`with_markers` false) as a dry run without them does (`_peak_of_read`)."""
    from streams import replay
    from streams.rules.ruleset import load_ruleset

    version = version or load_ruleset(REPOSITORY / "streams/rules/rulesets/full-lifecycle.yaml").version
    live, figures = _peak_of_read(
        directory, lambda client, markers: replay.live_figures(client, markers if with_markers else None, version)
    )
    return {
        "entries": figures.pop("entries"),
        "customers": len(live.balances),
        "markers": with_markers,
        "ruleset_version": version,
        "slice_entries": getattr(replay, "live_figures_slice_entries", None),  # None: read in one query (before)
        **figures,
    }


def live_expiry_memory_only(args: argparse.Namespace) -> dict[str, Any]:
    """`python -m streams.bench live-expiry-memory`: does the live ledger read of an apply into expiring rules
    (`replay._live_expiry`) grow with the entries? For each of `--events` the archive and the batch driver's ledger as
    `replay-memory` stores them, then `live_expiry_peak` in a fresh process."""
    runs = []
    for events, directory in _simulated_archives(args.events_list, args.customers, "live-expiry-memory-"):
        command = [sys.executable, "-m", "streams.bench", "live-expiry-peak", str(directory)]
        if args.ruleset_version:
            command += ["--ruleset-version", args.ruleset_version]
        done = subprocess.run(command, check=True, cwd=REPOSITORY, env=_python_env(), capture_output=True)
        run = {"events": events, **json.loads(done.stdout)}
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)
    return {"customers_asked": args.customers, "runs": runs}


# --- 7. end-to-end latency -----------------------------------------------------------------------


async def bench_latency(options: BenchOptions, workdir: Path) -> dict[str, float]:
    """Produce at a steady rate into `loyalty up` on a fresh broker; measure produce -> ledger topic for every
    event, and produce -> balance visible over the HTTP API for sampled registrations of new customers."""
    import aiohttp

    from schemas.topics import ALL_TOPICS, LEDGER
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.routing import routes_for
    from streams.simulate import generate_events

    total = max(1, int(options.latency_rate * options.latency_seconds))
    lines = [
        line.encode()
        for line in generate_events(
            events=total + 1,
            customers=max(1000, total // 4),
            seed=options.seed + 1,
            duplicate_share=0.0,
            bad_share=0.0,
            start=datetime.now(UTC),
            mean_gap_seconds=1 / options.latency_rate,
        )
    ]
    documents = [json.loads(raw) for raw in lines]
    data_dir = workdir / "up"
    with EmbeddedBroker(log_path=workdir / "broker-latency.log") as broker:
        await asyncio.to_thread(ensure_topics, broker.bootstrap, ALL_TOPICS, options.partitions)
        environment = _python_env(
            LOYALTY_KAFKA_BOOTSTRAP=broker.bootstrap,
            LOYALTY_DATA_DIR=str(data_dir),
            LOYALTY_PARTITIONS=str(options.partitions),
            LOYALTY_HTTP_PORT="0",
            LOYALTY_SESSION_TIMEOUT_S=str(WORKER_SESSION_TIMEOUT_S),
            LOYALTY_METRICS_PORT="0",
            LOYALTY_LOG_LEVEL="WARNING",
        )
        log_path = workdir / "up.log"
        _log(options, "latency: starting `loyalty up`")
        with log_path.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "up"],
                env=environment,
                cwd=REPOSITORY,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        sent_at: dict[str, float] = {}
        ledger_latencies: list[float] = []

        def on_ledger(record, now: float) -> None:
            caused_by = json.loads(record.value)["caused_by"]
            moment = sent_at.pop(caused_by, None)
            if moment is not None:
                ledger_latencies.append((now - moment) * 1000)

        watcher = TopicWatcher(broker.bootstrap, LEDGER, options.partitions, on_ledger)
        producer = None
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not (data_dir / "run.json").exists():
                if process.poll() is not None:
                    raise RuntimeError(f"loyalty up exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("loyalty up did not start")
                await asyncio.sleep(poll_interval_s)
            run = json.loads((data_dir / "run.json").read_text())
            await watcher.start()
            producer = await _producer(broker.bootstrap)
            headers = {"Authorization": f"Bearer {run['token']}"}
            async with aiohttp.ClientSession(headers=headers) as session:

                async def entries_of(customer_id: str) -> int:
                    async with session.get(f"{run['url']}/api/customers/{customer_id}/balance") as response:
                        response.raise_for_status()
                        return int((await response.json())["entries"])

                async def visible(customer_id: str, produced_at: float, timeout_s: float) -> float | None:
                    deadline = produced_at + timeout_s
                    while time.monotonic() < deadline:
                        if await entries_of(customer_id) > 0:
                            return (time.monotonic() - produced_at) * 1000
                        await asyncio.sleep(latency_poll_interval_s)
                    return None

                async def send(raw: bytes) -> None:
                    for route in routes_for(raw):
                        await producer.send(route.topic, value=raw, key=route.key, headers=list(route.headers) or None)

                # Warm-up: the first line (a registration) must be visible before the clock starts, so that
                # the group join and the projector's start are not part of the figures.
                _log(options, "latency: waiting for the pipeline to answer")
                await send(lines[0])
                await producer.flush()
                warm = await visible(documents[0]["customer_id"], time.monotonic(), startup_timeout_s)
                if warm is None:
                    raise RuntimeError(f"latency: the pipeline did not answer: {log_path.read_text()[-2000:]}")
                _log(options, f"latency: {total} events at {options.latency_rate:g}/s")
                # One prober asks for the oldest sample not yet visible, then at once for the next when it was
                # (projection follows produce order): about 1 / latency_poll_interval_s queries per second.
                # A probe per sample polling every 20 ms sent hundreds of balance queries per second, which the
                # up process answered on the loop the projector runs on: the measurement slowed what it measured.
                samples: asyncio.Queue = asyncio.Queue()
                results: list[float | None] = []

                async def prober() -> None:
                    while True:
                        sample = await samples.get()
                        if sample is None:
                            return
                        customer_id, produced_at = sample
                        deadline = produced_at + latency_settle_s + 20
                        while True:
                            if await entries_of(customer_id) > 0:
                                results.append((time.monotonic() - produced_at) * 1000)
                                break
                            if time.monotonic() > deadline:
                                results.append(None)
                                break
                            await asyncio.sleep(latency_poll_interval_s)

                probing = asyncio.create_task(prober())
                began = time.monotonic()
                last_sample = 0.0
                for index in range(1, len(lines)):
                    due = began + (index - 1) / options.latency_rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    raw, document = lines[index], documents[index]
                    now = time.monotonic()
                    sent_at[document["event_id"]] = now
                    await send(raw)
                    if (
                        document["event_type"] == "customer.registered"
                        and now - last_sample >= latency_sample_interval_s
                    ):
                        last_sample = now
                        samples.put_nowait((document["customer_id"], now))
                await producer.flush()
                produce_s = time.monotonic() - began
                samples.put_nowait(None)
                await probing
            deadline = time.monotonic() + latency_settle_s
            while sent_at and time.monotonic() < deadline:
                await asyncio.sleep(poll_interval_s)
        finally:
            if producer is not None:
                await producer.stop()
            await watcher.stop()
            await asyncio.to_thread(stop_process, process, 40.0)
    balance_latencies = [value for value in results if value is not None]
    if not balance_latencies or not ledger_latencies:
        raise RuntimeError("latency: nothing was measured")
    return {
        "latency_events": total,
        "latency_rate_achieved": _rate(total, produce_s),
        "latency_ledger_p50_ms": statistics.median(ledger_latencies),
        "latency_ledger_p99_ms": _percentile(ledger_latencies, 0.99),
        "latency_balance_samples": len(balance_latencies),
        "latency_balance_lost": len(results) - len(balance_latencies),
        "latency_balance_p50_ms": statistics.median(balance_latencies),
        "latency_balance_p99_ms": _percentile(balance_latencies, 0.99),
    }


# --- the whole run -------------------------------------------------------------------------------


async def _kafka_phases(
    log: Log, expected_entry_ids: set[str], options: BenchOptions, workdir: Path, profile: str | None
) -> dict[str, Any]:
    from schemas.topics import ALL_TOPICS
    from streams.broker import EmbeddedBroker, ensure_topics

    figures: dict[str, Any] = {}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topics = (*ALL_TOPICS, CEILING_TOPIC, BASELINE_INPUT_TOPIC, BASELINE_OUTPUT_TOPIC)
        await asyncio.to_thread(ensure_topics, broker.bootstrap, topics, options.partitions)
        figures.update(await bench_ceiling(broker.bootstrap, log, options))
        figures.update(await bench_baseline(broker.bootstrap, log, options, workdir))
        figures.update(await bench_worker(broker.bootstrap, log, expected_entry_ids, options, workdir, profile))
    figures.update(await bench_latency(options, workdir))
    figures.update(await bench_worker_memory(options, workdir))
    return figures


def run_bench(options: BenchOptions, *, profile: str | None = None) -> dict[str, Any]:
    """Every figure of the benchmark (see the module docstring), with the ratios and targets."""
    from projections.client import connect
    from projections.schema import migrate
    from streams.batch import process_lines
    from streams.rules.ruleset import load_ruleset

    ruleset = load_ruleset(None)
    began = time.monotonic()
    _log(options, f"simulating {options.events} events over {options.customers} customers")
    log = build_log(options.events, options.customers, options.seed)
    expected = process_lines(log.lines, ruleset)
    expected_entry_ids = {entry.entry_id for entry in expected.ledger}
    figures: dict[str, Any] = {
        "events": options.events,
        "customers_in_log": len(expected.states),
        "expected_ledger_entries": len(expected_entry_ids),
        "partitions": options.partitions,
    }
    with tempfile.TemporaryDirectory(prefix="loyalty-bench-") as directory:
        workdir = Path(directory)
        figures.update(asyncio.run(_kafka_phases(log, expected_entry_ids, options, workdir, profile)))
        figures.update(bench_replay(log, ruleset, options))
        client = connect(f"chdb://{workdir / 'clickhouse'}")
        try:
            migrate(client)
            figures.update(bench_projection_ingest(client, expected.ledger, options))
            figures.update(bench_queries(client, options))
        finally:
            client.close()
    figures["ratio_worker_to_ceiling"] = figures["worker_drain_events_per_s"] / figures["ceiling_produce_msgs_per_s"]
    figures["ratio_worker_to_baseline"] = figures["worker_drain_events_per_s"] / figures["baseline_events_per_s"]
    figures["targets_met"] = {name: _met(figures[name], op, bound) for name, (op, bound) in TARGETS.items()}
    figures["bench_seconds"] = time.monotonic() - began
    return figures


def _met(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


ROWS: tuple[tuple[str, str, str], ...] = (
    ("ceiling: aiokafka produce (send_batch)", "ceiling_produce_msgs_per_s", "msg/s"),
    ("ceiling: aiokafka produce (send + gather)", "ceiling_produce_send_msgs_per_s", "msg/s"),
    ("ceiling: aiokafka consume", "ceiling_consume_msgs_per_s", "msg/s"),
    ("baseline: canonical Faust agent", "baseline_events_per_s", "events/s"),
    ("worker drain (mixed log -> ledger, committed)", "worker_drain_events_per_s", "events/s"),
    ("  ours / produce ceiling", "ratio_worker_to_ceiling", "x"),
    ("  ours / Faust baseline", "ratio_worker_to_baseline", "x"),
    ("projection ingest (LedgerSink.write_json)", "projection_ingest_rows_per_s", "rows/s"),
    ("replay (replay_messages, one process per CPU)", "replay_events_per_s", "events/s"),
    ("replay in one process", "replay_events_per_s_one_process", "events/s"),
    *((f"query {section} p50 / p95", f"query_{section}", "ms") for section in QUERY_SECTIONS),
    ("latency produce -> ledger topic p50 / p99", "latency_ledger", "ms"),
    ("latency produce -> balance visible p50 / p99", "latency_balance", "ms"),
    ("worker peak RSS (VmHWM) after the drain", "worker_peak_rss_mb", "MiB"),
    ("worker peak RSS holding the memory run's customers", "worker_memory_peak_rss_mb", "MiB"),
)


def format_table(figures: dict[str, Any]) -> str:
    def number(value: float) -> str:
        if value < 1:
            return f"{value:.3g}"
        return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"

    lines = []
    for label, key, unit in ROWS:
        if key.startswith(("query_", "latency_")) and key not in figures:
            suffix = ("_p50_ms", "_p95_ms") if key.startswith("query_") else ("_p50_ms", "_p99_ms")
            value = f"{number(figures[key + suffix[0]])} / {number(figures[key + suffix[1]])}"
        else:
            value = number(figures[key])
        target = TARGETS.get(key)
        mark = ""
        if target is not None:
            mark = f"  target {target[0]} {target[1]:,g}: {'met' if figures['targets_met'][key] else 'NOT met'}"
        lines.append(f"{label:<48} {value:>20} {unit:<8}{mark}")
    lines.append(
        f"(log: {figures['events']:,} events, {figures['worker_input_messages']:,} input messages, "
        f"{figures['customers_in_log']:,} customers, {figures['expected_ledger_entries']:,} ledger entries; "
        f"queries on {figures['query_ledger_rows']:,} rows; latency at {figures['latency_rate_achieved']:,.0f}/s; "
        f"query p95 max {figures['query_p95_ms_max']:.1f} ms, target <= 50: "
        f"{'met' if figures['targets_met']['query_p95_ms_max'] else 'NOT met'}; "
        f"latency target is balance p99 <= 2000 ms: "
        f"{'met' if figures['targets_met']['latency_balance_p99_ms'] else 'NOT met'}; "
        f"memory run: {figures['memory_customers']:,} customers, {figures['memory_ledger_entries']:,} entries "
        f"restored in {figures['memory_restore_s']:.1f} s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m streams.bench baseline --bootstrap HOST:PORT --partitions N` runs the baseline Faust worker;
    `python -m streams.bench replay [--events N --processes 1,2 --repeats R]` times the replay section alone."""
    parser = argparse.ArgumentParser(prog="python -m streams.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    baseline = commands.add_parser("baseline", help="run the canonical Faust baseline worker (used by the bench)")
    baseline.add_argument("--bootstrap", required=True)
    baseline.add_argument("--partitions", type=int, required=True)
    replay = commands.add_parser("replay", help="time the replay section alone (replay_messages on a simulated log)")
    replay.add_argument("--events", type=int, default=100_000)
    replay.add_argument("--customers", type=int, default=100_000)
    replay.add_argument("--seed", type=int, default=8)
    replay.add_argument("--rules", default=None, help="rule set file (default: the packaged one)")
    replay.add_argument("--processes", type=lambda text: [int(part) for part in text.split(",")], default=[1, 2])
    replay.add_argument("--repeats", type=int, default=3)
    memory = commands.add_parser("replay-memory", help="peak memory of loyalty replay --dry-run at several sizes")
    memory.add_argument("--customers", type=int, default=5000)
    memory.add_argument("--events", dest="events_list", default=[100_000, 400_000],
                        type=lambda text: [int(part) for part in text.split(",")])  # fmt: skip
    memory.add_argument("--processes", type=int, default=2)
    expiry = commands.add_parser(
        "live-expiry-memory", help="peak memory of an expiring apply's read of the live ledger at several sizes"
    )
    expiry.add_argument("--customers", type=int, default=5000)
    expiry.add_argument("--events", dest="events_list", default=[100_000, 400_000],
                        type=lambda text: [int(part) for part in text.split(",")])  # fmt: skip
    expiry.add_argument("--ruleset-version", default=None, help="the apply's version (default: full-lifecycle's own)")
    peak = commands.add_parser("live-expiry-peak", help=argparse.SUPPRESS)
    peak.add_argument("directory", type=Path)
    peak.add_argument("--ruleset-version", default=None)
    figures = commands.add_parser("live-figures-peak", help=argparse.SUPPRESS)
    figures.add_argument("directory", type=Path)
    figures.add_argument("--ruleset-version", default=None)
    figures.add_argument("--no-markers", action="store_true", help="as a dry run without markers reads the figures")
    archive = commands.add_parser("replay-memory-archive", help=argparse.SUPPRESS)
    archive.add_argument("directory", type=Path)
    archive.add_argument("events", type=int)
    archive.add_argument("customers", type=int)
    args = parser.parse_args(argv)
    if args.command == "replay":
        print(json.dumps(replay_only(args)))
        return 0
    if args.command == "replay-memory":
        print(json.dumps(replay_memory_only(args)))
        return 0
    if args.command == "live-expiry-memory":
        print(json.dumps(live_expiry_memory_only(args)))
        return 0
    if args.command == "live-expiry-peak":
        print(json.dumps(live_expiry_peak(args.directory, args.ruleset_version)))
        return 0
    if args.command == "live-figures-peak":
        print(json.dumps(live_figures_peak(args.directory, args.ruleset_version, not args.no_markers)))
        return 0
    if args.command == "replay-memory-archive":
        replay_memory_archive(args.directory, args.events, args.customers)
        return 0
    if not args.bootstrap.startswith("127.0.0.1:"):
        parser.error("the baseline worker only talks to a loopback broker")
    run_baseline_worker(args.bootstrap, args.partitions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
