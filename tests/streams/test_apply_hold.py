"""The worker holds a partition's events after a cut-over marker until the apply's compensations are applied.

An event after the markers is decided by the new rules, on the state the new rules give, which only the compensation
brings (its lots, last activity, re-valued orders). Before, such an event arriving while the apply replayed history
was decided on the old rules' state: a tick among them expired the old rules' lots, and the compensation, computed
from the history before the markers, took them again (the review of 2026-11-28 found -100 where 140 was due).
"""

from __future__ import annotations

import collections
import functools

from test_derived_events import PARTITIONS
from test_replay_expiry import CUT_OVER, HISTORY, NEW, OLD, _compensations
from test_replay_revalue import archived, event

from schemas.topics import COMPENSATED_CONTROL, CONTROL_HEADER, INPUT_TOPICS, REDEMPTIONS, RULESET_CONTROL
from streams.applier import InputMessage, StreamApplier
from streams.batch import process_lines
from streams.cutover import end_marker
from streams.replay import replay_messages
from streams.routing import partition_for, routes_for

# Decided after the markers, dated before the compensation (the wall clock of the apply). The tick expires the lot
# of o1 (1 February) under the new rules, which award it 310 points, not the old rules' 190.
BETWEEN = [
    event("b1", "review.approved", "2026-05-20T10:00:00+00:00", review_id="v1", sku="sku-0100", rating=5),
    event("b2", "clock.tick", "2026-05-25T10:00:00+00:00"),
    event("b3", "clock.tick", "2026-08-05T10:00:00+00:00"),
]
HOLD_MS = 60_000.0
C1 = partition_for(b"c1", PARTITIONS)


class _Log:
    """Input partitions with their next offsets, as the producers and the apply write them."""

    def __init__(self) -> None:
        self.offsets: collections.Counter = collections.Counter()
        self.cuts: dict[tuple[str, int], int] = {}  # the latest cut-over markers

    def message(self, topic: str, partition: int, key: bytes, value: bytes, headers=(), at_ms: float = 0.0):
        offset = self.offsets[(topic, partition)]
        self.offsets[(topic, partition)] += 1
        return InputMessage(topic, partition, offset, key, value, tuple(headers), received_ms=at_ms)

    def lines(self, lines: list[str], at_ms: float = 0.0) -> list[InputMessage]:
        messages = []
        for line in lines:
            for route in routes_for(line.encode()):
                partition = partition_for(route.key, PARTITIONS)
                messages.append(self.message(route.topic, partition, route.key, line.encode(), route.headers, at_ms))
        return messages

    def markers(self, version: str, at_ms: float = 0.0) -> list[InputMessage]:
        """An apply's cut-over markers, in every input partition."""
        markers = [
            self.message(topic, partition, b"", version.encode(), [(CONTROL_HEADER, RULESET_CONTROL)], at_ms)
            for topic in INPUT_TOPICS
            for partition in range(PARTITIONS)
        ]
        self.cuts = {(m.topic, m.partition): m.offset for m in markers}
        return markers

    def end(self, version: str, partition: int, cuts: dict | None = None) -> InputMessage:
        """An apply's end marker in `partition` of the redemptions topic, naming the latest (or the given) cut-overs."""
        value = end_marker(version, cuts or self.cuts, partition)
        return self.message(REDEMPTIONS, partition, b"", value, [(CONTROL_HEADER, COMPENSATED_CONTROL)])

    def ends(self, version: str) -> list[InputMessage]:
        return [self.end(version, partition) for partition in range(PARTITIONS)]


def _applier(hold_ms: float = HOLD_MS) -> StreamApplier:
    applier = StreamApplier(
        OLD, partition_for=functools.partial(partition_for, partitions=PARTITIONS), cutover_hold_ms=hold_ms
    )
    applier.local_partitions.update(range(PARTITIONS))
    applier.know_ruleset(NEW)
    return applier


def _step(applier: StreamApplier, messages: list[InputMessage], now_ms: float):
    """Accept, then release with every partition caught up (a single worker that read everything)."""
    accepted = applier.accept(messages)
    released = applier.release([], set(), now_ms)
    return accepted, released


