"""The monitor's partition ends, as an apply's cut-over wait uses them (streams/runtime.py).

A consumer does not fetch a partition again while records it fetched from it are not all consumed, so a partition's
high water mark can be older than the monitor's last polls: under a burst of traffic, two polls could both be
served from the buffer, and the wait then took a ledger end from before the worker had produced the entries it was
waiting for. `ends_fetched_after` goes by when each partition's mark was fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from schemas.topics import INPUT_TOPICS, LEDGER, PURCHASES
from streams.broker import EmbeddedBroker, ensure_topics
from streams.producer import make_producer
from streams.runtime import BrokerMonitor

PARTITIONS = 4


def _produce(bootstrap: str, counts: dict[tuple[str, int], int], value: bytes) -> None:
    producer = make_producer(bootstrap)
    try:
        for (topic, partition), count in counts.items():
            for _ in range(count):
                producer.send(topic, value=value, partition=partition)
        producer.flush()
    finally:
        producer.close()


async def _ends_after_a_burst(bootstrap: str) -> tuple[dict, dict[tuple[str, int], int], int]:
    monitor = BrokerMonitor(bootstrap, "nobody", PARTITIONS)
    stopping = asyncio.Event()
    task = asyncio.create_task(monitor.run(stopping))
    try:
        while monitor.polls < 2:
            await asyncio.sleep(0.05)
        # Far more records than one poll hands out (1,000), spread over the input and ledger partitions, and the
        # ledger's last ones after the inputs', as the worker produces entries after reading their events.
        burst = {(PURCHASES, p): 1500 for p in range(PARTITIONS)}
        burst |= {(LEDGER, p): 400 + 100 * p for p in range(PARTITIONS)}
        await asyncio.to_thread(_produce, bootstrap, burst, b"x" * 300)
        moment = time.time()
        ends = None
        while ends is None and time.time() < moment + 30:
            await asyncio.sleep(0.1)
            ends = monitor.ends_fetched_after(LEDGER, moment)
        return ends, {key: n for key, n in burst.items() if key[0] == LEDGER}, monitor.polls
    finally:
        stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


def test_ledger_ends_come_from_fetches_made_after_the_moment_asked_for(broker: EmbeddedBroker):
    ensure_topics(broker.bootstrap, (*INPUT_TOPICS, LEDGER, "loyalty.dead-letter"), PARTITIONS)
    ends, produced, polls = asyncio.run(_ends_after_a_burst(broker.bootstrap))
    assert ends == produced, f"after {polls} polls"


def test_no_ends_while_a_partition_has_no_fresh_fetch():
    monitor = BrokerMonitor("127.0.0.1:1", "nobody", 2)
    now = time.time()
    monitor.highwaters = {(LEDGER, 0): 5, (LEDGER, 1): 7}
    monitor.fetched_at = {(LEDGER, 0): int((now + 1) * 1000), (LEDGER, 1): int(now * 1000)}
    assert monitor.ends_fetched_after(LEDGER, now) is None  # partition 1's mark may predate `now`
    monitor.fetched_at[(LEDGER, 1)] = int((now + 1) * 1000)
    assert monitor.ends_fetched_after(LEDGER, now) == {(LEDGER, 0): 5, (LEDGER, 1): 7}
