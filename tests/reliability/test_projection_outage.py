"""ClickHouse outages: the projector retries the same batch with backoff and skips nothing."""

from __future__ import annotations

import asyncio

import pytest

from schemas.ledger import LedgerEntry
from schemas.topics import ALL_TOPICS, LEDGER
from streams.batch import process_lines
from streams.broker import ensure_topics
from streams.projector import Projector
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

pytestmark = [pytest.mark.integration, pytest.mark.faults]
PARTITIONS = 4


class UnreachableThenHealthySink:
    """A sink whose first `failures` writes fail as a refused connection does; it records what it received."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[tuple[list[str], dict]] = []
        self.written: dict[str, object] = {}
        self.offsets: dict[tuple[str, int], int] = {}

    dirty_days = 0  # it keeps no aggregates

    def resume_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self.offsets)

    def recompute_dirty(self) -> int:
        return 0

    def write_json(self, values, offsets, *, defer_recompute=False) -> None:
        self.write([LedgerEntry.model_validate_json(value) for value in values], offsets)

    def write(self, entries, offsets) -> None:
        self.attempts.append(([entry.entry_id for entry in entries], dict(offsets)))
        if len(self.attempts) <= self.failures:
            raise ConnectionRefusedError(111, "Connection refused (http://127.0.0.1:1)")
        for entry in entries:
            assert self.written.setdefault(entry.entry_id, entry) == entry
        self.offsets.update(offsets)


def test_projector_retries_the_same_batch_while_clickhouse_is_unreachable_and_skips_nothing(broker):
    from kafka import KafkaProducer

    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    ledger = process_lines(generate_events(events=400, customers=50, seed=5, bad_share=0.0), load_ruleset()).ledger
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for entry in ledger:
            partition = sum(entry.customer_id.encode()) % PARTITIONS
            producer.send(LEDGER, value=entry.model_dump_json().encode(), partition=partition)
        producer.flush()
    finally:
        producer.close()
    sink = UnreachableThenHealthySink(failures=3)

    async def run() -> Projector:
        stopping = asyncio.Event()
        projector = Projector(
            bootstrap=broker.bootstrap,
            sink=sink,
            sink_lock=asyncio.Lock(),
            partitions=PARTITIONS,
            batch_rows_max=100_000,
            flush_interval_ms=50,
        )
        task = asyncio.create_task(projector.run(stopping))
        errors = []
        try:
            async with asyncio.timeout(60):
                while len(sink.written) < len(ledger):
                    if projector.last_error:
                        errors.append(projector.last_error)
                    assert not task.done(), task.exception()
                    await asyncio.sleep(0.05)
        finally:
            stopping.set()
            await asyncio.wait_for(task, 10)
        assert any("Connection refused" in error for error in errors)
        return projector

    projector = asyncio.run(run())
    assert set(sink.written) == {entry.entry_id for entry in ledger}
    assert len(sink.attempts) >= 4
    # The failed batch is retried as it was (same entries, same offsets) until it goes in.
    assert sink.attempts[1:4] == [sink.attempts[0]] * 3, "a retry changed its batch"
    assert projector.last_error is None
    assert sum(sink.offsets.values()) == len(ledger)
