"""Continue a data directory on a fresh embedded broker: its topics rebuilt from what ClickHouse kept.

The embedded broker keeps its log in memory, so a restarted `loyalty up` finds empty topics next to a data
directory whose ClickHouse holds the raw archive (every input message with its topic, partition and offset),
the ledger, the rule sets `loyalty replay --apply` put in force, and the positions the projector had reached.
Before the worker and the projector start, `restore_topics` writes back:

- every archived input message to its own topic and partition, in offset order, with its key and the header
  that told its side (referee copy, cut-over marker, derived event), so it lands at the offset it had: the
  archive's stored positions stay true, and the worker, which finds no committed offset, reads every input
  again and recognises each event it had applied (state remembers applied event ids) or decides it now if its
  entries never reached ClickHouse (the same entry ids, which the sink de-duplicates);
- the ledger, per customer in sequence order to the customer's partition, with the number of entries of each
  event (the header a worker's restore needs), so the worker rebuilds every customer's state by folding it;
  a customer's last event is left out when its input is archived, since it may be only partly projected
  (`_LEDGER_SQL`): the worker decides it again;
- the rule-set documents and one activation per archived cut-over marker, in the order they were archived, each
  with the end of the worker's wait after it for the apply's compensations: an apply that was running at the restart
  died with it (run it again), and the events it held, archived undecided, are decided without waiting, as after a
  wait that timed out; the end is recorded "compensated" when an archived end marker names the marker (its
  compensations are archived before it), "restored" otherwise;
- and the projector's ledger positions set to the rebuilt ledger's end (everything in it is projected).

It refuses, with the reason, when the archive cannot give the inputs back at their offsets (gaps, positions the
projector read past the archive), when the partition count is not the first run's (a customer's key would land on
another partition), or when the archive has cut-over markers whose rule set was not stored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from projections.archive import RawArchive, describe_gaps
from projections.queries import entry_of_row
from projections.sink import LEDGER_COLUMNS
from schemas.ledger import LedgerEntry
from schemas.topics import ARCHIVE_SIDE_HEADERS, INPUT_TOPICS, LEDGER, RULESETS
from streams.applier import end_marker_cuts
from streams.cutover import activation_record, ended_record, ruleset_record
from streams.routing import partition_for

log = logging.getLogger("loyalty")

_block_rows = 20_000


class RestoreRefused(RuntimeError):
    """The topics cannot be rebuilt from this data directory; the message says why."""


def needs_restore(client: Any) -> bool:
    """Whether the data directory holds anything a broker log carried: stored positions or ledger rows."""
    positions = client.query("SELECT count() FROM sink_offsets WHERE next_offset > 0").result_rows[0][0]
    entries = client.query("SELECT count() FROM ledger_entries").result_rows[0][0]
    archived = client.query("SELECT count() FROM raw_events").result_rows[0][0]  # archived before any position
    return bool(positions or entries or archived)


def restore_topics(client: Any, bootstrap: str, partitions: int) -> dict[str, int]:
    """Rebuild the input, ledger and rule-set topics of an empty broker from ClickHouse (see the module doc)."""
    from kafka import KafkaProducer

    started = time.monotonic()
    _check(client, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    try:
        rulesets = _restore_rulesets(client, producer)
        inputs = _restore_inputs(client, producer)
        ledger_ends, entries = _restore_ledger(client, producer, partitions)
        producer.flush()
    finally:
        producer.close()
    client.command(f"ALTER TABLE sink_offsets DELETE WHERE topic = '{LEDGER}' SETTINGS mutations_sync = 2")
    rows = sorted(ledger_ends.items())
    if rows:
        client.insert(
            "sink_offsets",
            [[LEDGER] * len(rows), [partition for partition, _ in rows], [end for _, end in rows]],
            column_names=("topic", "partition", "next_offset"),
            column_oriented=True,
        )
    figures = {"input_messages": inputs, "ledger_entries": entries, "rulesets": rulesets}
    log.info("restored the topics from ClickHouse in %.1fs: %s", time.monotonic() - started, figures)
    return figures


def _check(client: Any, partitions: int) -> None:
    extents = RawArchive(client).extents()
    gaps = [extent for extent in extents if extent[2] != extent[3]]
    if gaps:
        raise RestoreRefused(f"the raw archive has gaps ({describe_gaps(gaps)}), so the input topics cannot be rebuilt")
    archived_ends = {(topic, partition): end for topic, partition, _, end in extents}
    positions = client.query(
        "SELECT topic, partition, max(next_offset) FROM sink_offsets WHERE topic IN {topics:Array(String)} "
        "GROUP BY topic, partition",
        parameters={"topics": list(INPUT_TOPICS)},
    ).result_rows
    behind = [
        f"{topic}/{partition}: archived up to {archived_ends.get((topic, int(partition)), 0)}, read up to {position}"
        for topic, partition, position in positions
        if int(position) > archived_ends.get((topic, int(partition)), 0)
    ]
    if behind:
        raise RestoreRefused(
            f"input messages the projector read are missing from the raw archive ({', '.join(behind)})"
        )
    moved = [
        (key, int(partition))
        for key, partition in client.query(
            "SELECT DISTINCT routing_key, partition FROM raw_events WHERE routing_key != ''"
        ).result_rows
        if partition_for(key.encode(), partitions) != int(partition)
    ]
    if moved:
        key, partition = moved[0]
        raise RestoreRefused(
            f"the partition count changed: customer key {key!r} was archived on partition {partition}, and "
            f"LOYALTY_PARTITIONS={partitions} puts it on {partition_for(key.encode(), partitions)} "
            f"({len(moved)} keys moved); start with the partition count of the first run"
        )
    stored = client.query("SELECT max(partition) FROM sink_offsets").result_rows[0][0]
    archived = client.query("SELECT max(partition) FROM raw_events").result_rows[0][0]
    widest = max(int(stored or 0), int(archived or 0))
    if widest >= partitions:
        raise RestoreRefused(
            f"the data directory holds partition {widest}, more than LOYALTY_PARTITIONS={partitions} allows"
        )
    markers = client.query("SELECT DISTINCT value FROM raw_events WHERE referee_side = 2").result_rows
    known = {row[0] for row in client.query("SELECT version FROM rulesets").result_rows}
    missing = sorted({_text(row[0]) for row in markers} - known)
    if missing:
        raise RestoreRefused(
            f"the archive has cut-over markers to rule sets {missing} whose documents were not stored in "
            "ClickHouse (applied before this version), so the worker could not decide the events after them"
        )


def _restore_rulesets(client: Any, producer: Any) -> int:
    documents = client.query("SELECT version, argMax(text, recorded_at) FROM rulesets GROUP BY version").result_rows
    futures = []
    for version, text in documents:
        key, value = ruleset_record(version, text)
        futures.append(producer.send(RULESETS, key=key, value=value, partition=0))
    # In the order the markers were first archived (a marker archived again after a crash keeps its place).
    compensated = _compensated_cuts(client)
    for topic, partition, offset, version in RawArchive(client).cutover_markers():
        key, value = activation_record(topic, partition, offset, version)
        futures.append(producer.send(RULESETS, key=key, value=value, partition=0))
        # "compensated" when the apply's end marker naming it is archived: its compensations, before it in the same
        # partition, are archived too and decided by the worker (again, or already), so a derived event's copy after
        # the marker whose cause is history is covered by them (streams/applier.py, `_decide_derived`).
        how = "compensated" if (topic, partition, offset) in compensated else "restored"
        key, value = ended_record(topic, partition, offset, version, how)
        futures.append(producer.send(RULESETS, key=key, value=value, partition=0))
    producer.flush()
    for future in futures:
        future.get(timeout=30)  # raises if a document or an activation was not written
    return len(documents)


def _compensated_cuts(client: Any) -> set[tuple[str, int, int]]:
    """The cut-over markers (topic, partition, offset) an archived end marker of an apply names."""
    rows = client.query(
        "SELECT partition, any(value) FROM raw_events WHERE referee_side = 4 GROUP BY topic, partition, offset"
    ).result_rows
    cuts = set()
    for partition, value in rows:
        try:
            _, named = end_marker_cuts(value if isinstance(value, bytes) else str(value).encode())
        except ValueError:
            continue  # the worker dead-letters it: it ends no wait
        cuts.update((topic, int(partition), offset) for topic, offset in named.items())
    return cuts


def _restore_inputs(client: Any, producer: Any) -> int:
    """Every archived message back to its topic and partition, read in one pass in the table's own order (one
    FINAL read: each costs a merge of every part, whatever its filter); a partition's sends are checked to have
    landed at their archived offsets before the next partition's begin."""
    count = 0
    current: tuple[str, int] | None = None
    futures: list = []

    def check_landed() -> None:
        producer.flush()
        for offset, future in futures:
            landed = future.get(timeout=30).offset
            if landed != offset:
                raise RestoreRefused(
                    f"{current[0]}/{current[1]}: archived offset {offset} landed at {landed}; the broker was not empty"
                )
        futures.clear()

    with client.query_row_block_stream(
        "SELECT topic, partition, offset, routing_key, value, referee_side FROM raw_events FINAL "
        "ORDER BY topic, partition, offset",
        settings={"max_block_size": _block_rows},
        column_formats={"value": "bytes"},
    ) as stream:
        for block in stream:
            for topic, partition, offset, routing_key, value, side in block:
                if (topic, partition) != current:
                    check_landed()
                    current = (topic, partition)
                future = producer.send(
                    topic,
                    value=value if isinstance(value, bytes) else value.encode(),
                    key=routing_key.encode() if routing_key else None,
                    partition=int(partition),
                    headers=list(ARCHIVE_SIDE_HEADERS.get(int(side), ())),
                )
                futures.append((int(offset), future))
                count += 1
    check_landed()
    return count


