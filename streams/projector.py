"""The ledger projector: loyalty.ledger -> projections.LedgerSink (ClickHouse), resuming from stored offsets.

It assigns every ledger partition to itself (no consumer group: the offsets live in ClickHouse next to the
rows they describe, so a restart resumes exactly where the last successful insert stopped), takes
thousands of entries per poll and writes them in one columnar insert. ClickHouse being unreachable is
retried with backoff; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from schemas.ledger import LedgerEntry
from schemas.topics import (
    CONTROL_HEADER,
    INPUT_TOPICS,
    LEDGER,
    REFEREE_SIDE,
    RULESET_CONTROL,
    SIDE_HEADER,
    TOPIC_RANK,
)
from streams import metrics

log = logging.getLogger("loyalty.projector")

poll_timeout_ms = 200
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
    ) -> None:
        self.bootstrap = bootstrap
        self.sink = sink
        self.sink_lock = sink_lock
        self.partitions = partitions
        self.batch_rows_max = batch_rows_max
        self.flush_interval_ms = flush_interval_ms
        self.rows_projected = 0
        self.messages_archived = 0
        self.archive = archive
        self.backlog = 0
        self.last_error: str | None = None
        self._consumer: AIOKafkaConsumer | None = None

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
        try:
            tps = [TopicPartition(LEDGER, partition) for partition in range(self.partitions)]
            input_tps = [TopicPartition(topic, p) for topic in INPUT_TOPICS for p in range(self.partitions)]
            consumer.assign(tps + (input_tps if self.archive is not None else []))
            stored = await self._call(self.sink.resume_offsets)
            for tp in tps + (input_tps if self.archive is not None else []):
                # An offset beyond the log's end (an embedded memory broker was restarted) is out of range:
                # the consumer then resets to the earliest offset (auto_offset_reset), and the sink
                # de-duplicates by entry id, so re-reading counts nothing twice.
                consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))
            pending: list[LedgerEntry] = []
            archived: list[tuple] = []
            archive_offsets: dict[tuple[str, int], int] = {}
            offsets: dict[tuple[str, int], int] = {}
            first_pending_at = 0.0
            while not stopping.is_set():
                batch = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=self.batch_rows_max)
                for tp, records in batch.items():
                    if not records:
                        continue
                    if tp.topic == LEDGER:
                        for record in records:
                            pending.append(LedgerEntry.model_validate_json(record.value))
                        offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                    else:
                        rank = TOPIC_RANK[tp.topic]
                        for record in records:
                            headers = [(name, bytes(value)) for name, value in record.headers or ()]
                            referee = (
                                2
                                if (CONTROL_HEADER, RULESET_CONTROL) in headers
                                else int((SIDE_HEADER, REFEREE_SIDE) in headers)
                            )
                            key = record.key.decode("utf-8", "replace") if record.key else ""
                            archived.append((tp.topic, tp.partition, record.offset, key, record.value, referee, rank))
                        archive_offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                if archived:
                    await self._archive_with_retry(archived, archive_offsets, stopping)
                    self.messages_archived += len(archived)
                    archived, archive_offsets = [], {}
                if pending and not first_pending_at:
                    first_pending_at = time.monotonic()
                due = pending and (
                    len(pending) >= self.batch_rows_max
                    or (time.monotonic() - first_pending_at) * 1000 >= self.flush_interval_ms
                    or not batch
                )
                if due:
                    write_started = time.monotonic()
                    await self._write_with_retry(pending, offsets, stopping)
                    metrics.record_sink_batch(len(pending), time.monotonic() - write_started)
                    self.rows_projected += len(pending)
                    pending, offsets, first_pending_at = [], {}, 0.0
                await self._measure_backlog(consumer, tps)
        finally:
            self._consumer = None
            await consumer.stop()

    async def _measure_backlog(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        backlog = 0
        for tp in tps:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                backlog += max(0, highwater - await consumer.position(tp))
        self.backlog = backlog
        metrics.record_sink_backlog(backlog)

    async def _archive_with_retry(self, rows, offsets, stopping: asyncio.Event) -> None:
        delay = retry_delay_initial_s
        while True:
            try:
                await self._call(self.archive.write, rows, offsets)
                return
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {str(error)[:300]}"
                log.warning("archive insert failed (%s); retrying in %.1fs", self.last_error, delay)
                if stopping.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(retry_delay_max_s, delay * 2)

    async def _call(self, function, *args):
        async with self.sink_lock:
            return await asyncio.to_thread(function, *args)

    async def _write_with_retry(self, entries, offsets, stopping: asyncio.Event) -> None:
        delay = retry_delay_initial_s
        while True:
            try:
                await self._call(self.sink.write, entries, offsets)
                self.last_error = None
                return
            except Exception as error:  # ClickHouse down, network: retry the same batch, idempotently
                self.last_error = f"{type(error).__name__}: {str(error)[:300]}"
                metrics.record_sink_failure()
                log.warning("projection insert failed (%s); retrying in %.1fs", self.last_error, delay)
                if stopping.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(retry_delay_max_s, delay * 2)
