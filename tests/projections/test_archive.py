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
