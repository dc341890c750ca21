"""The raw event archive in ClickHouse: write input messages with their offsets, read them back for replay."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

__all__ = ["ArchivedMessage", "RawArchive"]

ARCHIVE_COLUMNS = (
    "topic",
    "partition",
    "offset",
    "routing_key",
    "value",
    "referee_side",
    "topic_rank",
    "event_id",
    "occurred_at",
)
# Messages whose time cannot be read are archived at this instant, so they sort first and are rejected again.
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
replay_block_rows = 50_000
# A replay reads the archive in slices of whole routing keys of about this many messages (`stream_for_replay`).
replay_slice_messages = 100_000


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    topic: str
    partition: int
    offset: int
    routing_key: str
    value: bytes
    # 0: the envelope's customer; 1: the referee's copy of a referral; 2: a cut-over marker; 3: an event the engine
    # derived (referral.reversed), which a replay derives again under its own rules instead of reading it; 4: an
    # apply's end marker; 5: a part of an apply's plan (schemas.topics.ARCHIVE_SIDE_HEADERS)
    referee_side: int
    topic_rank: int
    event_id: str
    occurred_at: datetime


def _peek(value: bytes) -> tuple[str, datetime]:
    """Event id and time of a raw message, best effort (validation is the replay's job)."""
    try:
        document = json.loads(value)
        event_id = document.get("event_id") if isinstance(document, dict) else None
        moment = datetime.fromisoformat(document["occurred_at"]).astimezone(UTC)
        if not (datetime(2000, 1, 1, tzinfo=UTC) <= moment < datetime(2100, 1, 1, tzinfo=UTC)):
            moment = UNKNOWN_TIME
    except Exception:  # anything unreadable: archived anyway, rejected again on replay
        return "", UNKNOWN_TIME
    return (event_id if isinstance(event_id, str) else "")[:128], moment


def describe_gaps(gaps: Iterable[tuple[str, int, int, int]]) -> str:
    """`RawArchive.gaps` for a message: "topic/partition: archived of expected, ..."."""
    return ", ".join(f"{topic}/{partition}: {have} of {want}" for topic, partition, have, want in gaps)


def below_markers(markers: Mapping[tuple[str, int], int], name: str = "marker") -> tuple[str, dict]:
    """A condition on raw_events' (topic, partition, offset): the message lies below its partition's offset in
    `markers` (false in a partition without one), with its parameters (named after `name`)."""
    items = sorted(markers.items())
    condition = (
        f"offset < arrayElement({{{name}_offsets:Array(UInt64)}}, "
        f"indexOf({{{name}_keys:Array(String)}}, concat(topic, '/', toString(partition))))"
    )
    return condition, {
        f"{name}_keys": [f"{topic}/{partition}" for (topic, partition), _ in items],
        f"{name}_offsets": [offset for _, offset in items],
    }


class RawArchive:
    def __init__(self, client: Client) -> None:
        self._client = client

    def write(self, messages: Iterable[ArchivedMessage | tuple], offsets: Mapping[tuple[str, int], int]) -> int:
        """Archive messages, then record `offsets` (next offset per input partition) in sink_offsets."""
        rows = []
        for message in messages:
            if isinstance(message, tuple):
                topic, partition, offset, key, value, referee_side, rank = message
                event_id, moment = _peek(value)
                message = ArchivedMessage(topic, partition, offset, key, value, referee_side, rank, event_id, moment)
            rows.append(
                [
                    message.topic,
                    message.partition,
                    message.offset,
                    message.routing_key,
                    message.value,
                    int(message.referee_side),
                    message.topic_rank,
                    message.event_id,
                    message.occurred_at,
                ]
            )
        if rows:
            columns = [list(column) for column in zip(*rows, strict=True)]
            self._client.insert("raw_events", columns, column_names=ARCHIVE_COLUMNS, column_oriented=True)
        if offsets:
            items = sorted(offsets.items())
            self._client.insert(
                "sink_offsets",
                [[topic for (topic, _), _ in items], [p for (_, p), _ in items], [o for _, o in items]],
                column_names=("topic", "partition", "next_offset"),
                column_oriented=True,
            )
        return len(rows)

    def extents(self) -> list[tuple[str, int, int, int]]:
        """(topic, partition, offsets archived, offsets expected: the last one + 1) of every archived partition."""
        result = self._client.query(
            "SELECT topic, partition, uniqExact(offset), max(offset) + 1 FROM raw_events GROUP BY topic, partition"
        )
        return [(row[0], int(row[1]), int(row[2]), int(row[3])) for row in result.result_rows]

    def gaps(self) -> list[tuple[str, int, int, int]]:
        """The `extents` of the partitions with holes below their end."""
        return [extent for extent in self.extents() if extent[2] != extent[3]]

    def count(self) -> int:
        return int(self._client.query("SELECT uniqExact(topic, partition, offset) FROM raw_events").result_rows[0][0])

    def estimate(self) -> int:
        """About how many messages are archived, read from the parts' row counts without a scan (copies of one
        message not yet merged away count twice): a progress bar's 100%, where `count` scanned every offset."""
        return int(self._client.query("SELECT count() FROM raw_events").result_rows[0][0])

    def cutover_markers(self) -> list[tuple[str, int, int, str]]:
        """Every archived cut-over marker as (topic, partition, offset, rule-set version), in the order the markers
        were first archived: the applies' order (a marker archived again after a crash keeps its place)."""
        rows = self._client.query(
            "SELECT topic, partition, offset, any(value), min(archived_at) AS first FROM raw_events "
            "WHERE referee_side = 2 GROUP BY topic, partition, offset ORDER BY first, topic, partition, offset"
        ).result_rows
        return [
            (topic, int(partition), int(offset), value.decode() if isinstance(value, bytes) else str(value))
            for topic, partition, offset, value, _ in rows
        ]

    def keys_between(self, low: Mapping[tuple[str, int], int], high: Mapping[tuple[str, int], int]) -> set[str]:
        """The routing keys of the messages below `high` and not below `low` in their partition (offsets per input
        partition, as `below_markers` reads them)."""
        above, low_parameters = below_markers(low, "low")
        below, high_parameters = below_markers(high, "high")
        rows = self._client.query(
            f"SELECT DISTINCT routing_key FROM raw_events WHERE {below} AND NOT ({above})",
            parameters=low_parameters | high_parameters,
        ).result_rows
        return {row[0] for row in rows}

    def stream_for_replay(
        self,
        since: datetime | None = None,
        keys: Iterable[str] | None = None,
        before: Mapping[tuple[str, int], int] | None = None,
    ) -> Iterator[ArchivedMessage]:
        """Every archived message once (or those of the routing `keys`), per routing key in (occurred_at,
        topic rank, offset) order; with `before` (an offset per input partition: an apply's cut-over markers),
        only the messages below it in their partition.

        The whole archive is read in slices of whole routing keys, about `replay_slice_messages` messages each
        (`_slices`), each a range of the `by_customer` projection's key (migration 0022), so that what ClickHouse
        holds for the read is one slice, not the archive: sorting the whole archive by customer held all of it in
        memory (docs/performance.md, "Replay memory"). No read uses FINAL: a message archived twice (a retried write:
        the same topic, partition and offset, the same bytes) is dropped here, among its routing key's messages.
        FINAL would merge every part of the table for any filter (about 400 ms on a 1M-message archive, against
        13 ms without it, for two customers).
        """
        conditions, parameters = [], {}
        if since is not None:
            conditions.append("occurred_at >= {since:DateTime64(6, 'UTC')}")
            parameters["since"] = since
        if keys is not None:
            conditions.append("routing_key IN {keys:Array(String)}")
            parameters["keys"] = sorted(keys)
        if before is not None:
            condition, bounds = below_markers(before)
            conditions.append(condition)
            parameters.update(bounds)
        if keys is not None:
            yield from self._read(conditions, parameters)
            return
        # Contiguous ranges over every key, the first and last open: a key archived meanwhile (a projector on another
        # host) is read in the range it falls in, as one query would have read it or not.
        highs = self._slices(conditions, parameters) or [""]
        for number, high in enumerate(highs):
            bounded, bounds = list(conditions), dict(parameters)
            if number > 0:
                bounded.append("routing_key > {slice_low:String}")
                bounds["slice_low"] = highs[number - 1]
            if number < len(highs) - 1:
                bounded.append("routing_key <= {slice_high:String}")
                bounds["slice_high"] = high
            yield from self._read(bounded, bounds)

    def _slices(self, conditions: list[str], parameters: dict) -> list[str]:
        """The last routing key of each of consecutive slices of the messages matching `conditions`, about
        `replay_slice_messages` each and never splitting a key: one row per slice, computed in ClickHouse, so neither
        side holds more than the keys' counts."""
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._client.query(
            "SELECT max(routing_key) FROM ("
            "SELECT routing_key, intDiv(sum(messages) OVER (ORDER BY routing_key ROWS UNBOUNDED PRECEDING) - 1, "
            "{slice_messages:UInt64}) AS slice FROM ("
            f"SELECT routing_key, count() AS messages FROM raw_events {where} GROUP BY routing_key)) "
            "GROUP BY slice ORDER BY slice",
            parameters={**parameters, "slice_messages": replay_slice_messages},
        ).result_rows
        return [row[0] for row in rows]

    def _read(self, conditions: list[str], parameters: dict) -> Iterator[ArchivedMessage]:
        """The messages matching `conditions` in replay order, each once (copies of one message are dropped)."""
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        query = (
            f"SELECT {', '.join(ARCHIVE_COLUMNS)} FROM raw_events {where} "
            "ORDER BY routing_key, occurred_at, topic_rank, offset"
        )
        key, seen = None, set()  # the positions of the current routing key's messages: copies share the key
        with self._client.query_row_block_stream(
            query,
            parameters=parameters,
            settings={"max_block_size": replay_block_rows},
            column_formats={"value": "bytes"},
        ) as stream:
            for block in stream:
                for row in block:
                    if row[3] != key:
                        key, seen = row[3], set()
                    position = (row[0], int(row[1]), int(row[2]))
                    if position in seen:
                        continue
                    seen.add(position)
                    moment = row[8] if row[8].tzinfo else row[8].replace(tzinfo=UTC)
                    value = row[4] if isinstance(row[4], bytes) else row[4].encode()
                    yield ArchivedMessage(
                        row[0], int(row[1]), int(row[2]), row[3], value, int(row[5]), int(row[6]), row[7], moment
                    )
