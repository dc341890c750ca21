"""The embedded broker starts, serves Kafka clients on loopback, creates topics idempotently and stops."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from schemas.topics import ALL_TOPICS, LEDGER, PURCHASES
from streams.broker import BrokerError, EmbeddedBroker, ensure_topics, free_port, kafka_ping, port_is_free

pytestmark = pytest.mark.integration

PARTITIONS = 4


def _read_all(bootstrap: str, topic: str, partitions: int, expected: int) -> list[tuple[int, int, bytes, bytes, list]]:
    """(partition, offset, key, value, headers) of each record, by manual assignment (no consumer group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[tuple[int, int, bytes, bytes, list]] = []
        for _ in range(50):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend((r.partition, r.offset, r.key, r.value, r.headers) for r in batch)
            if len(records) >= expected:
                break
        return records
    finally:
        consumer.close()


def test_start_exposes_loopback_bootstrap_and_answers_kafka(broker: EmbeddedBroker) -> None:
    host, port = broker.bootstrap.split(":")
    assert host == "127.0.0.1"
    assert int(port) == broker.port > 0
    assert broker.running
    assert kafka_ping("127.0.0.1", broker.port)


def test_topics_with_four_partitions_round_trip_records(broker: EmbeddedBroker) -> None:
    counts = ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    assert counts == {topic: PARTITIONS for topic in ALL_TOPICS}

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        for i in range(20):
            producer.send(
                PURCHASES,
                key=f"c{i}".encode(),
                value=f"v{i}".encode(),
                partition=i % PARTITIONS,
                headers=[("n", str(i).encode())],
            )
        producer.flush(timeout=10)
    finally:
        producer.close()

    records = _read_all(broker.bootstrap, PURCHASES, PARTITIONS, expected=20)
    assert len(records) == 20
    for partition, offset, key, value, headers in records:
        i = int(value.decode()[1:])
        assert partition == i % PARTITIONS
        assert offset == i // PARTITIONS  # appended in order, per partition
        assert key == f"c{i}".encode()
        assert headers == [("n", str(i).encode())]
    assert _read_all(broker.bootstrap, LEDGER, PARTITIONS, expected=0) == []


def test_ensure_topics_is_idempotent(broker: EmbeddedBroker) -> None:
    first = ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    second = ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    # Some existing and some new in one call is fine too.
    third = ensure_topics(broker.bootstrap, [LEDGER, "loyalty.extra"], PARTITIONS)
    assert first == second == {topic: PARTITIONS for topic in ALL_TOPICS}
    assert third == {LEDGER: PARTITIONS, "loyalty.extra": PARTITIONS}


def test_ensure_topics_rejects_a_different_partition_count(broker: EmbeddedBroker) -> None:
    ensure_topics(broker.bootstrap, [LEDGER], PARTITIONS)
    with pytest.raises(BrokerError, match=r"loyalty\.ledger has 4"):
        ensure_topics(broker.bootstrap, [LEDGER, PURCHASES], 8)


def test_stop_terminates_the_process_and_releases_the_port(broker: EmbeddedBroker) -> None:
    port, pid = broker.port, broker.pid
    assert pid is not None
    assert not port_is_free(port)
    broker.stop()
    assert not broker.running
    assert port_is_free(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child was terminated and reaped
    with pytest.raises(BrokerError):
        _ = broker.bootstrap
    broker.stop()  # stopping twice is harmless


def test_context_manager_starts_and_stops(tmp_path) -> None:
    log = tmp_path / "broker.log"
    with EmbeddedBroker(log_path=log) as running:
        port = running.port
        assert kafka_ping("127.0.0.1", port)
    assert not running.running
    assert port_is_free(port)
    assert "listening on" in log.read_text()


def test_explicit_port_is_used(broker_factory: Callable[..., EmbeddedBroker]) -> None:
    port = free_port()
    started = broker_factory(port=port)
    assert started.bootstrap == f"127.0.0.1:{port}"


def test_port_in_use_fails_clearly(broker: EmbeddedBroker, broker_factory: Callable[..., EmbeddedBroker]) -> None:
    with pytest.raises(BrokerError, match="is in use"):
        broker_factory(port=broker.port)
    assert kafka_ping("127.0.0.1", broker.port)  # the running broker is untouched
