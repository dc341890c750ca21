"""Switching the live worker to a new rule set at an exact point of every input partition.

`loyalty replay --apply` first writes the rule-set document to `loyalty.rulesets`, then a cut-over marker
(a control message: header `loyalty-control: ruleset`, value = the version) into every input partition.
The worker decides each message with the rule set in force at the message's position: messages before a
partition's marker with the old one, messages after it with the new one, so no event is decided by both
rule sets or by neither. When the worker reads a marker it records the activation (topic, partition,
offset, version) in `loyalty.rulesets` before acking it, so a restarted worker knows every cut-over.

After its compensations the apply writes an end marker (header `loyalty-control: compensated`, value = JSON: the
version and, per input topic, the offset of its cut-over marker in the partition of that number) into every
partition of the compensations' topic: the worker holds the events after a cut-over marker until an end marker
names it, and applies the compensations before that end marker first (streams/applier.py). Each end of such a wait
is recorded as `ended:<topic>:<partition>:<marker offset>` in `loyalty.rulesets`, so that a restarted worker does
not hold them again.

Before its compensations the apply writes its plan (header `loyalty-control: plan`) into every partition of the same
topic: which customers of that partition it compensates, with how many messages each, in parts of at most
`plan_part_bytes`. Once the worker has read every part of a partition's plan, the events of the customers it does not
name stop waiting, and each named customer's events wait only until that customer's compensations are applied (a
referrer's until the end marker: streams/applier.py).
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from schemas.topics import (
    COMPENSATED_CONTROL,
    CONTROL_HEADER,
    INPUT_TOPICS,
    PLAN_CONTROL,
    REDEMPTIONS,
    RULESET_CONTROL,
    RULESETS,
)
from streams.rules.ruleset import RuleSet, parse_ruleset

read_timeout_s = 30.0
# A part of an apply's plan stays under this (the worker refuses events over 64 KiB; the plan is no event, but its
# parts are read in the worker's batches like one).
plan_part_bytes = 48 * 1024


def ruleset_record(version: str, text: str) -> tuple[bytes, bytes]:
    return f"ruleset:{version}".encode(), text.encode()


def activation_record(topic: str, partition: int, offset: int, version: str) -> tuple[bytes, bytes]:
    document = {"topic": topic, "partition": partition, "offset": offset, "version": version}
    return f"activation:{topic}:{partition}:{offset}".encode(), json.dumps(document).encode()


def ended_record(topic: str, partition: int, offset: int, version: str, how: str) -> tuple[bytes, bytes]:
    """The end of the worker's wait for an apply's compensations after the cut-over marker at `offset`."""
    document = {"topic": topic, "partition": partition, "offset": offset, "version": version, "how": how}
    return f"ended:{topic}:{partition}:{offset}".encode(), json.dumps(document).encode()


class Recorded(NamedTuple):
    rulesets: dict[str, RuleSet]
    activations: list[tuple[str, int, int, str]]  # topic, partition, offset, version, in the order recorded
    # Cut-over markers (topic, partition, offset) after which nothing waits, with how the wait ended (the last record:
    # "compensated" once the apply's end marker was read, even after a wait that ended otherwise).
    ended: dict[tuple[str, int, int], str]


async def read_rulesets(bootstrap: str) -> Recorded:
    """Every rule-set document, activation and end of an apply recorded in loyalty.rulesets (partition 0), read to
    its end."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    rulesets: dict[str, RuleSet] = {}
    activations: list[tuple[str, int, int, str]] = []
    ended: dict[tuple[str, int, int], str] = {}
    try:
        tp = TopicPartition(RULESETS, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        started = time.monotonic()
        while True:
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=1000)
            for record in batch.get(tp, []):
                key = (record.key or b"").decode()
                if key.startswith("ruleset:"):
                    ruleset = parse_ruleset(record.value.decode(), key)
                    rulesets[ruleset.version] = ruleset
                elif key.startswith("activation:"):
                    document = json.loads(record.value)
                    activations.append(
                        (document["topic"], document["partition"], document["offset"], document["version"])
                    )
                elif key.startswith("ended:"):
                    document = json.loads(record.value)
                    cut = (document["topic"], document["partition"], document["offset"])
                    if ended.get(cut) != "compensated":  # once compensated, always
                        ended[cut] = str(document.get("how", ""))
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                break
            if time.monotonic() - started > read_timeout_s:
                raise RuntimeError("could not read loyalty.rulesets to its end")
    finally:
        await consumer.stop()
    return Recorded(rulesets, activations, ended)


