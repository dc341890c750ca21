"""The stream driver's logic without Kafka: decode, hold for event-time order, apply, and say what to send.

The Faust agent (streams/worker.py) feeds it raw messages and sends what it returns; keeping this part free
of I/O lets tests drive it directly and keeps the agent to plumbing.

Ordering: each customer's events are applied in (occurred_at, topic rank, offset) order, as the batch
driver does. Messages of one customer arrive on several topics whose relative order Kafka does not keep,
so decoded events wait in a buffer until they are safe to apply: until every assigned partition has shown
an event at least as late (a per-partition event-time watermark); or, once the event has been held the
settle, until every partition that a fetch as new as the event's own did not find caught up has shown an
event at least as late (or none is left); or until the event has waited `reorder_wait_ms`
(docs/architecture.md, "Per-customer order"). The settle adapts: it is at least `caught_up_settle_ms`, and
at least twice the largest skew seen lately, the skew being how much later than a later event an event
reached a partition that had been found caught up (a producer's topics running apart under load).

Held for the compensations: `loyalty replay --apply` writes cut-over markers, replays the history before them and
then posts its compensations (to the redemptions topic, keyed by customer) followed by an end marker in every
partition of that topic, naming the cut-over markers of that partition number in every topic (a customer's
partition is the same in every topic). An event after a cut-over marker is decided by the new rules, and it must
be decided on the state the new rules give, which the compensation brings; so such events wait (outside the
event-time buffer, unacked) until an end marker names their cut-over. At the end marker the partition's
compensations are applied first, then the waiting events, in event-time order. Before its compensations the apply
writes its plan into every partition of the redemptions topic (the customers it compensates there, with how many
messages each, in parts): once every part is read, the events of the customers it does not name stop waiting, and a
named customer's events stop waiting once that customer's compensations are applied, but for referrers, who wait for
the end marker (a referee's held refund derives a reversal into their state); the plan's parts are acked when
the wait ends, so that a restart before it reads the whole plan again. A wait ends without the
compensations, its events then decided on the state they find and that logged, when a later cut-over marker comes
in its topic partition (a new apply: its compensations start from what the worker decided, and it could not pass its
markers while the events before them wait unacked), after `cutover_hold_ms` (an apply that failed after its
markers posts no end marker), or when more than `held_max` events wait. Each end of a wait is recorded in
loyalty.rulesets (`ended:<topic>:<partition>:<marker offset>`), so that a restarted worker does not wait again.
A worker that reads a marker again whose wait is recorded `compensated` reads a log rebuilt from ClickHouse from its
start (streams/restore.py; a live worker commits past the markers before the apply compares): it waits again, and
holds the compensations too, until it has read every marker the end marker names, so that the partition's events
before the markers come first, then the compensations, then the events after them (`_reread_marker`).

A derived event's published copy after a cut-over marker whose header names another rule set as its cause's (its cause
is history before the markers) is recorded with 0 points once the apply has compared (its plan read) or its
compensations are applied (its end marker read, recorded as `compensated`), and decided by its cause's rule set
otherwise (`_decide_derived`; docs/replay.md step 4).
"""

from __future__ import annotations

import heapq
import json
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas import events as ev
from schemas.decode import EventRejected, decode_event
from schemas.ledger import LedgerEntry
from schemas.topics import (
    CAUSE_RULESET_HEADER,
    COMPENSATED_CONTROL,
    CONTROL_HEADER,
    DERIVED_SIDE,
    PLAN_CONTROL,
    REDEMPTIONS,
    REFEREE_SIDE,
    REFERRALS,
    RULESET_CONTROL,
    SIDE_HEADER,
)
from streams.batch import order_key
from streams.rules.engine import Side, apply, apply_covered, derived_events, is_compensation
from streams.rules.ruleset import RuleSet
from streams.rules.state import COMPENSATION_PREFIX, CustomerState, evolve

TopicPartition = tuple[str, int]

# The settle is at least this many times the largest skew seen within `skew_window_ms`, and at most the
# reorder wait (beyond which an event is released anyway).
skew_margin = 2.0
skew_window_ms = 300_000.0
late_examples_max = 5


class SkewEstimate:
    """How much later than a later event an event reached a partition that looked caught up.

    Such an event is the one the caught-up release could have overtaken: a producer whose topics run apart
    (under load one topic's batch can land seconds after another's). Measured on every applied event (not on
    re-deliveries, which are old by nature) that reached a partition found caught up by a fetch at least as
    new as the one that brought the first event later in event time: the skew is the time between the two
    fetches (`arrived` keeps the fetch times at which the latest event time grew, for `keep_ms`). So the
    estimate follows the pipeline before an event is released out of order. Not counted: a partition whose
    last fetch is older (it never counted as caught up for that event), and skews over `limit_ms` (the
    reorder wait: late data that no settle would wait for). The current value is the largest skew within
    `window_ms`. Times are the fetch times of messages (`InputMessage.fetched_ms`).
    """

    def __init__(self, limit_ms: float, window_ms: float = skew_window_ms) -> None:
        self.limit_ms = limit_ms
        self.keep_ms = 2 * limit_ms
        self.window_ms = window_ms
        self._times: list[datetime] = []  # event times at which the latest event time grew, increasing
        self._arrivals: list[float] = []  # and when each arrived
        self._start = 0  # entries before it are older than keep_ms
        self._largest: deque[tuple[float, float]] = deque()  # (arrival, skew), skews decreasing

    def arrived(self, occurred_at: datetime, arrival_ms: float) -> None:
        if not self._times or occurred_at > self._times[-1]:
            self._times.append(occurred_at)
            self._arrivals.append(arrival_ms)
            self._prune(arrival_ms)

    def late(self, occurred_at: datetime, arrival_ms: float, fetched_caught_up_ms: float | None) -> float:
        """Measure one event's skew in ms (0: it was not late); `fetched_caught_up_ms`: when, before it arrived,
        a fetch last found its partition caught up (None: it was not)."""
        if fetched_caught_up_ms is None:
            return 0.0
        index = bisect_right(self._times, occurred_at, lo=self._start)
        if index >= len(self._times) or fetched_caught_up_ms < self._arrivals[index]:
            return 0.0
        skew = arrival_ms - self._arrivals[index]
        if not 0 < skew <= self.limit_ms:
            return 0.0
        while self._largest and self._largest[-1][1] <= skew:
            self._largest.pop()
        self._largest.append((arrival_ms, skew))
        return skew

    def current(self, now_ms: float) -> float:
        while self._largest and self._largest[0][0] < now_ms - self.window_ms:
            self._largest.popleft()
        return self._largest[0][1] if self._largest else 0.0

    def _prune(self, now_ms: float) -> None:
        while self._start < len(self._times) - 1 and self._arrivals[self._start] < now_ms - self.keep_ms:
            self._start += 1
        if self._start > 4096 and self._start * 2 > len(self._times):
            del self._times[: self._start]
            del self._arrivals[: self._start]
            self._start = 0


