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


def test_the_whole_archive_is_read_in_slices_of_whole_keys_with_the_same_messages_as_in_one(client, monkeypatch):
    """`stream_for_replay` reads the archive in slices of whole routing keys (memory bounded by a slice, not the
    archive): however small the slices, the messages and their order are those of one read, each once, and the
    `since` and `before` filters hold in every slice."""
    from datetime import UTC, datetime

    import projections.archive as archive_module

    archive = RawArchive(client)
    archive.write(_messages(0, 60), {})
    archive.write(_messages(20, 25), {})  # copies of offsets 20-44, not merged yet
    whole = [(m.routing_key, m.offset) for m in archive.stream_for_replay()]
    bounded = [(m.routing_key, m.offset) for m in archive.stream_for_replay(before={("loyalty.purchases", 0): 33})]
    since = [m.offset for m in archive.stream_for_replay(since=datetime(1970, 1, 1, tzinfo=UTC))]
    assert sorted(whole) == sorted((f"c{offset % 7}", offset) for offset in range(60)) and whole == sorted(whole)
    for size in (1, 5, 24, 1000):
        monkeypatch.setattr(archive_module, "replay_slice_messages", size)
        slices = archive._slices([], {})
        assert slices == sorted(set(slices))  # consecutive ranges of whole keys, each ending at its own key
        # One per key (7 keys of about 12 rows) when a key fills a slice, one for the whole archive, or between.
        assert {1: 7 == len(slices), 5: 7 == len(slices), 24: 2 < len(slices) < 7, 1000: len(slices) == 1}[size]
        assert [(m.routing_key, m.offset) for m in archive.stream_for_replay()] == whole
        assert [
            (m.routing_key, m.offset) for m in archive.stream_for_replay(before={("loyalty.purchases", 0): 33})
        ] == bounded
        assert [m.offset for m in archive.stream_for_replay(since=datetime(1970, 1, 1, tzinfo=UTC))] == since
    assert bounded == [item for item in whole if item[1] < 33]


def test_a_slice_of_the_archive_is_read_from_the_by_customer_projection(client) -> None:
    """Migration 0022's projection serves the replay's reads: a slice reads it, not the table sorted whole."""
    archive = RawArchive(client)
    archive.write(_messages(0, 30), {})
    client.command("OPTIMIZE TABLE raw_events FINAL")
    plan = "\n".join(
        row[0]
        for row in client.query(
            "EXPLAIN projections = 1 SELECT value FROM raw_events WHERE routing_key >= 'c2' AND routing_key <= 'c4' "
            "ORDER BY routing_key, occurred_at, topic_rank, offset"
        ).result_rows
    )
    assert "by_customer" in plan


def test_a_key_archived_between_the_slicing_and_the_reads_is_read_in_the_range_it_falls_in(client, monkeypatch):
    """The slices are contiguous and open at both ends: a customer first archived after they were cut (a projector
    on another host writes meanwhile) is read, before, between or after the keys the slices were cut from."""
    import projections.archive as archive_module

    archive = RawArchive(client)
    archive.write(_messages(0, 21), {})
    monkeypatch.setattr(archive_module, "replay_slice_messages", 6)
    stale = archive._slices([], {})
    assert len(stale) > 2
    late = [("loyalty.purchases", 1, offset, key, b'{"event_id": "late"}', 0, 0) for offset, key in enumerate(
        ["a-first", "c35", "z-last"])]  # fmt: skip
    archive.write(late, {})
    monkeypatch.setattr(RawArchive, "_slices", lambda self, conditions, parameters: stale)
    keys = [m.routing_key for m in archive.stream_for_replay()]
    assert keys == sorted(keys) and {"a-first", "c35", "z-last"} <= set(keys) and len(keys) == 24
