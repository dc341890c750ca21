"""The worker's ack gate: Faust sees each input partition's acks in offset order, whatever order they finish in."""

from __future__ import annotations

import random

from streams.acks import InOrderAcks

A, B = ("loyalty.purchases", 0), ("loyalty.reviews", 1)


def test_an_ack_waits_for_every_earlier_offset_of_its_partition():
    gate = InOrderAcks()
    for offset in (10, 11, 12):
        gate.received(A, offset, f"a{offset}")
    gate.received(B, 5, "b5")
    # 11 and 12 finish first (10 is still held for event-time order): nothing of A may be acked yet,
    # since faust-streaming would commit past 10.
    assert gate.done([(A, 11), (A, 12), (B, 5)]) == ["b5"]
    assert gate.waiting == 2
    assert gate.done([(A, 10)]) == ["a10", "a11", "a12"]
    assert gate.waiting == 0


def test_a_redelivered_copy_is_acked_with_the_first_copy_that_finishes():
    gate = InOrderAcks()
    gate.received(A, 7, "first")
    gate.received(A, 7, "redelivered")
    gate.received(A, 8, "next")
    assert gate.done([(A, 7)]) == ["first", "redelivered"]
    # The second copy, applied later as a duplicate, finds nothing left to ack.
    assert gate.done([(A, 7)]) == []
    assert gate.done([(A, 8)]) == ["next"]


def test_a_forgotten_partition_acks_nothing_more():
    gate = InOrderAcks()
    gate.received(A, 1, "a1")
    gate.received(A, 2, "a2")
    gate.forget(A)
    assert gate.done([(A, 2), (A, 1)]) == []
    assert gate.waiting == 0


def test_any_finishing_order_acks_every_message_once_in_offset_order():
    rng = random.Random(606)
    for _ in range(200):
        gate = InOrderAcks()
        offsets = {A: list(range(100, 100 + rng.randint(1, 30))), B: list(range(rng.randint(1, 30)))}
        for partition, received in offsets.items():
            for offset in received:
                gate.received(partition, offset, (partition, offset))
        finishing = [(partition, offset) for partition, received in offsets.items() for offset in received]
        rng.shuffle(finishing)
        acked = []
        while finishing:
            size = rng.randint(1, 5)
            acked.extend(gate.done(finishing[:size]))
            finishing = finishing[size:]
        for partition, received in offsets.items():
            assert [offset for tp, offset in acked if tp == partition] == received
        assert gate.waiting == 0