def _compensation(log: _Log, history: list[str] = HISTORY) -> InputMessage:
    """c1's compensation, computed by the apply from the `history` before its markers."""
    live = process_lines([line.encode() for line in history], OLD).states["c1"]
    shadow = replay_messages(archived(history), NEW, keep_orders=True)
    restated = shadow.restate["c1"].restated(live.lifetime_earned, {}, None, NEW)
    (value,) = _compensations(NEW, live.balance, shadow, restated, CUT_OVER)
    return log.message(REDEMPTIONS, C1, b"c1", value)


def _live_apply(hold_ms: float = HOLD_MS):
    """History under the old rules, the markers, BETWEEN arriving while the apply replays, then its compensation and
    end markers. Returns the applier and every ledger entry it wrote, and what BETWEEN wrote before the end marker."""
    applier, log, ledger = _applier(hold_ms), _Log(), []
    for output in _step(applier, log.lines(HISTORY), 0.0):
        ledger += [entry for _, entry, _ in output.ledger]
    _step(applier, log.markers(NEW.version, 1_000.0), 1_000.0)
    early = []
    for output in _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0):
        early += [entry for _, entry, _ in output.ledger]
    for output in _step(applier, [_compensation(log), *log.ends(NEW.version)], 3_000.0):
        ledger += [entry for _, entry, _ in output.ledger]
    return applier, ledger + early, early, log


def _caused(output) -> set[str]:
    return {entry.caused_by for _, entry, _ in output.ledger}


def test_events_after_the_markers_wait_for_the_compensation_and_end_as_under_the_new_rules():
    batch = process_lines([line.encode() for line in HISTORY + BETWEEN], NEW)
    expected = batch.states["c1"]
    applier, ledger, early, log = _live_apply()
    assert early == []  # nothing of BETWEEN was decided before the compensation
    state = applier.states[C1]["c1"]
    assert (state.balance, state.lots) == (expected.balance, expected.lots)
    expired = [entry.points for entry in ledger if entry.rule_id == "expiry.lot"]
    assert expired == [entry.points for entry in batch.ledger if entry.rule_id == "expiry.lot"] == [-310]
    assert applier.waiting == {} and applier.late_events == 0  # held on purpose, not late
    assert {(*tp, offset) for tp, offset in log.cuts.items()} <= applier.ended

    # Without the wait (the worker before): the tick expired the old rules' lot, and the balance ends elsewhere.
    unheld, ledger, early, _ = _live_apply(hold_ms=0.0)
    assert [entry.points for entry in early if entry.rule_id == "expiry.lot"] == [-190]  # the old rules' lot of o1
    assert unheld.states[C1]["c1"].balance != expected.balance


def test_the_end_marker_applies_the_compensation_before_events_dated_earlier_and_says_so():
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    accepted, released = _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    assert applier.waiting_count == len(BETWEEN) and not released.ledger and not released.acks
    # The compensation alone is not held (it is what the others wait for), and the wait goes on without the marker.
    accepted, released = _step(applier, [_compensation(log)], 3_000.0)
    assert _caused(released) == {f"replay:{NEW.version}:c1"} and applier.waiting_count == len(BETWEEN)
    # Another partition's end marker ends nothing here.
    other = (C1 + 1) % PARTITIONS
    accepted = applier.accept([log.end(NEW.version, other)])
    assert {(topic, partition, how) for topic, partition, _, _, how in accepted.ended} == {
        (topic, other, "compensated") for topic in INPUT_TOPICS
    }
    assert applier.waiting_count == len(BETWEEN)
    marker = log.end(NEW.version, C1)
    accepted, released = _step(applier, [marker], 4_000.0)
    assert {(topic, partition, offset, version, how) for topic, partition, offset, version, how in accepted.ended} == {
        (topic, C1, log.cuts[(topic, C1)], NEW.version, "compensated") for topic in INPUT_TOPICS
    }
    assert marker in accepted.acks and applier.waiting_count == 0
    assert {"b1", "b3"} <= _caused(released)


