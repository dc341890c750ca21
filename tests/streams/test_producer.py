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
