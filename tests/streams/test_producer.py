"""`loyalty produce` keeps the topics of a file close together on the broker (streams/producer.py)."""

from __future__ import annotations

import json

from streams import producer as producer_module
from streams.producer import produce_lines


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def send(self, topic, value, key, headers) -> None:
        self.calls.append(("send", json.loads(value)["event_id"]))

    def flush(self) -> None:
        self.calls.append(("flush", None))


def test_the_file_is_flushed_every_chunk_of_lines_so_no_topic_runs_ahead(monkeypatch):
    """Without the flushes the client sent each partition's batches when they filled: under CPU load a worker saw one
    topic's part of a 6,000-event file long before another's and applied 813-880 events out of event-time order
    (0 with the flushes, two runs each; docs/architecture.md)."""
    monkeypatch.setattr(producer_module, "flush_every_lines", 3)
    lines = [
        json.dumps(
            {"event_id": f"e{n}", "event_type": "customer.registered", "schema_version": 1,
             "occurred_at": "2026-01-01T00:00:00+00:00", "customer_id": f"c{n}", "store_id": "s"}
        ).encode() + b"\n"
        for n in range(7)
    ] + [b"\n"]  # fmt: skip
    recorder = _Recorder()
    counts = produce_lines(recorder, lines)
    assert sum(counts.values()) == 7
    sends_then_flushes = [name if name == "flush" else "send" for name, _ in recorder.calls]
    assert sends_then_flushes == ["send"] * 3 + ["flush"] + ["send"] * 3 + ["flush"] + ["send", "flush"]


def test_record_checksums_are_computed_by_the_compiled_crc32c_not_kafka_pythons_pure_python_fallback():
    """kafka-python checksums every record batch with CRC-32C; without the `crc32c` package (its `crc32c` extra, a
    dependency of ours) it falls back to a pure-Python loop, which took a quarter of `loyalty up`'s CPU while an apply
    published its compensations, and halved `loyalty produce` (15,000 against 32,000-36,000 messages/s:
    docs/performance.md)."""
    import crc32c
    from kafka.record import util
    from kafka.record._crc32c import crc as pure_python

    assert util.calc_crc32c.__defaults__[0] is crc32c.crc32c
    assert util.calc_crc32c.__defaults__[0] is not pure_python
    data = memoryview(b"123456789")
    assert util.calc_crc32c(data) == pure_python(data) == 0xE3069283  # the CRC-32C check value
