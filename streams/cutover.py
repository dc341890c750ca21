"""Switching the live worker to a new rule set at an exact point of every input partition.

`loyalty replay --apply` first writes the rule-set document to `loyalty.rulesets`, then a cut-over marker
(a control message: header `loyalty-control: ruleset`, value = the version) into every input partition.
The worker decides each message with the rule set in force at the message's position: messages before a
partition's marker with the old one, messages after it with the new one, so no event is decided by both
rule sets or by neither. When the worker reads a marker it records the activation (topic, partition,
offset, version) in `loyalty.rulesets` before acking it, so a restarted worker knows every cut-over.

After its compensations the apply writes an end marker (header `loyalty-control: compensated`, value = the
version) into every partition of the compensations' topic: the worker holds a partition's events after a cut-over
until it has read the end marker there and applied the compensations before it (streams/applier.py), and records
`compensated:<version>:<partition>` in `loyalty.rulesets` so that a restarted worker does not hold them again.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from schemas.topics import COMPENSATED_CONTROL, CONTROL_HEADER, INPUT_TOPICS, REDEMPTIONS, RULESET_CONTROL, RULESETS
from streams.rules.ruleset import RuleSet, parse_ruleset

read_timeout_s = 30.0


def ruleset_record(version: str, text: str) -> tuple[bytes, bytes]:
    return f"ruleset:{version}".encode(), text.encode()


def activation_record(topic: str, partition: int, offset: int, version: str) -> tuple[bytes, bytes]:
    document = {"topic": topic, "partition": partition, "offset": offset, "version": version}
    return f"activation:{topic}:{partition}:{offset}".encode(), json.dumps(document).encode()


def compensated_record(version: str, partition: int, how: str) -> tuple[bytes, bytes]:
    document = {"version": version, "partition": partition, "how": how}
    return f"compensated:{version}:{partition}".encode(), json.dumps(document).encode()


class Recorded(NamedTuple):
    rulesets: dict[str, RuleSet]
    activations: list[tuple[str, int, int, str]]  # topic, partition, offset, version, in the order recorded
    compensated: set[tuple[str, int]]  # (version, partition) whose wait for the apply's compensations is over


async def read_rulesets(bootstrap: str) -> Recorded:
    """Every rule-set document, activation and end of an apply recorded in loyalty.rulesets (partition 0), read to
    its end."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    rulesets: dict[str, RuleSet] = {}
    activations: list[tuple[str, int, int, str]] = []
    compensated: set[tuple[str, int]] = set()
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
                elif key.startswith("compensated:"):
                    document = json.loads(record.value)
                    compensated.add((document["version"], document["partition"]))
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                break
            if time.monotonic() - started > read_timeout_s:
                raise RuntimeError("could not read loyalty.rulesets to its end")
    finally:
        await consumer.stop()
    return Recorded(rulesets, activations, compensated)


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


def publish_compensated(producer, version: str) -> int:
    """After an apply's compensations (acknowledged), its end marker into every partition of their topic, with the
    kafka-python producer that sent them; returns how many partitions."""
    futures = [
        producer.send(
            REDEMPTIONS,
            value=version.encode(),
            key=b"",
            partition=partition,
            headers=[(CONTROL_HEADER, COMPENSATED_CONTROL)],
        )
        for partition in sorted(producer.partitions_for(REDEMPTIONS))
    ]
    producer.flush()
    for future in futures:
        future.get(timeout=30)
    return len(futures)
