"""The raw archive's counts: `count` is exact, `estimate` (the replay progress bar's 100%) reads no column."""

from __future__ import annotations

from projections.archive import RawArchive


def _messages(first: int, count: int) -> list[tuple]:
    return [
        ("loyalty.purchases", 0, offset, f"c{offset % 7}", b'{"event_id": "e%d"}' % offset, 0, 0)
        for offset in range(first, first + count)
    ]


def test_count_is_exact_and_estimate_counts_stored_rows(client) -> None:
    archive = RawArchive(client)
    archive.write(_messages(0, 40), {("loyalty.purchases", 0): 40})
    assert archive.count() == archive.estimate() == 40

    archive.write(_messages(30, 20), {("loyalty.purchases", 0): 50})  # a retried batch: offsets 30-39 again
    assert archive.count() == 50
    # Copies not merged away yet count twice in the estimate, never fewer than the distinct messages.
    assert 50 <= archive.estimate() <= 60


def test_a_message_archived_twice_is_read_once_for_all_keys_and_for_some(client) -> None:
    archive = RawArchive(client)
    archive.write(_messages(0, 40), {("loyalty.purchases", 0): 40})
    archive.write(_messages(10, 20), {("loyalty.purchases", 0): 40})  # a retried write, not merged yet
    every = [(m.routing_key, m.offset) for m in archive.stream_for_replay()]
    assert sorted(every) == sorted((f"c{offset % 7}", offset) for offset in range(40))
    assert every == sorted(every)  # per routing key, then (occurred_at: all equal here, rank) and offset
    some = [(m.routing_key, m.offset) for m in archive.stream_for_replay(keys=["c3", "c5"])]
    assert some == [item for item in every if item[0] in ("c3", "c5")]
    assert len(some) == len(set(some)) > 0