def end_marker_cuts(value: bytes) -> tuple[str, dict[str, int]]:
    """An apply's end marker: its version, and per input topic the offset of its cut-over marker in the partition
    of the end marker's number (`streams.cutover.publish_compensated`). Raises ValueError when unreadable."""
    try:
        return _version_and_cuts(json.loads(value))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{error.__class__.__name__}: {error}") from None


def plan_part(value: bytes) -> tuple[str, dict[str, int], int, int, dict[str, int]]:
    """A part of an apply's plan (`streams.cutover.plan_records`): its version, cut-over offsets per input topic, part
    number, number of parts and customers (customer -> compensation messages). Raises ValueError when unreadable."""
    try:
        document = json.loads(value)
        version, cuts = _version_and_cuts(document)
        part, parts, customers = document["part"], document["parts"], document["customers"]
        if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts):
            raise TypeError("part must be a number below parts")
        if not all(isinstance(count, int) and count > 0 for count in customers.values()):
            raise TypeError("every customer needs a positive number of compensation messages")
        return version, cuts, part, parts, {str(customer): count for customer, count in customers.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{error.__class__.__name__}: {error}") from None


def _version_and_cuts(document: dict) -> tuple[str, dict[str, int]]:
    version, cuts = document["version"], document["cuts"]
    if not isinstance(version, str) or not all(isinstance(o, int) and o >= 0 for o in cuts.values()):
        raise TypeError("version must be text and every cut a non-negative offset")
    return version, {str(topic): int(offset) for topic, offset in cuts.items()}


class UnknownRuleset(RuntimeError):
    """A cut-over marker names a rule set this worker has not loaded from loyalty.rulesets (yet)."""

    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"cut-over to unknown rule set {version!r}")


@dataclass(slots=True)
class InputMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    token: Any = None  # what the driver needs to ack the message (a Faust event)
    received_ms: float = 0.0  # when the driver took it (the hold time counts from here)
    # When the consumer's fetch that brought it was answered, on the clock of `received_ms` (the consumer's
    # last fetch of its partition as the driver took it); None: the same as `received_ms`.
    fetched_ms: float | None = None

    @property
    def fetch_time(self) -> float:
        return self.received_ms if self.fetched_ms is None else self.fetched_ms


@dataclass(slots=True)
class DeadLetter:
    message: InputMessage
    reason: str


