"""The projector parses and checks the next ledger batch while the one before it is being written, and still
writes the batches one after the other, in offset order (no broker: a stand-in consumer hands out the batches)."""

from __future__ import annotations

import asyncio
import threading
from collections import namedtuple

from aiokafka.structs import TopicPartition

from projections import LedgerSink, PreparedJson
from schemas.ledger import LedgerEntry
from schemas.topics import LEDGER
from streams import projector as projector_module
from streams.projector import Projector

Record = namedtuple("Record", "offset value")
BATCH_ROWS = 5


class QueuedConsumer:
    """Hands out the ledger's records of partition 0 in polls of at most `max_records`, then nothing."""

    records: list[Record] = []

    def __init__(self, *args, **kwargs) -> None:
        self._position = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, partitions) -> None:
        pass

    def seek(self, partition, offset) -> None:
        self._position = offset

    def highwater(self, partition) -> int:
        return len(self.records)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(LEDGER, 0)}

    async def position(self, partition) -> int:
        return self._position

    async def getmany(self, timeout_ms: int, max_records: int):
        if self._position >= len(self.records):
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        polled = self.records[self._position : self._position + max_records]
        self._position += len(polled)
        return {TopicPartition(LEDGER, 0): polled}


class OverlapRecordingSink:
    """Records prepares and writes; the first write waits (up to 5 s) until the next batch has been prepared."""

    dirty_days = 0

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.written: list[list[bytes]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.second_prepared = threading.Event()
        self.overlapped = False
        self.prepared_writes: list[bool] = []

    def resume_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self.offsets)

    def recompute_dirty(self) -> int:
        return 0

    def prepare_json(self, values) -> PreparedJson:
        prepared = sum(1 for event in self.events if event[0] == "prepare")
        self.events.append(("prepare", prepared))
        if prepared == 1:
            self.second_prepared.set()
        return LedgerSink.prepare_json(values)

    def write_json(self, values, offsets, *, defer_recompute=False) -> int:
        self.prepared_writes.append(isinstance(values, PreparedJson) and values.table is not None)
        number = len(self.written)
        self.events.append(("write", number))
        if number == 0:
            self.overlapped = self.second_prepared.wait(5)
        self.written.append(list(values))
        self.offsets.update(offsets)
        self.events.append(("written", number))
        return len(values)


def test_the_projector_prepares_the_next_batch_while_one_is_written_and_writes_in_order(monkeypatch, scenario):
    values = [LedgerEntry.__pydantic_serializer__.to_json(entry) for entry in scenario]
    monkeypatch.setattr(QueuedConsumer, "records", [Record(offset, value) for offset, value in enumerate(values)])
    monkeypatch.setattr(projector_module, "AIOKafkaConsumer", QueuedConsumer)
    sink = OverlapRecordingSink()

    async def run() -> Projector:
        stopping = asyncio.Event()
        projector = Projector(
            bootstrap="127.0.0.1:9", sink=sink, sink_lock=asyncio.Lock(), partitions=1, batch_rows_max=BATCH_ROWS
        )
        task = asyncio.create_task(projector.run(stopping))
        try:
            async with asyncio.timeout(30):
                while sink.offsets.get((LEDGER, 0)) != len(values):
                    assert not task.done(), task.exception()
                    await asyncio.sleep(0.01)
        finally:
            stopping.set()
            await asyncio.wait_for(task, 10)
        return projector

    projector = asyncio.run(run())
    batches = [values[start : start + BATCH_ROWS] for start in range(0, len(values), BATCH_ROWS)]
    assert sink.written == batches
    writes = [event for event in sink.events if event[0] != "prepare"]
    assert writes == [(kind, number) for number in range(len(batches)) for kind in ("write", "written")]
    # The second batch was prepared before the first write ended (that write waited for it).
    assert sink.overlapped
    assert sink.prepared_writes == [True] * len(batches)  # every write got its batch parsed and checked already
    assert sink.events.index(("prepare", 1)) < sink.events.index(("written", 0))
    assert [event for event in sink.events if event[0] == "prepare"] == [("prepare", n) for n in range(len(batches))]
    assert projector.rows_projected == len(values) and projector.backlog == 0


def test_a_stopping_projector_with_a_drain_writes_everything_left_first_and_one_without_stops_at_once(
    monkeypatch, scenario
):
    """`loyalty up` with the embedded broker stops its worker, then the projector with `drain_on_stop_s`: it goes on
    until every partition is read to its end and written. Without the drain it stops at once."""
    values = [LedgerEntry.__pydantic_serializer__.to_json(entry) for entry in scenario]
    monkeypatch.setattr(QueuedConsumer, "records", [Record(offset, value) for offset, value in enumerate(values)])
    monkeypatch.setattr(projector_module, "AIOKafkaConsumer", QueuedConsumer)

    def stopped_before_it_starts(drain_on_stop_s: float) -> tuple[Projector, OverlapRecordingSink]:
        sink = OverlapRecordingSink()
        sink.second_prepared.set()  # no waiting in the first write
        projector = Projector(
            bootstrap="127.0.0.1:9",
            sink=sink,
            sink_lock=asyncio.Lock(),
            partitions=1,
            batch_rows_max=BATCH_ROWS,
            drain_on_stop_s=drain_on_stop_s,
        )
        stopping = asyncio.Event()
        stopping.set()
        asyncio.run(asyncio.wait_for(projector.run(stopping), 30))
        return projector, sink

    projector, sink = stopped_before_it_starts(30.0)
    assert [value for batch in sink.written for value in batch] == values
    assert sink.offsets[(LEDGER, 0)] == len(values)
    assert projector.drained is True and projector.backlog == 0

    projector, sink = stopped_before_it_starts(0.0)
    assert sink.written == [] and projector.drained is None

    # An end it never reaches (a producer still writing): it gives up after the bound, having written what it read.
    monkeypatch.setattr(QueuedConsumer, "highwater", lambda self, partition: len(self.records) + 1)
    projector, sink = stopped_before_it_starts(1.0)
    assert [value for batch in sink.written for value in batch] == values
    assert projector.drained is False and projector.backlog == 1