def test_a_wait_lasts_at_most_the_hold_then_its_events_go_on_without_the_compensation():
    applier, log = _applier(hold_ms=5_000.0), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    assert applier.waiting_count == len(BETWEEN)
    released = applier.release([], set(), 6_999.0)
    assert applier.waiting_count == len(BETWEEN) and not released.ended
    released = applier.release([], set(), 7_000.0)
    assert released.ended and {(partition, how) for _, partition, _, _, how in released.ended} == {(C1, "timed out")}
    assert applier.waiting_count == 0 and _caused(released) >= {"b1", "b3"}
    # Later events after the same markers are not held again.
    _step(applier, log.lines([event("b4", "clock.tick", "2026-09-01T10:00:00+00:00")], 8_000.0), 8_000.0)
    assert applier.waiting_count == 0


def test_over_held_max_events_waiting_the_waits_end():
    applier, log = _applier(), _Log()
    applier.held_max = 2
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _, released = _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    assert {how for *_, how in released.ended} == {"too many held"} and applier.waiting_count == 0


def test_a_restarted_worker_that_read_the_end_of_the_wait_does_not_wait_again():
    log = _Log()
    history = log.lines(HISTORY)
    markers = log.markers(NEW.version)
    between = log.lines(BETWEEN, 2_000.0)
    restarted = _applier()
    for message in markers:  # from loyalty.rulesets: the activations and the ends of the waits
        restarted.activate(message.topic, message.partition, message.offset, NEW.version)
        restarted.wait_ended(message.topic, message.partition, message.offset)
    _step(restarted, history, 0.0)
    _step(restarted, between, 2_000.0)
    assert restarted.waiting_count == 0
    # One that knows the cut-overs but not the ends waits, although it never read the markers themselves.
    waiting = _applier()
    for message in markers:
        waiting.activate(message.topic, message.partition, message.offset, NEW.version)
    _step(waiting, history, 0.0)
    _step(waiting, between, 2_000.0)
    assert waiting.waiting_count == len(BETWEEN)


def test_an_apply_run_again_after_one_that_failed_ends_its_wait_and_waits_for_its_own_compensation():
    """The documented remedy of an apply that failed after its markers: run it again (the same version). Its markers
    end the first one's wait (those events are decided now, so that the worker can pass the new markers and the new
    compensation is computed from them); the events after its own markers wait for its own end marker."""
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    first_cuts = dict(log.cuts)
    _step(applier, log.lines(BETWEEN[:1], 2_000.0), 2_000.0)
    assert applier.waiting_count == 1
    accepted, released = _step(applier, log.markers(NEW.version, 3_000.0), 3_000.0)  # the apply run again
    assert {how for *_, how in accepted.ended} == {"superseded"} and applier.waiting_count == 0
    assert "b1" in _caused(released) and any(message.offset >= 0 for _, _, message in released.ledger)
    _step(applier, log.lines(BETWEEN[1:], 4_000.0), 4_000.0)
    assert applier.waiting_count == len(BETWEEN) - 1
    # The first apply's end marker, had it come after all, names its own cut-overs: the second's wait goes on.
    accepted = applier.accept([log.end(NEW.version, C1, first_cuts)])
    assert applier.waiting_count == len(BETWEEN) - 1
    assert all(first_cuts[(topic, partition)] == offset for topic, partition, offset, *_ in accepted.ended)
    compensation = _compensation(log, HISTORY + BETWEEN[:1])
    _, released = _step(applier, [compensation, log.end(NEW.version, C1)], 5_000.0)
    assert applier.waiting_count == 0 and "b3" in _caused(released)  # b2, a tick, expires nothing
    expected = process_lines([line.encode() for line in HISTORY + BETWEEN], NEW).states["c1"]
    state = applier.states[C1]["c1"]
    assert (state.balance, state.lots) == (expected.balance, expected.lots)


