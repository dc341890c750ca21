"""The projector defers the daily aggregates while it drains a backlog, and never leaves them behind."""

from __future__ import annotations

import asyncio
from datetime import date

import pytest

from projections import LedgerSink, connect, migrate, queries
from schemas.ledger import LedgerEntry
from schemas.topics import ALL_TOPICS, LEDGER
from streams import projector as projector_module
from streams.batch import process_lines
from streams.broker import ensure_topics
from streams.projector import Projector
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

pytestmark = [pytest.mark.integration]
PARTITIONS = 2
FIRST_DAY, LAST_DAY = date(2025, 12, 1), date(2026, 12, 31)


def dashboard(client) -> tuple:
    return (
        queries.points_status(client, FIRST_DAY, LAST_DAY, "month"),
        queries.point_sources(client, FIRST_DAY, LAST_DAY, "product"),
        queries.top_earners(client, FIRST_DAY, LAST_DAY, 20),
    )


class RecordingSink(LedgerSink):
    """The real sink, recording whether each write deferred its recompute."""

    def __init__(self, client) -> None:
        super().__init__(client)
        self.deferred: list[bool] = []

    def write_json(self, values, offsets=None, *, defer_recompute=False):
        self.deferred.append(defer_recompute)
        return super().write_json(values, offsets, defer_recompute=defer_recompute)


async def drain(bootstrap: str, sink, batch_rows_max: int, until) -> None:
    stopping = asyncio.Event()
    projector = Projector(
        bootstrap=bootstrap,
        sink=sink,
        sink_lock=asyncio.Lock(),
        partitions=PARTITIONS,
        batch_rows_max=batch_rows_max,
        flush_interval_ms=60_000,  # only full batches, or a poll that brings nothing, write
    )
    task = asyncio.create_task(projector.run(stopping))
    try:
        async with asyncio.timeout(60):
            while not until():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("batch_rows", [100, "whole ledger"])
def test_a_backlog_drained_in_full_batches_leaves_no_day_behind(broker, tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(projector_module, "recompute_interval_s", 3600.0)  # defer every full batch
    ledger = process_lines(generate_events(events=600, customers=40, seed=11, bad_share=0.0), load_ruleset()).ledger
    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for entry in ledger:
            value = LedgerEntry.__pydantic_serializer__.to_json(entry)
            producer.send(LEDGER, value=value, partition=sum(entry.customer_id.encode()) % PARTITIONS)
        producer.flush()
    finally:
        producer.close()

    reference = connect(f"chdb://{tmp_path / 'reference'}")
    try:
        migrate(reference)
        LedgerSink(reference).write(ledger)
        expected = dashboard(reference)
    finally:
        reference.close()

    client = connect(f"chdb://{tmp_path / 'projected'}")
    try:
        migrate(client)
        sink = RecordingSink(client)
        rows = len(ledger) if batch_rows == "whole ledger" else batch_rows
        asyncio.run(drain(broker.bootstrap, sink, rows, lambda: sink.resume_offsets() and sink.dirty_days == 0
                          and sum(sink.resume_offsets().values()) == len(ledger)))  # fmt: skip
        assert sink.deferred and all(sink.deferred[:-1]), sink.deferred
        if batch_rows == "whole ledger":
            # One full batch, deferred; nothing more came: only the poll that brought nothing recomputed.
            assert sink.deferred == [True]
        assert dashboard(client) == expected
        assert client.query("SELECT count() FROM dirty_days FINAL WHERE dirty = 1").result_rows == [(0,)]
    finally:
        client.close()


def test_days_an_earlier_projector_left_dirty_are_recomputed_when_the_next_one_starts(broker, tmp_path):
    ledger = process_lines(generate_events(events=300, customers=30, seed=12, bad_share=0.0), load_ruleset()).ledger
    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    client = connect(f"chdb://{tmp_path / 'projected'}")
    try:
        migrate(client)
        values = [LedgerEntry.__pydantic_serializer__.to_json(entry) for entry in ledger]
        # The earlier projector: it stored every row and offset, deferring the recompute, then stopped.
        LedgerSink(client).write_json(values, {(LEDGER, 0): 0}, defer_recompute=True)
        assert queries.points_status(client, FIRST_DAY, LAST_DAY, "month").totals.issued == 0
        sink = RecordingSink(client)
        recomputed = []
        original = sink.recompute_dirty
        sink.recompute_dirty = lambda days=None: recomputed.append(original(days)) or recomputed[-1]
        asyncio.run(drain(broker.bootstrap, sink, 100, lambda: bool(recomputed)))
        assert recomputed[0] > 0 and sink.deferred == []  # nothing new was written: the start caught up
        issued = sum(e.points for e in ledger if e.kind in ("earned", "confirmed"))
        assert queries.points_status(client, FIRST_DAY, LAST_DAY, "month").totals.issued == issued > 0
    finally:
        client.close()