# A customer's last event in ClickHouse may be only partly projected: the projector writes batches of records,
# and a batch (or a stop) can end inside one event's entries. Earlier events of the customer are complete (their
# later entries are at lower offsets of the same partition, all projected before). ClickHouse does not keep how
# many entries an event produced, so that last event is left out of the rebuilt ledger whenever its input is
# archived: the worker then decides it again when it re-reads the inputs (the same entries, the same ids, which
# the sink de-duplicates). Left in, a partial event would be folded as whole and its missing entries never written.
_LEDGER_SQL = f"""
SELECT {", ".join(LEDGER_COLUMNS)}
FROM ledger_entries FINAL
WHERE (customer_id, caused_by) NOT IN (
    SELECT customer_id, last_event
    FROM (SELECT customer_id, argMax(caused_by, sequence) AS last_event FROM ledger_entries FINAL GROUP BY customer_id)
    WHERE last_event IN (SELECT event_id FROM raw_events)
)
ORDER BY customer_id, sequence
"""


def _restore_ledger(client: Any, producer: Any, partitions: int) -> tuple[dict[int, int], int]:
    from streams.worker import EVENT_ENTRIES_HEADER, INPUT_HEADER, serialize_entry

    ends: dict[int, int] = {}
    failures: list[BaseException] = []
    written = 0

    def landed(metadata: Any) -> None:
        ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)

    def send_customer(entries: list[LedgerEntry]) -> None:
        per_event = Counter(entry.caused_by for entry in entries)  # the entries of each (complete) event
        key = entries[0].customer_id.encode()
        partition = partition_for(key, partitions)
        for entry in entries:
            headers = [
                (INPUT_HEADER, b"restored"),
                (EVENT_ENTRIES_HEADER, str(per_event[entry.caused_by]).encode()),
            ]
            future = producer.send(LEDGER, value=serialize_entry(entry), key=key, partition=partition, headers=headers)
            future.add_callback(landed)
            future.add_errback(failures.append)

    customer: list[LedgerEntry] = []
    with client.query_row_block_stream(_LEDGER_SQL, settings={"max_block_size": _block_rows}) as stream:
        for block in stream:
            for row in block:
                entry = entry_of_row(row)
                if customer and customer[0].customer_id != entry.customer_id:
                    send_customer(customer)
                    customer = []
                customer.append(entry)
                written += 1
    if customer:
        send_customer(customer)
    producer.flush()
    if failures:
        raise RuntimeError(f"rebuilding the ledger topic failed: {failures[0]!r} ({len(failures)} entries not written)")
    return ends, written


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
