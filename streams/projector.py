"""The ledger projector: loyalty.ledger -> projections.LedgerSink (ClickHouse), resuming from stored offsets.

It assigns every ledger partition to itself (no consumer group: the offsets live in ClickHouse next to the
rows they describe, so a restart resumes exactly where the last successful insert stopped), takes
thousands of entries per poll and writes their JSON in one Arrow insert (`LedgerSink.write_json`). Each batch is
parsed and checked (`LedgerSink.prepare_json`, no I/O) while the batch before it is still being written, so the
two overlap on two cores; the writes themselves stay one after the other, in offset order.
While it drains a backlog (full batches) it defers the daily aggregates' recompute, at most for
`recompute_interval_s`; it recomputes as soon as a batch is not full, when a poll brings nothing while days
are dirty, and at start for days an earlier projector left dirty (it stopped or crashed while draining).

ClickHouse unreachable (at start or later) is retried with backoff (0.5 s doubling to 10 s): reading the
stored offsets at start, and every insert, again and again with the same batch; nothing is skipped, and
whatever the worker writes meanwhile waits in the ledger topic. `backlog` counts the ledger messages not
yet projected (high water marks minus the offsets stored with the rows) and `last_error` the reason,
both also while the projector waits for ClickHouse.

Stopping: with `drain_on_stop_s` (what `loyalty up` passes with the embedded broker, `LOYALTY_STOP_DRAIN_S`), the
projector goes on once stopping is set until a poll brings nothing and every partition it reads (the ledger, and
the input topics it archives) is read to its end and written, at most that long. `loyalty up` stops its worker
before it stops the projector, so the ends do not move any more: the broker's log, kept in memory, is then
entirely in ClickHouse, and the next `loyalty up` rebuilds it from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from schemas.topics import INPUT_TOPICS, LEDGER, TOPIC_RANK, archive_side
from streams import metrics

log = logging.getLogger("loyalty.projector")

poll_timeout_ms = 200
# While draining a backlog (full batches) the daily aggregates are recomputed at most this often; a batch
# written once the projector is caught up recomputes at once (LedgerSink.write_json, defer_recompute).
recompute_interval_s = 5.0


def defers_recompute(full: bool, seconds_since_recompute: float) -> bool:
    """Whether a write defers the daily aggregates' recompute: only a full batch (more is waiting), and only
    for `recompute_interval_s` after the last recompute."""
    return full and seconds_since_recompute < recompute_interval_s


retry_delay_initial_s = 0.5
retry_delay_max_s = 10.0


class Projector:
    def __init__(
        self,
        *,
        bootstrap: str,
        sink,
        sink_lock: asyncio.Lock,
        partitions: int,
        batch_rows_max: int = 20_000,
        flush_interval_ms: int = 500,
        archive=None,
        highwaters: Callable[[], Mapping[tuple[str, int], int]] | None = None,
        drain_on_stop_s: float = 0.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.sink = sink
        self.sink_lock = sink_lock
        self.partitions = partitions
        self.batch_rows_max = batch_rows_max
        self.flush_interval_ms = flush_interval_ms
        self.rows_projected = 0
        self.messages_archived = 0
        # The next offset to archive per input partition, once known (stored, or written by this projector).
        self.archived_to: dict[tuple[str, int], int] = {}
        self.archive = archive
        self.last_error: str | None = None
        self.offsets_known = False
        # After `stopping` is set, go on reading and writing for up to this long, until every assigned partition is
        # read to its end and written (0: stop at once). With the embedded broker, whose log dies with the process,
        # what is not archived and projected by then is lost; `loyalty up` stops its worker first.
        self.drain_on_stop_s = drain_on_stop_s
        self.drained: bool | None = None  # after a run with a drain: whether it reached every partition's end
        # High water marks of the ledger partitions seen by another reader (the status monitor), so that the
        # backlog stays current while this consumer is stuck retrying a write.
        self._external_highwaters = highwaters
        self._highwaters: dict[tuple[str, int], int] = {}
        self._projected: dict[tuple[str, int], int] = {}
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def projected_to(self) -> dict[tuple[str, int], int]:
        """The next ledger offset to project per partition (stored with the rows written)."""
        return dict(self._projected)

    @property
    def backlog(self) -> int:
        """Ledger messages in Kafka not yet projected into ClickHouse.

        Until the stored offsets could be read (ClickHouse unreachable since the start, `offsets_known`
        false) nothing counts as projected, so the figure is then an upper bound.
        """
        external = self._external_highwaters() if self._external_highwaters is not None else {}
        total = 0
        for partition in range(self.partitions):
            key = (LEDGER, partition)
            end = max(self._highwaters.get(key, 0), external.get(key, 0))
            total += max(0, end - self._projected.get(key, 0))
        return total

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        self._consumer = consumer
        # The batch being written while the loop polls and prepares the next one; it returns whether it recomputed
        # the aggregates. Writes still happen one after the other, in offset order.
        in_flight: asyncio.Task[bool] | None = None
        try:
            tps = [TopicPartition(LEDGER, partition) for partition in range(self.partitions)]
            input_tps = [TopicPartition(topic, p) for topic in INPUT_TOPICS for p in range(self.partitions)]
            consumer.assign(tps + (input_tps if self.archive is not None else []))
            stored = await self._retry("reading the stored offsets", self.sink.resume_offsets, stopping=stopping)
            self._projected = {key: offset for key, offset in stored.items() if key[0] == LEDGER}
            self.archived_to = {key: offset for key, offset in stored.items() if key[0] != LEDGER}
            self.offsets_known = True
            # Days an earlier projector deferred and never recomputed (it stopped or crashed while draining).
            await self._retry("aggregate recompute", self.sink.recompute_dirty, stopping=stopping)
            for tp in tps + (input_tps if self.archive is not None else []):
                # An offset beyond the log's end (an embedded memory broker was restarted) is out of range:
                # the consumer then resets to the earliest offset (auto_offset_reset), and the sink
                # de-duplicates by entry id, so re-reading counts nothing twice.
                consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))
            pending: list[bytes] = []
            archived: list[tuple] = []
            archive_offsets: dict[tuple[str, int], int] = {}
            offsets: dict[tuple[str, int], int] = {}
            first_pending_at = 0.0
            recomputed_at = time.monotonic()
            drain_deadline: float | None = None
            while True:
                if stopping.is_set():
                    if not self.drain_on_stop_s:
                        break
                    if drain_deadline is None:
                        drain_deadline = time.monotonic() + self.drain_on_stop_s
                        log.info("stopping: archiving and projecting what is left in the topics")
                    elif time.monotonic() >= drain_deadline:
                        self.drained = False
                        log.warning(
                            "stopping before every message is archived and projected (%.0f s passed); "
                            "%d ledger messages not projected",
                            self.drain_on_stop_s,
                            self.backlog,
                        )
                        break
                batch = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=self.batch_rows_max)
                for tp, records in batch.items():
                    if not records:
                        continue
                    if tp.topic == LEDGER:
                        pending.extend(record.value for record in records)
                        offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                    else:
                        rank = TOPIC_RANK[tp.topic]
                        for record in records:
                            headers = [(name, bytes(value)) for name, value in record.headers or ()]
                            referee = archive_side(headers)
                            key = record.key.decode("utf-8", "replace") if record.key else ""
                            archived.append((tp.topic, tp.partition, record.offset, key, record.value, referee, rank))
                        archive_offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                if archived:
                    await self._retry(
                        "archive insert", self.archive.write, archived, archive_offsets, stopping=stopping
                    )
                    self.messages_archived += len(archived)
                    self.archived_to.update(archive_offsets)
                    archived, archive_offsets = [], {}
                if pending and not first_pending_at:
                    first_pending_at = time.monotonic()
                full = len(pending) >= self.batch_rows_max
                due = pending and (
                    full or (time.monotonic() - first_pending_at) * 1000 >= self.flush_interval_ms or not batch
                )
                if due:
                    # Parsed and checked (no I/O) while the batch before it is still being written.
                    prepared = await self._prepare(pending)
                    if in_flight is not None:
                        if await in_flight:
                            recomputed_at = time.monotonic()
                        in_flight = None
                    # A full batch means more is waiting: defer the aggregates' recompute to a later batch.
                    defer = defers_recompute(full, time.monotonic() - recomputed_at)
                    in_flight = asyncio.create_task(self._write_batch(prepared, offsets, defer, stopping))
                    pending, offsets, first_pending_at = [], {}, 0.0
                elif not pending and (in_flight is not None or self.sink.dirty_days):
                    if in_flight is not None:
                        if await in_flight:
                            recomputed_at = time.monotonic()
                        in_flight = None
                    if self.sink.dirty_days:
                        # Caught up after deferred writes (the last batch of a backlog was full): recompute now.
                        await self._retry("aggregate recompute", self.sink.recompute_dirty, stopping=stopping)
                        recomputed_at = time.monotonic()
                self._measure_backlog(consumer, tps)
                if drain_deadline is not None and await self._drained(consumer, batch, pending, in_flight):
                    self.drained = True
                    log.info("stopping: every message is archived and every ledger entry projected")
                    break
            if in_flight is not None:
                await in_flight  # the last write ends (or, failing while stopping, raises) before the consumer stops
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
            self._consumer = None
            await consumer.stop()

    async def _drained(self, consumer: AIOKafkaConsumer, batch: Mapping, pending: list, in_flight) -> bool:
        """A poll brought nothing, nothing waits to be written, and every assigned partition is read to its end."""
        if batch or pending or in_flight is not None or self.sink.dirty_days:
            return False
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None or await consumer.position(tp) < highwater:
                return False
        return True

    async def _prepare(self, values: list[bytes]) -> Sequence[bytes]:
        """The sink's `prepare_json` of a batch, in a thread and outside the sink lock (it does no I/O); the values as
        they are for a sink without it, or if it fails (the write then parses them itself, and is retried)."""
        prepare = getattr(self.sink, "prepare_json", None)
        if prepare is None:
            return values
        try:
            return await asyncio.to_thread(prepare, values)
        except Exception:
            log.exception("preparing a ledger batch failed; the write parses it again")
            return values

    async def _write_batch(
        self, values: Sequence[bytes], offsets: dict[tuple[str, int], int], defer: bool, stopping: asyncio.Event
    ) -> bool:
        """Write one batch (retried until it succeeds), then count it; return whether it recomputed."""
        write_started = time.monotonic()
        await self._retry("projection insert", self._write, values, offsets, defer, stopping=stopping)
        metrics.record_sink_batch(len(values), time.monotonic() - write_started)
        self.rows_projected += len(values)
        self._projected.update(offsets)
        return not defer

    def _measure_backlog(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        for tp in tps:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self._highwaters[(tp.topic, tp.partition)] = highwater
        metrics.record_sink_backlog(self.backlog)

    def _write(self, values: Sequence[bytes], offsets: dict[tuple[str, int], int], defer: bool) -> int:
        return self.sink.write_json(values, offsets, defer_recompute=defer)

    async def _call(self, function, *args):
        async with self.sink_lock:
            return await asyncio.to_thread(function, *args)

    async def _retry(self, what: str, function, *args, stopping: asyncio.Event):
        """`function(*args)` until it succeeds (ClickHouse down, network: the same call is idempotent).

        While it fails: `last_error` holds the reason, the backlog gauge stays current, and the wait
        doubles from `retry_delay_initial_s` to `retry_delay_max_s`. Once stopping, the error is raised.
        """
        delay = retry_delay_initial_s
        failures = 0
        while True:
            try:
                result = await self._call(function, *args)
            except Exception as error:
                failures += 1
                self.last_error = f"{type(error).__name__}: {str(error)[:300]}"
                metrics.record_sink_failure()
                metrics.record_sink_backlog(self.backlog)
                if stopping.is_set():
                    log.warning("%s failed (%s) while stopping", what, self.last_error)
                    raise
                log.warning(
                    "%s failed (%s); retrying in %.1fs, %d ledger messages waiting in Kafka",
                    what,
                    self.last_error,
                    delay,
                    self.backlog,
                )
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(retry_delay_max_s, delay * 2)
                continue
            if failures:
                log.info("%s succeeded after %d failed attempts; ClickHouse is reachable again", what, failures)
            self.last_error = None
            return result