def publish_cutover(bootstrap: str, ruleset: RuleSet, text: str, partitions: int) -> dict[tuple[str, int], int]:
    """Write the rule set, then a marker into every input partition; returns each marker's offset."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=5)
    try:
        key, value = ruleset_record(ruleset.version, text)
        producer.send(RULESETS, key=key, value=value, partition=0).get(timeout=30)
        futures = {
            (topic, partition): producer.send(
                topic,
                value=ruleset.version.encode(),
                key=b"",
                partition=partition,
                headers=[(CONTROL_HEADER, RULESET_CONTROL)],
            )
            for topic in INPUT_TOPICS
            for partition in range(partitions)
        }
        return {tp: future.get(timeout=30).offset for tp, future in futures.items()}
    finally:
        producer.close()


def end_marker(version: str, markers: dict[tuple[str, int], int], partition: int) -> bytes:
    """The end marker's value for `partition`: the version and its cut-over marker's offset in every input topic."""
    return json.dumps({"version": version, "cuts": _cuts_of(markers, partition)}).encode()


def _cuts_of(markers: dict[tuple[str, int], int], partition: int) -> dict[str, int]:
    """The apply's cut-over marker offset per input topic in the partitions of number `partition`."""
    return {topic: offset for (topic, number), offset in sorted(markers.items()) if number == partition}


def plan_records(
    version: str, markers: dict[tuple[str, int], int], customers: dict[str, int], partitions: int
) -> list[tuple[int, bytes]]:
    """An apply's plan as (partition, value) records: per partition of the compensations' topic, the customers of that
    partition it compensates (customer -> number of compensation messages, sorted), in parts of at most
    `plan_part_bytes`; every partition gets at least one part, each part says its number and how many there are."""
    from streams.routing import partition_for

    per_partition: dict[int, dict[str, int]] = {partition: {} for partition in range(partitions)}
    for customer, count in sorted(customers.items()):
        per_partition[partition_for(customer.encode(), partitions)][customer] = count
    records = []
    for partition, named in per_partition.items():
        cuts = _cuts_of(markers, partition)
        overhead = len(json.dumps({"version": version, "cuts": cuts, "part": 10**6, "parts": 10**6, "customers": {}}))
        parts: list[dict[str, int]] = [{}]
        size = overhead
        for customer, count in named.items():
            item = len(json.dumps({customer: count})) + 1
            if parts[-1] and size + item > plan_part_bytes:
                parts.append({})
                size = overhead
            parts[-1][customer] = count
            size += item
        for number, part in enumerate(parts):
            document = {"version": version, "cuts": cuts, "part": number, "parts": len(parts), "customers": part}
            records.append((partition, json.dumps(document).encode()))
    return records


def publish_plan(producer, version: str, markers: dict[tuple[str, int], int], customers: dict[str, int]) -> int:
    """Before an apply's compensations, its plan into every partition of their topic (`plan_records`), acknowledged
    before any compensation is sent, with the kafka-python producer that sends them. Returns how many parts."""
    records = plan_records(version, markers, customers, len(producer.partitions_for(REDEMPTIONS)))
    return _send_controls(producer, records, PLAN_CONTROL)


def publish_compensated(producer, version: str, markers: dict[tuple[str, int], int]) -> int:
    """After an apply's compensations (acknowledged), its end marker into every partition of their topic, with the
    kafka-python producer that sent them; `markers`: the apply's cut-over markers. Returns how many partitions."""
    records = [
        (partition, end_marker(version, markers, partition))
        for partition in sorted(producer.partitions_for(REDEMPTIONS))
    ]
    return _send_controls(producer, records, COMPENSATED_CONTROL)


def _send_controls(producer, records: list[tuple[int, bytes]], control: bytes) -> int:
    """Send (partition, value) control messages of kind `control` to the compensations' topic and wait until the
    broker has them all (nothing sent after them can overtake them); returns how many."""
    futures = [
        producer.send(REDEMPTIONS, value=value, key=b"", partition=partition, headers=[(CONTROL_HEADER, control)])
        for partition, value in records
    ]
    producer.flush()
    for future in futures:
        future.get(timeout=30)
    return len(futures)
