"""Rebuilding an embedded broker's topics from ClickHouse (streams/restore.py): the ledger's last event of a customer
may be only partly projected, and the partition count must be the first run's."""

from __future__ import annotations

import json

import pytest
from test_restore import purchase

from projections import LedgerSink, connect, migrate
from projections.archive import RawArchive
from schemas.ledger import LedgerEntry
from streams import restore
from streams.applier import StreamApplier
from streams.routing import partition_for
from streams.rules.engine import apply
from streams.rules.ruleset import load_ruleset
from streams.rules.state import CustomerState
from streams.worker import event_entries_of


class _Sent:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset

    def add_callback(self, function) -> None:
        function(self)

    def add_errback(self, function) -> None:
        pass


class _Producer:
    """Records what the restore sends to the ledger topic; offsets count per partition."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, list]] = []

    def send(self, topic, value, key, partition, headers):
        self.sent.append((partition, value, headers))
        return _Sent(partition, sum(1 for sent in self.sent if sent[0] == partition) - 1)

    def flush(self) -> None:
        pass


@pytest.fixture
def client(tmp_path):
    opened = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(opened)
    yield opened
    opened.close()


def _archive(client, *events) -> None:
    messages = [
        ("loyalty.purchases", 0, offset, "c1", json.dumps(event.model_dump(mode="json")).encode(), 0, 1)
        for offset, event in enumerate(events)
    ]
    RawArchive(client).write(messages, {})


@pytest.mark.parametrize("second_archived", [True, False])
def test_a_customers_last_event_partly_projected_is_decided_again_not_folded_as_whole(client, second_archived):
    rules = load_ruleset()
    live = CustomerState("c1")
    first_event = purchase("e1", "o1", "2026-01-01T10:00:00+00:00")
    second_event = purchase("e2", "o2", "2026-01-02T10:00:00+00:00")
    first, second = apply(live, first_event, rules), apply(live, second_event, rules)
    assert len(second) >= 2
    # The projector's batch ended inside e2's entries, and then `loyalty up` stopped.
    LedgerSink(client).write(first + second[:1], {("loyalty.ledger", 0): len(first) + 1})
    _archive(client, first_event, *([second_event] if second_archived else []))

    producer = _Producer()
    ends, written = restore._restore_ledger(client, producer, 1)
    restored = [
        (LedgerEntry.model_validate_json(value), event_entries_of(headers)) for _, value, headers in producer.sent
    ]
    applier = StreamApplier(rules)
    applier.restore(0, restored)
    applier.finish_restore(0)
    state = applier.states[0]["c1"]
    if second_archived:
        # e2 is left out: the worker decides it again on the re-read input, writing every entry it produces.
        assert [entry.caused_by for entry, _ in restored] == ["e1"] * len(first)
        assert "e2" not in state.applied
        assert [entry.entry_id for entry in apply(state, second_event, rules)] == [e.entry_id for e in second]
    else:
        # Its input is gone with the broker: what ClickHouse has of it is all there is, kept as it is.
        assert [entry.caused_by for entry, _ in restored] == ["e1"] * len(first) + ["e2"]
    assert written == len(restored) and ends == {0: len(restored)}


def test_a_changed_partition_count_is_refused(client):
    keys = [f"c{number:06d}" for number in range(40)]
    messages = [
        ("loyalty.purchases", partition_for(key.encode(), 4), offset, key, b"{}", 0, 1)
        for offset, key in enumerate(keys)
    ]
    # One offset sequence per partition, as a broker would have given them.
    by_partition: dict[int, int] = {}
    archived = []
    for topic, partition, _, key, value, side, rank in messages:
        offset = by_partition.get(partition, 0)
        by_partition[partition] = offset + 1
        archived.append((topic, partition, offset, key, value, side, rank))
    RawArchive(client).write(archived, {})
    restore._check(client, 4)  # the first run's count: accepted
    with pytest.raises(restore.RestoreRefused, match="the partition count changed"):
        restore._check(client, 8)


def test_a_cut_over_whose_end_marker_is_archived_is_restored_as_compensated(client):
    """The end of the worker's wait after each archived cut-over marker is recorded "compensated" when an archived end
    marker of the apply names it (its compensations are archived before it: the worker decides them, again or
    already), else "restored"; the worker then decides a derived event's copy after the marker whose cause is history
    as covered by the compensation (streams/applier.py, `_decide_derived`), and by its cause's rules otherwise."""
    from schemas.topics import INPUT_TOPICS, REDEMPTIONS, REFERRALS
    from streams.cutover import end_marker

    class Sent:
        def get(self, timeout):
            return None

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, bytes]] = []

        def send(self, topic, value, key, partition):
            self.sent.append((key, value))
            return Sent()

        def flush(self) -> None:
            pass

    cuts = {topic: 5 for topic in INPUT_TOPICS}
    RawArchive(client).write(
        [
            *((topic, 0, 5, "", b"v2", 2, rank) for rank, topic in enumerate(INPUT_TOPICS)),
            (REFERRALS, 1, 7, "", b"v2", 2, 3),  # partition 1: no end marker archived (the apply died)
            (REDEMPTIONS, 0, 6, "", end_marker("v2", {(t, 0): o for t, o in cuts.items()}, 0), 4, 4),
        ],
        {},
    )
    producer = Producer()
    restore._restore_rulesets(client, producer)
    hows = {key.decode(): json.loads(value)["how"] for key, value in producer.sent if key.decode().startswith("ended:")}
    assert hows == {
        **{f"ended:{topic}:0:5": "compensated" for topic in INPUT_TOPICS},
        f"ended:{REFERRALS}:1:7": "restored",
    }
