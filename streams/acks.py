"""Acks in offset order per input partition, so that a commit never passes a message still being decided.

Faust commits, per partition, the first run of consecutive acked offsets. faust-streaming 0.15 checks the
run against the committed position with an off-by-one (faust-streaming/faust#606, open): when the committed
position is n and n is still in the worker (held for event-time order, or its ledger write on its way) while
n+1... are acked, it commits past n, and a crash then loses n. The worker acks out of offset order in two
ways: the reorder buffer releases one partition's events by event time, and a batch of duplicates can be
acked while an earlier batch's writes are in flight. This gate hands Faust each partition's acks in offset
order: a message's ack waits until every earlier message received from its partition is done.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable
from typing import Any


class InOrderAcks:
    """Received offsets per partition; `done` returns the tokens that may be acked now, lowest offset first.

    An offset may be received more than once (a re-delivery after a rebalance while the first copy is still
    held); it counts as done when any copy is, and every copy's token is acked then.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, list[int]] = {}  # a heap of offsets received and not yet released
        self._tokens: dict[Hashable, dict[int, list[Any]]] = {}
        self._done: dict[Hashable, set[int]] = {}

    def received(self, partition: Hashable, offset: int, token: Any) -> None:
        tokens = self._tokens.setdefault(partition, {})
        copies = tokens.get(offset)
        if copies is None:
            tokens[offset] = [token]
            heapq.heappush(self._pending.setdefault(partition, []), offset)
        else:
            copies.append(token)

    def done(self, finished: Iterable[tuple[Hashable, int]]) -> list[Any]:
        """Mark (partition, offset) pairs done; returns the tokens now safe to ack, in offset order."""
        touched = set()
        for partition, offset in finished:
            if offset in self._tokens.get(partition, ()):
                self._done.setdefault(partition, set()).add(offset)
                touched.add(partition)
        ready: list[Any] = []
        for partition in touched:
            pending, done, tokens = self._pending[partition], self._done[partition], self._tokens[partition]
            while pending and pending[0] in done:
                offset = heapq.heappop(pending)
                done.discard(offset)
                ready.extend(tokens.pop(offset))
        return ready

    def forget(self, partition: Hashable) -> None:
        """The partition was revoked: its messages will be re-delivered to whoever holds it next."""
        self._pending.pop(partition, None)
        self._tokens.pop(partition, None)
        self._done.pop(partition, None)

    @property
    def waiting(self) -> int:
        """Messages done but held back behind an earlier one of their partition."""
        return sum(len(done) for done in self._done.values())