@dataclass(slots=True)
class Output:
    """What one release produced: ledger entries per partition, dead letters, and messages to ack after."""

    ledger: list[tuple[int, LedgerEntry, InputMessage]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[InputMessage] = field(default_factory=list)
    duplicates: int = 0
    applied: int = 0
    activations: list[tuple[str, int, int, str]] = field(default_factory=list)  # topic, partition, offset, version
    # (topic, partition, marker offset, version, how): cut-overs whose events stopped waiting for the compensations,
    # how = "compensated" (the end marker was read), "superseded", "timed out" or "too many held" (without them).
    # To record before the batch's acks, once its entries (the compensations') are written.
    ended: list[tuple[str, int, int, str, str]] = field(default_factory=list)
    # (partition, version, customers): an apply's plan read in full; the other customers' events stop waiting.
    planned: list[tuple[int, str, int]] = field(default_factory=list)
    # Events derived for other customers (referral.reversed), to publish to their input topic before the ledger
    # entries of this release, so that a crash in between re-derives them instead of losing them.
    derived: list[InputMessage] = field(default_factory=list)


_EVERYTHING: Any = object()  # a watermark: every assigned partition is confirmed caught up


@dataclass(slots=True)
class _Held:
    message: InputMessage
    event: ev.Event
    side: Side
    ruleset: RuleSet
    fetched_caught_up_ms: float | None = None  # when a fetch had last found its partition caught up, if it had
    waited: bool = False  # held for an apply's compensations: decided after them although dated before
    # A derived event's published copy after a cut-over marker (`cut`) of another rule set than its cause's (`cause`):
    # its cause is history before the markers, which the apply's compensation covers (`_decide_derived`).
    cause: RuleSet | None = None
    cut: tuple[str, int, int] | None = None


@dataclass(slots=True)
class _Plan:
    """An apply's plan for one partition number (`streams.cutover.plan_records`), shared by the waits of its topics."""

    parts: int
    customers: dict[str, int] = field(default_factory=dict)  # customer -> compensation messages not applied yet
    parts_read: set[int] = field(default_factory=set)
    # The compensations decided, (customer, event id): a copy read again counts once.
    counted: set[tuple[str, str]] = field(default_factory=set)
    messages: list[InputMessage] = field(default_factory=list)  # its parts, acked when the redemptions wait ends

    @property
    def complete(self) -> bool:
        return len(self.parts_read) == self.parts


@dataclass(slots=True)
class _Wait:
    """A topic partition's events after a cut-over marker, waiting for the apply's compensations (module docstring)."""

    version: str
    since_ms: float  # when the first of them was taken, or a later plan part or compensation (the driver's clock)
    events: dict[str, list[tuple[tuple, int, _Held]]] = field(default_factory=dict)  # per customer, in arrival order
    count: int = 0
    plan: _Plan | None = None  # once a part of the apply's plan is read
    # A wait after a cut-over whose compensations were applied before (recorded `compensated`) and whose marker is read
    # again: the topics rebuilt from ClickHouse and re-read from the start (`StreamApplier._reread_marker`). It ends at
    # its apply's end marker once every marker that names is read, and holds the apply's compensations meanwhile.
    replayed: bool = False
    compensations: list[tuple[tuple, int, _Held]] = field(default_factory=list)


def _refers(held: _Held) -> bool:
    """A referral decided on its referrer's side: its customer is (or becomes) a referrer."""
    return held.side == "customer" and isinstance(held.event, ev.ReferralCompleted)


def _customer_of(held: _Held) -> str:
    """Whose state an event is decided on: a referral's referee copy is the referee's."""
    event = held.event
    return event.referee_id if held.side == "referee" else event.customer_id  # type: ignore[union-attr]


class StreamApplier:
    """Per-partition customer states, the event-time reorder buffer, and the pure core."""

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        reorder_wait_ms: int = 1000,
        held_max: int = 200_000,
        partition_for: Callable[[bytes], int] | None = None,
        caught_up_settle_ms: float = 0.0,
        cutover_hold_ms: float = 0.0,
    ) -> None:
        # The input partition of a customer key (the producers' partitioner), to route derived events; and the
        # partitions whose states this applier holds (restored), where a derived event is applied in place.
        self.partition_for = partition_for
        self.local_partitions: set[int] = set()
        # Partitions found caught up are left out of a held event's watermark only once it has been held the
        # settle (a producer's messages of one moment reach the five topics a few milliseconds apart, seconds
        # under load), and only if the fetch that found them so is at least as new as the event's own (a high
        # water mark is as old as the last fetch of its partition; a paused partition is not fetched at all).
        # The settle is this floor, raised by the skew the worker measures (`SkewEstimate`), at most the
        # reorder wait.
        self.caught_up_settle_ms = caught_up_settle_ms
        self.skew = SkewEstimate(limit_ms=max(float(reorder_wait_ms), caught_up_settle_ms))
        self._looked_caught_up: Mapping[TopicPartition, float] = {}  # as of the last release, with fetch times
        # Events applied although their customer had already had a later event applied (out of event-time order:
        # they came after the settle, or after the reorder wait), that wrote entries or were rejected.
        # Re-deliveries of applied events do not count, nor events that changed nothing (a clock tick that
        # expired nothing leaves no trace in the ledger, so its re-delivery after a restart looks new).
        self.late_events = 0
        self.late_examples: list[str] = []  # the first few since the driver last took them, for its log
        self.ruleset = ruleset  # the configured rule set: in force until a cut-over marker says otherwise
        self.rulesets: dict[str, RuleSet] = {ruleset.version: ruleset}
        # Per input partition, the cut-overs read so far: (marker offset, rule set), in offset order.
        self.cutovers: dict[TopicPartition, list[tuple[int, RuleSet]]] = {}
        self.reorder_wait_ms = reorder_wait_ms
        self.held_max = held_max
        # Held for the compensations (module docstring): 0 does not wait. The cut-overs (topic, partition, marker
        # offset) whose wait is over, and per cut-over the events waiting.
        self.cutover_hold_ms = cutover_hold_ms
        self.ended: set[tuple[str, int, int]] = set()
        # The cut-overs whose apply has compared the live entries before its markers (its plan read in full) or whose
        # compensations are applied (its end marker read; recorded as such in loyalty.rulesets, `wait_ended`): a
        # derived event's copy after such a marker whose cause is history before the markers is covered by them.
        self.compensated: set[tuple[str, int, int]] = set()
        self._planned_cuts: set[tuple[str, int, int]] = set()
        self.waiting: dict[tuple[str, int, int], _Wait] = {}
        # Re-reading a rebuilt log (`_reread_marker`): the compensated cut-overs whose markers were read again, per
        # topic partition the offsets of those whose wait is on, and per partition the end markers read before every
        # marker they name (their compensations wait for the rest of the history before the markers).
        self._reread: set[tuple[str, int, int]] = set()
        self._replayed: dict[TopicPartition, list[int]] = {}
        self._pending_ends: dict[int, list[tuple[str, dict[str, int]]]] = {}
        # Per partition (of the redemptions topic), the offset of the last plan part or compensation that renewed the
        # partition's waits (`_progress`): one read again (fetched again from the commit) is no sign of the apply.
        self._signs_of_life: dict[TopicPartition, int] = {}
        self.states: dict[int, dict[str, CustomerState]] = {}
        # A heap of (order key, arrival number, held event): the arrival number breaks ties without ever
        # comparing the events themselves (a generated dataclass __lt__ cost 6% of the worker's time).
        self.held: list[tuple[tuple, int, _Held]] = []
        self._arrivals = 0
        self.latest_seen: dict[TopicPartition, datetime] = {}
        # Per partition being restored: customer -> (event id, entries expected, entries read by sequence).
        self._restore_groups: dict[int, dict[str, tuple[str, int, dict[int, LedgerEntry]]]] = {}

    # --- state -------------------------------------------------------------------------------------

    def restore(self, partition: int, entries: Iterable[LedgerEntry | tuple[LedgerEntry, int | None]]) -> int:
        """Rebuild the states of a partition's customers by folding its ledger; returns entries folded.

        Items may carry the number of entries their event produced (the `loyalty-event-entries` header). An
        event's entries are folded only once all of them have been read: a worker that died while writing
        an event's entries leaves a partial group at the end of the ledger, and folding it would mark the
        event as applied although some of its entries were never written. Such a partial group is dropped
        (the event was not acked, so it is re-delivered and decided again, reproducing the same entries).
        Call `finish_restore` after the last item of a read.
        """
        states = self.states.setdefault(partition, {})
        groups = self._restore_groups.setdefault(partition, {})
        count = 0
        for item in entries:
            entry, expected = item if isinstance(item, tuple) else (item, None)
            state = states.get(entry.customer_id)
            if state is None:
                state = states[entry.customer_id] = CustomerState(entry.customer_id)
            if entry.sequence <= state.sequence:
                continue  # a ledger entry written twice by an earlier at-least-once retry
            group = groups.get(entry.customer_id)
            if group is None or group[0] != entry.caused_by:
                group = groups[entry.customer_id] = (entry.caused_by, expected or 1, {})
            group[2][entry.sequence] = entry
            if len(group[2]) < group[1]:
                continue
            del groups[entry.customer_id]
            for sequence in sorted(group[2]):
                if sequence == state.sequence + 1:
                    folded = group[2][sequence]
                    evolve(state, folded, self.rulesets.get(folded.ruleset_version, self.ruleset).zone)
                    count += 1
        return count

    def finish_restore(self, partition: int) -> int:
        """Drop the incomplete event groups left at the end of a ledger read; returns how many."""
        return len(self._restore_groups.pop(partition, {}))

    def forget(self, partition: int) -> None:
        self.local_partitions.discard(partition)
        self.states.pop(partition, None)
        self._signs_of_life = {tp: offset for tp, offset in self._signs_of_life.items() if tp[1] != partition}
        self.waiting = {cut: wait for cut, wait in self.waiting.items() if cut[1] != partition}  # unacked: re-delivered
        self._reread = {cut for cut in self._reread if cut[1] != partition}
        self._replayed = {tp: offsets for tp, offsets in self._replayed.items() if tp[1] != partition}
        self._pending_ends.pop(partition, None)
        self.held = [item for item in self.held if item[2].message.partition != partition]
        heapq.heapify(self.held)
        self.latest_seen = {tp: seen for tp, seen in self.latest_seen.items() if tp[1] != partition}

    # --- input -------------------------------------------------------------------------------------

    def know_ruleset(self, ruleset: RuleSet) -> None:
        self.rulesets[ruleset.version] = ruleset

    def activate(self, topic: str, partition: int, offset: int, version: str) -> None:
        """Record a cut-over: messages of (topic, partition) after `offset` are decided by `version`."""
        ruleset = self.rulesets[version]
        cuts = self.cutovers.setdefault((topic, partition), [])
        if (offset, ruleset) not in cuts:
            cuts.append((offset, ruleset))
            cuts.sort(key=lambda cut: cut[0])

    def ruleset_for(self, topic: str, partition: int, offset: int) -> RuleSet:
        return self._cut_for(topic, partition, offset)[0]

    def _cut_for(self, topic: str, partition: int, offset: int) -> tuple[RuleSet, int | None]:
        """The rule set of a message, and the offset of the cut-over marker it comes after (the last before it)."""
        chosen, cut = self.ruleset, None
        for cut_offset, ruleset in self.cutovers.get((topic, partition), ()):
            if cut_offset < offset:
                chosen, cut = ruleset, cut_offset
        return chosen, cut

    def wait_ended(self, topic: str, partition: int, offset: int, how: str = "") -> None:
        """Record that the wait after the cut-over marker at `offset` is over (read from loyalty.rulesets), and how."""
        self.ended.add((topic, partition, offset))
        if how == "compensated":
            self.compensated.add((topic, partition, offset))

    def accept(self, messages: Iterable[InputMessage]) -> Output:
        """Decode messages; bad ones become dead letters at once, good ones wait for their turn.

        The rule set of an event is fixed here, by the position of its message relative to the cut-over
        markers of its partition: exactly the messages after a marker are decided by the new rule set.
        """
        output = Output()
        for message in messages:
            if (CONTROL_HEADER, RULESET_CONTROL) in message.headers:
                version = message.value.decode("utf-8", "replace")
                if version not in self.rulesets:
                    raise UnknownRuleset(version)
                self.activate(message.topic, message.partition, message.offset, version)
                output.activations.append((message.topic, message.partition, message.offset, version))
                output.acks.append(message)
                for cut in [cut for cut in self.waiting if cut[:2] == (message.topic, message.partition)]:
                    if cut[2] < message.offset and not self.waiting[cut].replayed:
                        self._end_wait(cut, "superseded", output)
                self._reread_marker(message, version, output)
                continue
            if (CONTROL_HEADER, PLAN_CONTROL) in message.headers:
                try:
                    if self._planned(message, output):
                        continue  # acked when the wait ends: a restart reads every part again
                except ValueError as error:
                    output.dead_letters.append(DeadLetter(message, f"unreadable plan of an apply: {error}"))
                output.acks.append(message)
                continue
            if (CONTROL_HEADER, COMPENSATED_CONTROL) in message.headers:
                try:
                    self._compensated(message, output)
                except ValueError as error:
                    output.dead_letters.append(DeadLetter(message, f"unreadable end marker of an apply: {error}"))
                output.acks.append(message)
                continue
            try:
                event = decode_event(message.value, message.topic)
            except EventRejected as error:
                referee_copy = (SIDE_HEADER, REFEREE_SIDE) in message.headers
                if referee_copy:
                    output.acks.append(message)  # its primary copy, keyed by the referrer, is dead-lettered
                else:
                    output.dead_letters.append(DeadLetter(message, error.reason))
                    output.acks.append(message)
                continue
            side: Side = "referee" if (SIDE_HEADER, REFEREE_SIDE) in message.headers else "customer"
            if side == "referee" and not isinstance(event, ev.ReferralCompleted):
                side = "customer"
            tp = (message.topic, message.partition)
            seen = self.latest_seen.get(tp)
            if seen is None or event.occurred_at > seen:
                self.latest_seen[tp] = event.occurred_at
            self.skew.arrived(event.occurred_at, message.fetch_time)
            ruleset, cut_offset = self._cut_for(message.topic, message.partition, message.offset)
            self._arrivals += 1
            held = _Held(message, event, side, ruleset, self._looked_caught_up.get(tp))
            if cut_offset is not None and (SIDE_HEADER, DERIVED_SIDE) in message.headers:
                self._cause_before_the_markers(held, (message.topic, message.partition, cut_offset))
            item = (order_key(event, message.offset), self._arrivals, held)
            if cut_offset is not None and self._replayed and self._held_for_replay(item, cut_offset):
                continue
            if cut_offset is not None and not self._compensation(message, event):
                cut = (message.topic, message.partition, cut_offset)
                if self._held_for_compensations(cut, ruleset.version, message.received_ms, item):
                    continue
            elif self.waiting and self._compensation(message, event):
                self._progress(message)
            heapq.heappush(self.held, item)
        return output

    def _cause_before_the_markers(self, held: _Held, cut: tuple[str, int, int]) -> None:
        """A derived event's published copy after the cut-over marker `cut`: when its header names another rule set
        than the cut-over's as its cause's, the cause was decided before the markers (in its own partition), so it is
        history the apply replays, deriving the event again under the new rules (streams/replay.py skips the archived
        copies); `_decide_derived` then decides the copy. A copy without the header (published by older code) or of an
        unknown rule set is decided by its position, as before."""
        version = next((value for name, value in held.message.headers if name == CAUSE_RULESET_HEADER), None)
        if version is None:
            return
        cause = self.rulesets.get(version.decode("utf-8", "replace"))
        if cause is not None and cause.version != held.ruleset.version and isinstance(held.event, ev.ReferralReversed):
            held.cause, held.cut = cause, cut

    def _progress(self, message: InputMessage) -> None:
        """A part of an apply's plan or a compensation arrived in this partition: the apply is alive, so its waits
        here count `cutover_hold_ms` from now (an apply of any size is waited for while its compensations flow). Not
        a message read again (a rebalance fetches the partition again from its commit, which the plan holds back):
        that says nothing of the apply, and repeated rebalances would keep the wait of one that died on for ever."""
        tp, partition, now_ms = (message.topic, message.partition), message.partition, message.received_ms
        if message.offset <= self._signs_of_life.get(tp, -1):
            return
        self._signs_of_life[tp] = message.offset
        for cut, wait in self.waiting.items():
            if cut[1] == partition and wait.since_ms < now_ms:
                wait.since_ms = now_ms

    def _held_for_compensations(
        self, cut: tuple[str, int, int], version: str, since_ms: float, item: tuple[tuple, int, _Held]
    ) -> bool:
        """Put `item` in the wait after the cut-over marker `cut`, unless that wait is over (or waits are off);
        whether it did."""
        wait = self._wait_after(cut, version, since_ms)
        if wait is None:
            return False
        customer = _customer_of(item[2])
        if wait.plan is not None and wait.plan.complete and customer not in wait.plan.customers:
            if not (self._referrer(cut[1], customer) or _refers(item[2])):
                return False  # the apply compensates this customer with nothing (more): nothing to wait for
        self._hold(wait, item)
        return True

    @staticmethod
    def _hold(wait: _Wait, item: tuple[tuple, int, _Held]) -> None:
        item[2].waited = True
        wait.events.setdefault(_customer_of(item[2]), []).append(item)
        wait.count += 1

    def _wait_after(self, cut: tuple[str, int, int], version: str, since_ms: float) -> _Wait | None:
        """The wait after the cut-over marker `cut`, begun now if need be; None when it is over (or waits are off)."""
        if self.cutover_hold_ms <= 0 or cut in self.ended:
            return None
        wait = self.waiting.get(cut)
        if wait is None:
            wait = self.waiting[cut] = _Wait(version, since_ms)
        return wait

    def _planned(self, message: InputMessage, output: Output) -> bool:
        """A part of an apply's plan in the redemptions topic. Once every part of the partition's plan is read, the
        events of the customers it does not name stop waiting; whether the message's ack waits for the end of the
        wait (so that a restart before it reads the whole plan again). Raises ValueError when unreadable."""
        version, cuts, part, parts, customers = plan_part(message.value)
        partition = message.partition
        waits = []
        for topic, offset in cuts.items():
            cut = (topic, partition, offset)
            wait = self._wait_after(cut, version, message.received_ms)
            if wait is not None:
                waits.append((cut, wait))
        self._progress(message)
        plan = next((wait.plan for _, wait in waits if wait.plan is not None), None) or _Plan(parts)
        complete = plan.complete
        if not complete:
            plan.parts_read.add(part)
            plan.customers.update(customers)
        kept = False
        for cut, wait in waits:
            wait.plan = plan
            if cut[0] == REDEMPTIONS:
                # A part read again (the partition fetched again from its commit) is kept too: acking its offset now
                # would let the commit pass the plan before the wait ends.
                plan.messages.append(message)
                kept = True
        if plan.complete:
            # The apply has compared the live entries before its markers: what is undecided now was not among them.
            self._planned_cuts.update((topic, partition, offset) for topic, offset in cuts.items())
        if plan.complete and waits and not complete:
            output.planned.append((partition, version, len(plan.customers)))
            held = {customer for _, wait in waits for customer in wait.events}
            free = [c for c in held if c not in plan.customers and not self._referrer(partition, c)]
            for _, wait in waits:
                for customer in free:
                    self._release_customer(wait, customer)
        return kept

    def _referrer(self, partition: int, customer: str) -> bool:
        """Whether a customer referred others (or a held referral of theirs will say so): a referee's held event, a
        refund, derives a `referral.reversed` into the referrer's state, which the referrer's later events must come
        after (as in `loyalty process`). Such a customer waits for the end marker, named by the plan or not."""
        state = self.states.get(partition, {}).get(customer)
        if state is not None and (state.referees or state.referees_reversed):
            return True
        return any(
            _refers(held)
            for cut, wait in self.waiting.items()
            if cut[1] == partition
            for _, _, held in wait.events.get(customer, ())
        )

    def _release_customer(self, wait: _Wait, customer: str) -> None:
        """A customer's events stop waiting: they go to the event-time buffer."""
        items = wait.events.pop(customer, ())
        wait.count -= len(items)
        for item in items:
            heapq.heappush(self.held, item)

    def _compensation_applied(self, partition: int, event: ev.Event) -> None:
        """One of a customer's compensation messages is decided: after the last one the plan names, the customer's
        events stop waiting. A message read again (re-delivered, or written twice by a producer's retry) counts once."""
        waits = [wait for cut, wait in self.waiting.items() if cut[1] == partition and wait.plan is not None]
        plan = waits[0].plan if waits else None
        customer, counted = event.customer_id, (event.customer_id, event.event_id)
        if plan is None or not plan.complete or customer not in plan.customers or counted in plan.counted:
            return
        plan.counted.add(counted)
        plan.customers[customer] -= 1
        if plan.customers[customer] > 0:
            return
        del plan.customers[customer]
        if self._referrer(partition, customer):
            return  # waits for the end marker: a referee's held events can still change its state
        for wait in waits:
            self._release_customer(wait, customer)

    @staticmethod
    def _compensation(message: InputMessage, event: ev.Event) -> bool:
        """A compensation (or a part of one) an apply posted: what the events after its markers wait for. As the core
        tells it (its actor and adjustment id), not by the event id alone, which any producer may choose."""
        return (
            message.topic == REDEMPTIONS and event.event_id.startswith(COMPENSATION_PREFIX) and is_compensation(event)
        )

    def _compensated(self, message: InputMessage, output: Output) -> None:
        """An apply's end marker in the redemptions topic: its compensations on this partition, which came before
        it, are decided now (before events dated earlier: that is what they wait for), then the events waiting after
        the cut-over markers it names."""
        version, cuts = end_marker_cuts(message.value)
        partition = message.partition
        if any((topic, partition, offset) in self._reread for topic, offset in cuts.items()):
            self._pending_ends.setdefault(partition, []).append((version, cuts))
            self._end_ready(partition, output, message.received_ms)
            return
        self._apply_buffered(
            partition, lambda held: self._compensation(held.message, held.event), output, message.received_ms
        )
        for topic, offset in cuts.items():
            self._end_wait((topic, partition, offset), "compensated", output, version)

    def _apply_buffered(
        self, partition: int, chosen: Callable[[_Held], bool], output: Output, now_ms: float, more: Iterable = ()
    ) -> bool:
        """Take the `chosen` events of a partition out of the event-time buffer and decide them now, with `more`, in
        their order; whether there were any."""
        ours, others = list(more), []
        for item in self.held:
            held = item[2]
            (ours if held.message.partition == partition and chosen(held) else others).append(item)
        if len(others) < len(self.held):
            self.held = others
            heapq.heapify(self.held)
        for _, _, held in sorted(ours, key=lambda item: item[:2]):
            self._apply(held, output, now_ms)
        return bool(ours)

    # --- a rebuilt log read again ------------------------------------------------------------------
    #
    # After `loyalty up` rebuilt the topics from ClickHouse (streams/restore.py), the worker reads every input again
    # from the start, its customers' states folded from the ledger less each customer's last event, which it decides
    # again. The cut-overs whose compensations were applied are recorded `compensated`, so the live wait is over; but
    # the order of positions still has to hold, since the compensation was computed from every message before the
    # markers and the messages after them were decided on the state it gives: for a partition, every message before
    # its markers (in every input topic), then the compensations, then the messages after the markers. The topics are
    # read at their own pace (the small redemptions partition that carries the compensations and the end marker is
    # read to its end first), so the rebuilt worker enforces that order: a compensated cut-over's marker read again
    # begins a wait as the live one does (without a plan: every customer of the partition waits), which also holds the
    # apply's compensations; at the end marker, once every marker it names is read (or its topic partition is caught
    # up: read past it before), the partition's events before the markers still in the event-time buffer are decided,
    # then the compensations, and the waits end. Events the first run had decided are recognised (state remembers
    # applied event ids); the others are decided where the first run decided, or would have decided, them.

    def _reread_marker(self, message: InputMessage, version: str, output: Output) -> None:
        """A cut-over marker read: when its compensations were applied before (recorded `compensated`), the log is
        read again from before it, and the events after it wait for them again (with holds on)."""
        cut = (message.topic, message.partition, message.offset)
        if cut not in self.compensated or self.cutover_hold_ms <= 0 or cut in self._reread:
            return
        self._reread.add(cut)
        if cut not in self.waiting:
            self.waiting[cut] = _Wait(version, message.received_ms, replayed=True)
            offsets = self._replayed.setdefault((message.topic, message.partition), [])
            offsets.append(message.offset)
            offsets.sort()
        self._end_ready(message.partition, output, message.received_ms)

    def _held_for_replay(self, item: tuple[tuple, int, _Held], cut_offset: int) -> bool:
        """Put an event after a cut-over marker read again in the earliest wait of its topic partition that is still
        on (a later apply's events come after the earlier apply's compensations too), or a compensation in the wait of
        its own cut-over; whether it did."""
        message = item[2].message
        offsets = self._replayed.get((message.topic, message.partition))
        if not offsets:
            return False
        if self._compensation(message, item[2].event):
            wait = self.waiting.get((message.topic, message.partition, cut_offset))
            if wait is None or not wait.replayed:
                return False
            wait.compensations.append(item)
            return True
        if offsets[0] >= message.offset:
            return False
        self._hold(self.waiting[(message.topic, message.partition, offsets[0])], item)
        return True

    def _reached(self, topic: str, partition: int, offset: int) -> bool:
        """Whether every message of (topic, partition) before its cut-over marker at `offset` has been read."""
        return (topic, partition, offset) in self._reread or (topic, partition) in self._looked_caught_up

    def _end_ready(self, partition: int, output: Output, now_ms: float) -> None:
        """Apply the compensations of the end markers of a partition read before every marker they name, once it is."""
        pending = self._pending_ends.get(partition)
        while pending and all(self._reached(topic, partition, offset) for topic, offset in pending[0][1].items()):
            version, cuts = pending.pop(0)
            self._compensate_after_the_history(partition, version, cuts, output, now_ms)
        if pending is not None and not pending:
            del self._pending_ends[partition]

    def _compensate_after_the_history(
        self, partition: int, version: str, cuts: dict[str, int], output: Output, now_ms: float
    ) -> None:
        """The partition's events before the markers `cuts` still buffered (and what they derive in place), then the
        apply's compensations, then the end of the waits after the markers."""
        ruleset = self.rulesets.get(version)

        def before(held: _Held) -> bool:
            message = held.message
            if message.offset < 0:  # derived in place: before the markers when decided by an earlier rule set
                return held.ruleset is not ruleset
            return not self._compensation(message, held.event) and message.offset < cuts.get(message.topic, -1)

        while self._apply_buffered(partition, before, output, now_ms):
            pass
        wait = self.waiting.get((REDEMPTIONS, partition, cuts.get(REDEMPTIONS, -1)))
        stashed = wait.compensations if wait is not None else []
        self._apply_buffered(
            partition, lambda held: self._compensation(held.message, held.event), output, now_ms, more=stashed
        )
        if wait is not None:
            wait.compensations = []
        for topic, offset in cuts.items():
            self._end_wait((topic, partition, offset), "compensated", output, version)

    def _end_wait(self, cut: tuple[str, int, int], how: str, output: Output, version: str | None = None) -> None:
        """The wait after a cut-over marker is over: its events go to the event-time buffer."""
        wait = self.waiting.pop(cut, None)
        # An end marker read after the wait ended otherwise (timed out, ...) is recorded too: the compensations are
        # applied, which decides how a later derived copy is (`_decide_derived`), after a restart as well.
        if cut not in self.ended or (how == "compensated" and cut not in self.compensated):
            self.ended.add(cut)
            output.ended.append((*cut, version or (wait.version if wait else ""), how))
        if how == "compensated":
            self.compensated.add(cut)
        if wait is None:
            return
        if wait.replayed:
            offsets = self._replayed.get(cut[:2], [])
            if cut[2] in offsets:
                offsets.remove(cut[2])
            if not offsets:
                self._replayed.pop(cut[:2], None)
            for item in wait.compensations:  # a wait that ended otherwise (timed out, ...): they go on without it
                heapq.heappush(self.held, item)
            for items in wait.events.values():
                for item in items:  # after a later marker read again, whose wait is on: they wait there
                    if not self._held_for_replay(item, -1):
                        heapq.heappush(self.held, item)
            wait.events.clear()
            return
        for customer in list(wait.events):
            self._release_customer(wait, customer)
        if wait.plan is not None and cut[0] == REDEMPTIONS:
            output.acks.extend(wait.plan.messages)  # the plan's parts, in this partition
            wait.plan.messages.clear()

    def _give_up_waiting(self, now_ms: float, output: Output) -> None:
        """End the waits that lasted `cutover_hold_ms` since their first event or their apply's last sign of life in
        the partition (`_progress`), with the others of their partition (one apply), or every wait when more than
        `held_max` events wait."""
        too_many = self.waiting_count > self.held_max
        late = {cut[1] for cut, wait in self.waiting.items() if now_ms - wait.since_ms >= self.cutover_hold_ms}
        for cut in [cut for cut in self.waiting if too_many or cut[1] in late]:
            self._end_wait(cut, "too many held" if too_many else "timed out", output)

    @property
    def waiting_count(self) -> int:
        return sum(wait.count for wait in self.waiting.values())

    def settle_ms(self, now_ms: float) -> float:
        """How long an event is held before partitions found caught up may be left out of its watermark."""
        settle = max(self.caught_up_settle_ms, skew_margin * self.skew.current(now_ms))
        return min(settle, float(self.reorder_wait_ms))

    def release(
        self,
        assigned: Iterable[TopicPartition],
        caught_up: Mapping[TopicPartition, float] | Iterable[TopicPartition],
        now_ms: float,
    ) -> Output:
        """Apply every held event that is safe to apply now, in order.

        `caught_up`: the partitions whose last fetch found nothing beyond what was received, each with the time
        of that fetch (on the clock of `now_ms`); a plain set means fetched just now.
        """
        output = Output()
        if self.waiting:
            self._give_up_waiting(now_ms, output)
        assigned = list(assigned)
        if not isinstance(caught_up, Mapping):
            caught_up = dict.fromkeys(caught_up, now_ms)
        self._looked_caught_up = caught_up
        for partition in list(self._pending_ends):
            self._end_ready(partition, output, now_ms)
        settle = self.settle_ms(now_ms)
        # Over every assigned partition: each has shown an event at least this late, so no earlier event can
        # come from any of them (one partition's events are in time order).
        certain = None
        if assigned and all(tp in self.latest_seen for tp in assigned):
            certain = min(self.latest_seen[tp] for tp in assigned)
        # For an event fetched at `fetched`, over the partitions not found caught up by a fetch at least as new
        # (the same fetch response answers for every partition of a broker; a paused partition is not fetched,
        # so its old high water mark does not count). None: one of them has shown nothing yet (it could still
        # deliver anything); `_EVERYTHING`: none is left.
        watermarks: dict[float, Any] = {}

        def watermark(fetched: float) -> Any:
            if fetched not in watermarks:
                others = [tp for tp in assigned if caught_up.get(tp, -1.0) < fetched]
                if not others:
                    watermarks[fetched] = _EVERYTHING
                elif all(tp in self.latest_seen for tp in others):
                    watermarks[fetched] = min(self.latest_seen[tp] for tp in others)
                else:
                    watermarks[fetched] = None
            return watermarks[fetched]

        while self.held:
            key, _, head = self.held[0]
            if certain is None or not key[0] < certain:
                held_ms = now_ms - head.message.received_ms
                if len(self.held) <= self.held_max and held_ms < self.reorder_wait_ms:
                    if held_ms < settle:
                        break
                    mark = watermark(head.message.fetch_time)
                    if mark is None or not (mark is _EVERYTHING or key[0] < mark):
                        break
            heapq.heappop(self.held)
            self._apply(head, output, now_ms)
        return output

    def _apply(self, held: _Held, output: Output, now_ms: float) -> None:
        """Decide a released event; `now_ms`: when (the driver's clock), for a wait a derived event begins."""
        self._decide(held, output, now_ms)
        if self.waiting and self._compensation(held.message, held.event):
            self._compensation_applied(held.message.partition, held.event)

    def _decide(self, held: _Held, output: Output, now_ms: float) -> None:
        message, event = held.message, held.event
        states = self.states.setdefault(message.partition, {})
        customer_id = _customer_of(held)
        state = states.get(customer_id)
        if state is None:
            state = states[customer_id] = CustomerState(customer_id)
        fresh = event.event_id not in state.applied  # not a re-delivery
        late = fresh and not held.waited and state.last_event_at is not None and event.occurred_at < state.last_event_at
        try:
            if held.cause is not None:
                entries = self._decide_derived(held, state)
            else:
                entries = apply(state, event, held.ruleset, side=held.side)
        except EventRejected as error:
            # A conflict is decided per customer, so each copy of a referral that conflicts on its own
            # customer's state is dead-lettered (the batch driver lists it once per side too).
            if late:
                self._count_late(held, customer_id, state)
            reason = error.reason if held.side == "customer" else f"referee side: {error.reason}"
            output.dead_letters.append(DeadLetter(message, reason))
            if message.offset >= 0:
                output.acks.append(message)
            return
        if late and entries:  # an event that changed nothing (a clock tick) leaves no trace to disorder
            self._count_late(held, customer_id, state)
        if fresh and message.offset >= 0:
            self.skew.late(event.occurred_at, message.fetch_time, held.fetched_caught_up_ms)
        for derived in derived_events(state, event, entries):
            self._derive(derived, held, output, now_ms)
        output.ledger.extend((message.partition, entry, message) for entry in entries)
        if message.offset < 0:
            return  # applied in place (see `_derive`): not an input message, nothing to ack or count
        if not entries and event.event_id in state.applied:
            output.duplicates += 1
        else:
            output.applied += 1
        output.acks.append(message)

    def _decide_derived(self, held: _Held, state: CustomerState) -> list[LedgerEntry]:
        """A derived event's copy after a cut-over marker, whose cause was decided by an earlier rule set (before the
        markers, `_cause_before_the_markers`). When the apply that wrote the marker has compared the live entries (its
        plan read in full) or its compensations are applied (its end marker read, now or before a restart), the copy
        was not among the live entries it compared (undecided now, so then too) and its replay of the history derived
        the event again under the new rules: the compensation holds what the event does, and the copy is recorded
        with 0 points. Otherwise (no wait, or one that ended without them: timed out, superseded, too many held, a
        rebuilt broker) it is decided by its cause's rule set, as the worker holding both partitions decides it in
        place, and as the next apply counts it: an entry of a rule set other than its new one is a live entry."""
        cause, cut = held.cause, held.cut
        assert cause is not None and cut is not None
        if cut in self.compensated or cut in self._planned_cuts:
            why = (
                f"derived from an event decided under rule set {cause.version} before the cut-over to "
                f"{held.ruleset.version}: the apply's compensation already holds its effect"
            )
            return apply_covered(state, held.event, held.ruleset, why)  # type: ignore[arg-type]
        return apply(state, held.event, cause, side=held.side)

    def _count_late(self, held: _Held, customer_id: str, state: CustomerState) -> None:
        self.late_events += 1
        if len(self.late_examples) < late_examples_max:
            event, message = held.event, held.message
            self.late_examples.append(
                f"{event.event_type} {event.event_id} of {customer_id} at {event.occurred_at.isoformat()} "
                f"(offset {message.offset} of {message.topic}/{message.partition}) after an event at "
                f"{state.last_event_at.isoformat()}"  # type: ignore[union-attr]
            )

    def _derive(self, event: ev.Event, cause: _Held, output: Output, now_ms: float) -> None:
        """Publish a derived event to its customer's partition and, when this applier holds that partition,
        apply it here, in order: it joins the heap at (its time, after every input topic), so it is applied
        before any later event of that customer, exactly where the batch driver applies it. Its published
        copy then arrives as a duplicate (same id and content) and changes nothing; a worker that does not
        hold the partition applies the published copy when it arrives."""
        key = event.customer_id.encode()
        value = event.model_dump_json().encode()
        partition = self.partition_for(key) if self.partition_for is not None else cause.message.partition
        headers = ((SIDE_HEADER, DERIVED_SIDE), (CAUSE_RULESET_HEADER, cause.ruleset.version.encode()))
        message = InputMessage(REFERRALS, partition, -1, key, value, headers)
        output.derived.append(message)
        if partition in self.local_partitions:
            self._arrivals += 1
            # Decided by its cause's rule set: the cause's offset lies in another topic's partition, so it says nothing
            # about this partition's cut-over markers (comparing the two picked either rule set by chance).
            held = _Held(message, event, "customer", cause.ruleset)
            item = (order_key(event, cause.message.offset), self._arrivals, held)
            # Decided by the rules of a cut-over whose wait for the compensations is still on in its own partition
            # (the referrer's compensation has not come yet): it waits there too, as its published copy would. A wait
            # it begins counts the hold from now, as its published copy's would from when it is read: from the
            # cause's arrival (the refund waited for the referee's compensation meanwhile), a wait begun after an
            # apply longer than the hold timed out at once and the reversal was decided before the referrer's.
            cuts = self.cutovers.get((REFERRALS, partition), ())
            if cuts and cuts[-1][1] is cause.ruleset:
                cut = (REFERRALS, partition, cuts[-1][0])
                replayed = self.waiting.get(cut)
                if replayed is not None and replayed.replayed:
                    self._hold(replayed, item)
                    return
                if self._held_for_compensations(cut, cause.ruleset.version, now_ms, item):
                    return
            heapq.heappush(self.held, item)

    @property
    def held_count(self) -> int:
        return len(self.held)