def test_an_unreadable_end_marker_is_dead_lettered_with_the_reason():
    applier, log = _applier(), _Log()
    message = log.message(REDEMPTIONS, 0, b"", b"default-2", [(CONTROL_HEADER, COMPENSATED_CONTROL)])
    accepted = applier.accept([message])
    assert [dead.reason[:30] for dead in accepted.dead_letters] == ["unreadable end marker of an ap"]
    assert message in accepted.acks


def test_an_apply_of_the_same_version_after_a_wait_timed_out_holds_the_events_after_its_own_markers():
    applier, log = _applier(hold_ms=5_000.0), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(BETWEEN[:1], 2_000.0), 2_000.0)
    _, released = _step(applier, [], 8_000.0)
    assert {how for *_, how in released.ended} == {"timed out"} and applier.waiting_count == 0
    _step(applier, log.markers(NEW.version, 9_000.0), 9_000.0)  # the apply run again
    _step(applier, log.lines(BETWEEN[1:], 10_000.0), 10_000.0)
    assert applier.waiting_count == len(BETWEEN) - 1


def test_a_reversal_derived_for_a_referrer_whose_partition_still_waits_waits_for_the_referrers_compensation():
    """The referee's refund after the markers is decided once the referee's partition has its compensation; it
    derives the referrer's `referral.reversed`, and the referrer's partition has not read its end marker yet: the
    reversal waits for it, so it takes back what the new rules awarded (250), not the old rules' 200."""
    from test_replay_restate import CUT_OVER as REFERRAL_CUT_OVER
    from test_replay_restate import REFERRAL, REFERRAL_NEW, REFERRAL_OLD, REFUND

    from schemas.decode import decode_event
    from streams.replay import RESTATED, Restatement, compensations

    referrer, referee = partition_for(b"c1", PARTITIONS), partition_for(b"c2", PARTITIONS)
    assert referrer != referee
    applier = StreamApplier(
        REFERRAL_OLD, partition_for=functools.partial(partition_for, partitions=PARTITIONS), cutover_hold_ms=HOLD_MS
    )
    applier.local_partitions.update(range(PARTITIONS))
    applier.know_ruleset(REFERRAL_NEW)
    log = _Log()
    _step(applier, log.lines(REFERRAL), 0.0)
    live = {customer: (state.balance, state.lifetime_earned) for customer, state in
            {**applier.states[referrer], **applier.states[referee]}.items()}  # fmt: skip
    replayed = process_lines([line.encode() for line in REFERRAL], REFERRAL_NEW).states

    def compensation(customer: str) -> InputMessage:
        before, lifetime = live[customer]
        after = replayed[customer].balance
        report = {
            "ruleset_version_new": REFERRAL_NEW.version,
            "customers": [{"customer_id": customer, "balance_before": before, "balance_after": after,
                           "delta": after - before}],
            RESTATED: {customer: Restatement.of(replayed[customer]).restated(lifetime, {}, None, REFERRAL_NEW)},
        }  # fmt: skip
        ((_, value),) = compensations(report, cut_over=REFERRAL_CUT_OVER)
        assert decode_event(value, REDEMPTIONS).customer_id == customer
        return log.message(REDEMPTIONS, partition_for(customer.encode(), PARTITIONS), customer.encode(), value)

    _step(applier, log.markers(REFERRAL_NEW.version), 1_000.0)
    _step(applier, log.lines(REFUND, 2_000.0), 2_000.0)
    _, released = _step(applier, [compensation("c2"), log.end(REFERRAL_NEW.version, referee)], 3_000.0)
    assert "r4" in _caused(released) and [m.key for m in released.derived] == [b"c1"]
    assert applier.waiting_count == 1  # the reversal, in the referrer's partition
    _step(applier, [compensation("c1"), log.end(REFERRAL_NEW.version, referrer)], 4_000.0)
    expected = process_lines([line.encode() for line in REFERRAL + REFUND], REFERRAL_NEW).states
    states = {**applier.states[referrer], **applier.states[referee]}
    assert {c: state.balance for c, state in states.items()} == {c: s.balance for c, s in expected.items()}
    assert expected["c1"].balance == 0
