"""The worker holds a partition's events after a cut-over marker until the apply's compensations are applied.

An event after the markers is decided by the new rules, on the state the new rules give, which only the compensation
brings (its lots, last activity, re-valued orders). Before, such an event arriving while the apply replayed history
was decided on the old rules' state: a tick among them expired the old rules' lots, and the compensation, computed
from the history before the markers, took them again (the review of 2026-11-28 found -100 where 140 was due).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import pytest
from test_derived_events import PARTITIONS
from test_replay_expiry import CUT_OVER, HISTORY, NEW, OLD, _compensations
from test_replay_revalue import archived, event

from schemas.topics import (
    CAUSE_RULESET_HEADER,
    COMPENSATED_CONTROL,
    CONTROL_HEADER,
    INPUT_TOPICS,
    PLAN_CONTROL,
    REDEMPTIONS,
    REFERRALS,
    RULESET_CONTROL,
    archive_side,
)
from streams import cutover
from streams.applier import InputMessage, StreamApplier, plan_part
from streams.batch import process_lines
from streams.cutover import end_marker, plan_records
from streams.replay import _is_history, replay_messages
from streams.routing import partition_for, routes_for
from streams.rules.engine import COVERED_RULE

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
        self.unread: list[InputMessage] = []  # markers written that the worker has not read yet

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

    def plans(self, version: str, customers: dict[str, int], at_ms: float = 0.0) -> list[InputMessage]:
        """An apply's plan in every partition of the redemptions topic, naming the latest cut-overs."""
        return [
            self.message(REDEMPTIONS, partition, b"", value, [(CONTROL_HEADER, PLAN_CONTROL)], at_ms)
            for partition, value in plan_records(version, self.cuts, customers, PARTITIONS)
        ]


def _applier(hold_ms: float = HOLD_MS, old=OLD, new=NEW) -> StreamApplier:
    """A worker's applier holding every partition, deciding by `old` and knowing `new` (the apply's rule set)."""
    applier = StreamApplier(
        old, partition_for=functools.partial(partition_for, partitions=PARTITIONS), cutover_hold_ms=hold_ms
    )
    applier.local_partitions.update(range(PARTITIONS))
    applier.know_ruleset(new)
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


def _referral_apply(unread: tuple[tuple[str, int], ...] = ()):
    """c2 referred by c1; the apply into REFERRAL_NEW gives the referral other points. Returns the applier after the
    history and the markers, the log, each customer's compensation, the two partitions and what the new rules give.
    `unread`: topic partitions whose markers the worker has not read yet (`log.unread`; a partition it lags behind)."""
    from test_replay_restate import CUT_OVER as REFERRAL_CUT_OVER
    from test_replay_restate import REFERRAL, REFERRAL_NEW, REFERRAL_OLD, REFUND

    from schemas.decode import decode_event
    from streams.replay import RESTATED, Restatement, compensations

    referrer, referee = partition_for(b"c1", PARTITIONS), partition_for(b"c2", PARTITIONS)
    assert referrer != referee
    applier = _applier(old=REFERRAL_OLD, new=REFERRAL_NEW)
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

    markers = log.markers(REFERRAL_NEW.version)
    log.unread = [marker for marker in markers if (marker.topic, marker.partition) in unread]
    _step(applier, [marker for marker in markers if marker not in log.unread], 1_000.0)
    expected = process_lines([line.encode() for line in REFERRAL + REFUND], REFERRAL_NEW).states
    return applier, log, compensation, referrer, referee, REFUND, REFERRAL_NEW.version, expected


def _balances(applier: StreamApplier, referrer: int, referee: int) -> dict[str, int]:
    return {
        customer: state.balance for customer, state in {**applier.states[referrer], **applier.states[referee]}.items()
    }


def test_a_reversal_derived_for_a_referrer_whose_partition_still_waits_waits_for_the_referrers_compensation():
    """The referee's refund after the markers is decided once the referee's partition has its compensation; it
    derives the referrer's `referral.reversed`, and the referrer's partition has not read its end marker yet: the
    reversal waits for it, so it takes back what the new rules awarded (250), not the old rules' 200."""
    applier, log, compensation, referrer, referee, refund, version, expected = _referral_apply()
    _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    _, released = _step(applier, [compensation("c2"), log.end(version, referee)], 3_000.0)
    assert "r4" in _caused(released) and [m.key for m in released.derived] == [b"c1"]
    assert applier.waiting_count == 1  # the reversal, in the referrer's partition
    _step(applier, [compensation("c1"), log.end(version, referrer)], 4_000.0)
    assert _balances(applier, referrer, referee) == {c: s.balance for c, s in expected.items()}
    assert expected["c1"].balance == 0


def test_with_the_plan_a_derived_reversal_waits_with_its_referrer_for_the_end_marker():
    # A referrer waits for its partition's end marker, named by the plan or not: a named referee's held refund
    # derives a reversal into its state, which its later events must come after (the test below).
    applier, log, compensation, referrer, referee, refund, version, expected = _referral_apply()
    _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    _step(applier, log.plans(version, {"c1": 1, "c2": 1}), 2_500.0)
    _, released = _step(applier, [compensation("c2")], 3_000.0)
    assert "r4" in _caused(released) and [m.key for m in released.derived] == [b"c1"]
    assert applier.waiting_count == 1  # the reversal, in the referrer's partition
    _step(applier, [compensation("c1")], 4_000.0)
    assert applier.waiting_count == 1  # c1 referred c2: it waits for the end marker
    _step(applier, [log.end(version, referrer)], 5_000.0)
    assert applier.waiting_count == 0
    assert _balances(applier, referrer, referee) == {c: s.balance for c, s in expected.items()}
    # The referee alone compensated (the referrer's figures equal under both rule sets, say): the referee's events go
    # on after its compensation, the reversal they derive waits with the referrer for the referrer's end marker.
    applier, log, compensation, referrer, referee, refund, version, _ = _referral_apply()
    _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    _step(applier, log.plans(version, {"c2": 1}), 2_500.0)
    _, released = _step(applier, [compensation("c2")], 3_000.0)
    assert _caused(released) == {f"replay:{version}:c2", "r4"} and applier.waiting_count == 1
    _, released = _step(applier, [log.end(version, referrer)], 4_000.0)
    assert _caused(released) == {"r3:reversed"} and applier.waiting_count == 0  # r3: the referral


@pytest.mark.parametrize("planned", [True, False])
def test_a_referrers_referrals_marker_read_after_the_referees_refund_arrived_holds_the_reversal_all_the_same(planned):
    """docs/replay.md listed as not corrected a reversal derived before the worker has read the cut-over marker of the
    referrer's partition in loyalty.referrals: it is not held, and is decided on the referrer's old-rules state (fed
    that marker only after the referee's compensation and end marker, c1 ends at 50, where `loyalty process` under
    the new rules gives 0). With the wait on, no such reversal is derived: the refund after the markers waits for the
    referee's plan or end marker, and the apply posts those only once the worker has committed past every marker, the
    referrals' too (`test_replay_refusals.py`), so a worker lagging on the referrer's referrals partition reads its
    marker first, and the reversal waits there for the referrer's compensation."""
    lagging = (REFERRALS, partition_for(b"c1", PARTITIONS))  # the referrals partition of the referrer, c1
    applier, log, compensation, referrer, referee, refund, version, expected = _referral_apply(unread=(lagging,))
    _, released = _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    assert not released.ledger and not released.derived and applier.waiting_count == 1  # the refund waits
    assert lagging not in applier.cutovers and len(log.unread) == 1
    _step(applier, log.unread, 2_500.0)  # the worker passes every marker before the apply posts anything more
    if planned:
        _step(applier, log.plans(version, {"c1": 1, "c2": 1}), 3_000.0)
        _, released = _step(applier, [compensation("c2")], 3_500.0)
    else:
        _, released = _step(applier, [compensation("c2"), log.end(version, referee)], 3_500.0)
    assert "r4" in _caused(released) and [m.key for m in released.derived] == [b"c1"]
    assert "r3:reversed" not in _caused(released) and applier.waiting_count == 1  # held in the referrer's partition
    _step(applier, [compensation("c1"), *log.ends(version)], 4_000.0)
    assert applier.waiting_count == 0
    assert _balances(applier, referrer, referee) == {c: s.balance for c, s in expected.items()}
    assert expected["c1"].balance == 0


def test_a_reversal_that_begins_its_referrers_wait_counts_the_hold_from_then_not_from_its_refunds_arrival():
    """The refund arrived at 2 s and waited for the referee's compensation, which came at 100 s (the referee's wait
    kept alive by its plan at 50 s; the hold is 60 s). The reversal it derives is the first event held in the
    referrer's partition, whose plan the worker has not read yet: the wait it begins counts from 100 s. Before, it
    counted from the refund's arrival, timed out at the next release, and the reversal was decided before the
    referrer's compensation: c1 ended at 50 where `loyalty process` under the new rules gives 0."""
    applier, log, compensation, referrer, referee, refund, version, expected = _referral_apply()
    _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    plans = log.plans(version, {"c1": 1, "c2": 1}, 50_000.0)
    _step(applier, [plan for plan in plans if plan.partition == referee], 50_000.0)
    later = compensation("c2")
    later.received_ms = 100_000.0
    _, released = _step(applier, [later], 100_000.0)
    assert "r4" in _caused(released) and applier.waiting_count == 1  # the reversal, in the referrer's partition
    released = applier.release([], set(), 100_001.0)
    assert not released.ended and applier.waiting_count == 1
    assert applier.waiting[(REFERRALS, referrer, log.cuts[(REFERRALS, referrer)])].since_ms == 100_000.0
    for plan in plans:
        plan.received_ms = 100_500.0
    _step(applier, [plan for plan in plans if plan.partition == referrer], 100_500.0)
    accepted, released = _step(applier, [compensation("c1"), *log.ends(version)], 101_000.0)
    assert "r3:reversed" in _caused(released) and applier.waiting_count == 0
    assert {how for *_, how in accepted.ended} == {"compensated"}
    assert _balances(applier, referrer, referee) == {c: s.balance for c, s in expected.items()}
    assert expected["c1"].balance == 0
    # The wait still ends, `cutover_hold_ms` after it began, when the apply shows no more sign of life there.
    applier, log, compensation, referrer, referee, refund, version, _ = _referral_apply()
    _step(applier, log.lines(refund, 2_000.0), 2_000.0)
    _step(applier, [plan for plan in log.plans(version, {"c2": 1}, 50_000.0) if plan.partition == referee], 50_000.0)
    later = compensation("c2")
    later.received_ms = 100_000.0
    _step(applier, [later], 100_000.0)
    assert applier.waiting_count == 1 and not applier.release([], set(), 159_999.0).ended
    released = applier.release([], set(), 160_000.0)
    assert (referrer, "timed out") in {(partition, how) for _, partition, _, _, how in released.ended}
    assert _caused(released) == {"r3:reversed"} and applier.waiting_count == 0


def _other(event_id: str, event_type: str, at: str, **fields) -> str:
    """An event of z1, a customer the apply does not compensate."""
    envelope = {"event_id": event_id, "event_type": event_type, "schema_version": 1, "occurred_at": at}
    return json.dumps({**envelope, "customer_id": "z1", "store_id": "s1", **fields})


OTHER = [
    _other("z-1", "customer.registered", "2026-05-21T10:00:00+00:00"),
    _other("z-2", "review.approved", "2026-05-22T10:00:00+00:00", review_id="zv1", sku="sku-0100", rating=4),
]


def _ids(messages) -> set[tuple[str, int, int]]:
    return {(message.topic, message.partition, message.offset) for message in messages}


def test_after_the_plan_only_the_customers_it_names_wait_each_until_its_own_compensation():
    """The apply's plan says who it compensates: the other customers' events go on as soon as it is read, and a named
    customer's events as soon as that customer's compensation is decided, before the end marker."""
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _, released = _step(applier, log.lines(BETWEEN + OTHER, 2_000.0), 2_000.0)
    assert applier.waiting_count == len(BETWEEN) + len(OTHER) and not released.ledger
    plans = log.plans(NEW.version, {"c1": 1})
    accepted, released = _step(applier, plans, 3_000.0)
    assert sorted(accepted.planned) == [
        (partition, NEW.version, int(partition == C1)) for partition in range(PARTITIONS)
    ]
    assert _caused(released) == {"z-1", "z-2"} and applier.waiting_count == len(BETWEEN)
    assert not _ids(plans) & _ids(accepted.acks)  # acked when the wait ends: a restart before it reads the plan again
    again, _ = _step(applier, plans, 3_500.0)  # read again (fetched again from the commit): not acked either
    assert not again.planned and not _ids(plans) & _ids(again.acks) and applier.waiting_count == len(BETWEEN)
    _, released = _step(applier, [_compensation(log)], 4_000.0)
    assert _caused(released) >= {f"replay:{NEW.version}:c1", "b1", "b3"} and applier.waiting_count == 0
    expected = process_lines([line.encode() for line in HISTORY + BETWEEN + OTHER], NEW).states
    for customer in ("c1", "z1"):
        state = applier.states[partition_for(customer.encode(), PARTITIONS)][customer]
        assert (state.balance, state.lots) == (expected[customer].balance, expected[customer].lots)
    # A later event of c1 does not wait: its compensation is behind it.
    later = log.lines([event("b4", "review.approved", "2026-09-01T10:00:00+00:00", review_id="v2", sku="sku-0200",
                             rating=5)], 5_000.0)  # fmt: skip
    _, released = _step(applier, later, 5_000.0)
    assert "b4" in _caused(released) and applier.waiting_count == 0
    accepted, _ = _step(applier, log.ends(NEW.version), 6_000.0)
    assert {how for *_, how in accepted.ended} == {"compensated"} and _ids(plans) <= _ids(accepted.acks)
    assert not applier.waiting


def test_a_plan_in_parts_releases_nothing_until_every_part_is_read(monkeypatch):
    monkeypatch.setattr(cutover, "plan_part_bytes", 400)
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(OTHER, 2_000.0), 2_000.0)
    named = {f"customer-{number:04d}": 1 for number in range(200)} | {"c1": 1}
    parts = [
        message for message in log.plans(NEW.version, named) if message.partition == partition_for(b"z1", PARTITIONS)
    ]
    assert len(parts) > 2 and all(len(message.value) <= 400 for message in parts)
    for part in parts[:-1]:
        accepted, released = _step(applier, [part], 3_000.0)
        assert not accepted.planned and not released.ledger and applier.waiting_count == len(OTHER)
    accepted, released = _step(applier, parts[-1:], 3_000.0)
    assert accepted.planned and _caused(released) == {"z-1", "z-2"} and applier.waiting_count == 0


def test_plan_records_put_each_customer_in_its_partition_in_parts_under_the_limit():
    cuts = {(topic, partition): 10 + partition for topic in INPUT_TOPICS for partition in range(3)}
    customers = {f"customer-{number:05d}": 1 + number % 3 for number in range(5_000)}
    records = plan_records("v2", cuts, customers, 3)
    assert {partition for partition, _ in records} == {0, 1, 2}
    seen: dict[str, int] = {}
    for partition, value in records:
        assert len(value) <= cutover.plan_part_bytes
        version, part_cuts, part, parts, named = plan_part(value)
        assert version == "v2" and part_cuts == dict.fromkeys(INPUT_TOPICS, 10 + partition) and 0 <= part < parts
        assert all(partition_for(customer.encode(), 3) == partition for customer in named)
        seen.update(named)
    assert seen == customers
    assert len(plan_records("v2", cuts, {}, 3)) == 3  # a partition with nobody to compensate still gets its plan


def test_a_plan_is_archived_as_a_control_message_and_replayed_as_none():
    assert archive_side([(CONTROL_HEADER, PLAN_CONTROL)]) == 5
    assert not _is_history(5, "")


def test_a_worker_restarted_before_the_end_marker_reads_the_plan_again_and_its_compensation_as_a_repeat():
    """The plan's parts are acked only when the wait ends, so a restart before it re-delivers them, with the
    compensation (applied already: a repeat, which writes nothing) and the events after the markers."""
    applier, log = _applier(), _Log()
    written = []
    for output in _step(applier, log.lines(HISTORY), 0.0):
        written += [entry for _, entry, _ in output.ledger]
    markers = log.markers(NEW.version, 1_000.0)
    _step(applier, markers, 1_000.0)
    between = log.lines(BETWEEN + OTHER, 2_000.0)
    plans = log.plans(NEW.version, {"c1": 1})
    compensation = _compensation(log)
    for batch in (between, plans, [compensation]):
        for output in _step(applier, batch, 3_000.0):
            written += [entry for _, entry, _ in output.ledger]
    assert applier.waiting_count == 0 and {"b1", "z-2"} <= {entry.caused_by for entry in written}

    restarted = _applier()
    for partition in range(PARTITIONS):
        mine = [entry for entry in written if partition_for(entry.customer_id.encode(), PARTITIONS) == partition]
        restarted.restore(partition, mine)
        restarted.finish_restore(partition)
    for message in markers:  # from loyalty.rulesets: the activations, no end of a wait
        restarted.activate(message.topic, message.partition, message.offset, NEW.version)
    _, released = _step(restarted, between, 10_000.0)
    assert restarted.waiting_count == len(BETWEEN) + len(OTHER) and not released.ledger
    _step(restarted, plans, 11_000.0)
    assert restarted.waiting_count == len(BETWEEN)
    _, released = _step(restarted, [compensation], 12_000.0)
    assert restarted.waiting_count == 0 and not released.ledger  # every one of them a repeat
    for customer in ("c1", "z1"):
        partition = partition_for(customer.encode(), PARTITIONS)
        before, after = applier.states[partition][customer], restarted.states[partition][customer]
        assert (after.balance, after.lots, after.sequence) == (before.balance, before.lots, before.sequence)


def _split_compensation(log: _Log, monkeypatch) -> list[InputMessage]:
    """c1's compensation in two messages (the restated lots in the second), as an apply posts one that is too large."""
    from streams import replay

    monkeypatch.setattr(replay, "compensation_bytes_max", 1000)
    live = process_lines([line.encode() for line in HISTORY], OLD).states["c1"]
    shadow = replay_messages(archived(HISTORY), NEW, keep_orders=True)
    restated = shadow.restate["c1"].restated(live.lifetime_earned, {}, None, NEW)
    values = _compensations(NEW, live.balance, shadow, restated, CUT_OVER)
    assert len(values) == 2 and b'"restated"' in values[1]
    return [log.message(REDEMPTIONS, C1, b"c1", value) for value in values]


def test_a_compensation_read_twice_counts_once_toward_its_customers_release(monkeypatch):
    """A redemptions partition kept through a rebalance is fetched again from its commit, which the plan holds back:
    the compensations after the plan come again, the first part of c1's while its second is still to come. The copy
    is no further compensation: c1's events wait for the second part (the restated lots, which the tick expires)."""
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    first, second = _split_compensation(log, monkeypatch)
    _step(applier, [*log.plans(NEW.version, {"c1": 2}), first], 3_000.0)
    assert applier.waiting_count == len(BETWEEN)
    _, released = _step(applier, [first], 4_000.0)  # re-delivered: the same message again
    assert not released.ledger and applier.waiting_count == len(BETWEEN)
    _, released = _step(applier, [second], 5_000.0)
    assert {"b1", "b3"} <= _caused(released) and applier.waiting_count == 0
    expected = process_lines([line.encode() for line in HISTORY + BETWEEN], NEW).states["c1"]
    state = applier.states[C1]["c1"]
    assert (state.balance, state.lots) == (expected.balance, expected.lots)


def test_a_wait_times_out_only_after_the_hold_without_a_plan_part_or_compensation_of_its_partition():
    """An apply with many compensations keeps its waits alive while they arrive: the hold counts from the last one
    (before, from the first held event, so a large apply outlasted the default 900 s and its last customers' events
    were decided without their compensations)."""
    applier, log = _applier(hold_ms=5_000.0), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    _step(applier, log.plans(NEW.version, {"c1": 2}, 5_000.0), 5_000.0)  # c1's compensation in two messages
    compensation = _compensation(log)
    compensation.received_ms = 9_000.0
    _, released = _step(applier, [compensation], 9_000.0)  # the first: c1 still waits for the second
    assert applier.waiting_count == len(BETWEEN) and C1 not in {partition for _, partition, *_ in released.ended}
    released = applier.release([], set(), 13_999.0)  # 12 s after the first held event, 5 s after the compensation
    assert applier.waiting_count == len(BETWEEN) and C1 not in {partition for _, partition, *_ in released.ended}
    released = applier.release([], set(), 14_000.0)
    assert {(partition, how) for _, partition, _, _, how in released.ended} == {(C1, "timed out")}
    assert applier.waiting_count == 0 and {"b1", "b3"} <= _caused(released)


def test_a_plan_part_or_compensation_read_again_is_no_sign_of_life_of_the_apply():
    """An apply that died after its plan and a first compensation: a rebalance that keeps the partition fetches the
    redemptions partition again from its commit (which the plan holds back), so both come again. A copy read again
    says nothing of the apply: the hold counts from the last message read for the first time, and so ends; were the
    copies a sign of life, a rebalance every `cutover_hold_ms` would keep the events waiting for ever."""
    applier, log = _applier(hold_ms=5_000.0), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    _step(applier, log.lines(BETWEEN, 2_000.0), 2_000.0)
    plans = log.plans(NEW.version, {"c1": 2}, 3_000.0)  # c1's compensation in two messages: the second never comes
    compensation = _compensation(log)
    compensation.received_ms = 3_000.0
    _step(applier, [*plans, compensation], 3_000.0)
    assert applier.waiting_count == len(BETWEEN)
    again = [dataclasses.replace(message, received_ms=7_000.0) for message in [*plans, compensation]]
    _, released = _step(applier, again, 7_000.0)  # the rebalance: read again
    assert applier.waiting_count == len(BETWEEN) and not released.ended
    released = applier.release([], set(), 8_000.0)  # 5 s after the last message read for the first time
    assert (C1, "timed out") in {(partition, how) for _, partition, _, _, how in released.ended}
    assert {how for *_, how in released.ended} == {"timed out"}
    assert applier.waiting_count == 0 and {"b1", "b3"} <= _caused(released)


def test_a_redemption_whose_id_merely_starts_like_a_compensation_waits_like_any_event():
    """Event ids are the producers' choice: only what the core takes for a compensation (its actor and adjustment
    id) is one, so a store's redemption with such an id is held after the markers, not decided ahead of them."""
    applier, log = _applier(), _Log()
    _step(applier, log.lines(HISTORY), 0.0)
    _step(applier, log.markers(NEW.version), 1_000.0)
    redemption = event(f"replay:{NEW.version}:c1", "points.redeem_requested", "2026-05-21T10:00:00+00:00",
                       redemption_id="d1", points=10)  # fmt: skip
    _, released = _step(applier, log.lines([redemption], 2_000.0), 2_000.0)
    assert applier.waiting_count == 1 and not released.ledger
    # The id is reserved: once it goes on, the core refuses it, as every driver does (`loyalty process` too).
    _, released = _step(applier, log.ends(NEW.version), 3_000.0)
    assert [dead.reason for dead in released.dead_letters] == [
        f"event_id: replay:{NEW.version}:c1 starts with 'replay:', which is reserved for the compensations of "
        "`loyalty replay --apply`"
    ]
    batch = process_lines([line.encode() for line in [*HISTORY, redemption]], NEW)
    assert [rejection.reason for rejection in batch.rejected] == [released.dead_letters[0].reason]


def test_a_referrer_the_plan_does_not_name_waits_for_the_end_marker_behind_a_named_referees_reversal():
    """The new rules change the referee's points only, so the plan names c2, not its referrer c1. c2's refund after
    the markers waits for c2's compensation and then derives c1's `referral.reversed`; c1's redemption after that
    refund must be decided after the reversal, as `loyalty process` decides it (refused: the 200 points are gone).
    Released at the plan, the redemption went first and the reversal left c1 200 points in debt."""
    from test_replay_restate import CUT_OVER as REFERRAL_CUT_OVER
    from test_replay_restate import REFERRAL, REFUND, _referral_rules, _shopper

    from streams.replay import RESTATED, Restatement, compensations

    old, new = _referral_rules("referrals-a", 200, 100), _referral_rules("referrals-b", 200, 150)
    redeem = [_shopper("r5", "points.redeem_requested", "2026-12-06T10:00:00+00:00", "c1", redemption_id="d1",
                       points=200)]  # fmt: skip
    live = process_lines([line.encode() for line in REFERRAL], old).states
    replayed = process_lines([line.encode() for line in REFERRAL], new).states
    report = {
        "ruleset_version_new": new.version,
        "customers": [{"customer_id": "c2", "balance_before": live["c2"].balance,
                       "balance_after": replayed["c2"].balance, "delta": replayed["c2"].balance - live["c2"].balance}],
        RESTATED: {"c2": Restatement.of(replayed["c2"]).restated(live["c2"].lifetime_earned, {}, None, new)},
    }  # fmt: skip
    assert live["c1"].balance == replayed["c1"].balance and live["c2"].balance != replayed["c2"].balance
    applier = _applier(old=old, new=new)
    log = _Log()
    _step(applier, log.lines(REFERRAL), 0.0)
    _step(applier, log.markers(new.version, 1_000.0), 1_000.0)
    _step(applier, log.lines(REFUND + redeem, 2_000.0), 2_000.0)
    _, released = _step(applier, log.plans(new.version, {"c2": 1}, 3_000.0), 3_000.0)
    assert "r5" not in _caused(released)  # c1 is a referrer: a named referee's held events can change its state
    ((_, value),) = compensations(report, cut_over=REFERRAL_CUT_OVER)
    _step(applier, [log.message(REDEMPTIONS, partition_for(b"c2", PARTITIONS), b"c2", value)], 4_000.0)
    _step(applier, log.ends(new.version), 5_000.0)
    applier.release([], set(), 20_000.0)
    assert applier.waiting_count == 0
    expected = process_lines([line.encode() for line in REFERRAL + REFUND + redeem], new).states
    referrer, referee = partition_for(b"c1", PARTITIONS), partition_for(b"c2", PARTITIONS)
    assert _balances(applier, referrer, referee) == {customer: s.balance for customer, s in expected.items()}
    assert expected["c1"].balance == 0


@dataclasses.dataclass
class _Run:
    """What `_refund_before_the_markers` ended with."""

    got: dict[str, int]  # each customer's balance
    expected: dict[str, int]  # `loyalty process` under the new rules over the whole log
    ledger: list  # c1's entries
    b: StreamApplier  # the worker holding c1's partition
    b_ledger: list  # its entries, in the order written
    b_outputs: list  # its outputs
    copies: list[InputMessage]  # the published copies of the reversal, as B read them


def _refund_before_the_markers(old, new, *, workers: int, timed_out: bool = False) -> _Run:
    """c2 referred by c1 (REFERRAL), then c2's refund (REFUND) written before the markers in c2's partition, decided
    under `old` only after the worker has read the markers of c1's partition: the reversal it derives for c1 lands in
    loyalty.referrals after c1's marker. With `workers=2` worker A holds every partition but c1's and publishes the
    reversal; worker B holds c1's and reads the published copy. The apply then compares the live entries before the
    markers (every entry so far of another rule set than `new`) with a replay of the history before them (REFERRAL +
    REFUND, the reversal derived again under `new`), posts the compensations and end markers. `timed_out`: the apply
    is slow, and the workers' waits time out (`HOLD_MS`) before it compares."""
    from test_replay_derived import archived as archived_messages
    from test_replay_restate import CUT_OVER as REFERRAL_CUT_OVER
    from test_replay_restate import REFERRAL, REFUND

    from streams.replay import RESTATED, compensations

    referrer, referee = partition_for(b"c1", PARTITIONS), partition_for(b"c2", PARTITIONS)
    a = _applier(old=old, new=new)
    b = _applier(old=old, new=new) if workers == 2 else a
    if workers == 2:
        a.local_partitions.discard(referrer)
        b.local_partitions.intersection_update({referrer})
    log, ledger, b_ledger, b_outputs = _Log(), [], [], []

    def feed(messages: list[InputMessage], at_ms: float) -> list:
        outputs = []
        for applier in dict.fromkeys((a, b)):
            mine = [m for m in messages if (applier is b) == (m.partition == referrer) or a is b]
            for output in _step(applier, mine, at_ms):
                ledger.extend(entry for _, entry, _ in output.ledger)
                outputs.append(output)
                if applier is b:
                    b_outputs.append(output)
                    b_ledger.extend(entry for _, entry, _ in output.ledger)
        return outputs

    history = log.lines(REFERRAL)
    feed(history, 0.0)
    refund = log.lines(REFUND, 500.0)  # before the markers
    markers = log.markers(new.version, 1_000.0)
    feed([m for m in markers if m.partition == referrer], 1_000.0)  # c1's partition passes its markers first
    outputs = feed([*refund, *(m for m in markers if m.partition != referrer)], 1_500.0)
    assert all(entry.ruleset_version == old.version for entry in ledger if entry.caused_by == "r4")
    published = [m for output in outputs for m in output.derived]
    assert [m.key for m in published] == [b"c1"]
    copies = [log.message(m.topic, m.partition, m.key, m.value, m.headers, 2_000.0) for m in published]
    assert copies[0].offset > log.cuts[(REFERRALS, referrer)]  # after the referrer's referrals marker
    feed(copies, 2_000.0)
    later = 0.0
    if timed_out:
        later = 2_000.0 + HOLD_MS
        assert any(how == "timed out" for output in feed([], later) for *_, how in output.ended)
    # The apply, once the workers have passed every marker: live entries before the markers, replay of the history.
    live: dict[str, int] = collections.Counter()
    for entry in ledger:
        if entry.ruleset_version != new.version:
            live[entry.customer_id] += entry.points
    before = archived_messages(history + refund)
    shadow = replay_messages(
        before, new, keep_orders=True, refetch=lambda keys: [m for m in before if m.routing_key in keys]
    )
    values = []
    for customer in ("c1", "c2"):
        partition = partition_for(customer.encode(), PARTITIONS)
        state = (b if partition == referrer else a).states[partition][customer]
        after = shadow.balances[customer]
        report = {
            "ruleset_version_new": new.version,
            "customers": [{"customer_id": customer, "balance_before": live[customer], "balance_after": after,
                           "delta": after - live[customer]}],
            RESTATED: {customer: shadow.restate[customer].restated(state.lifetime_earned, {}, None, new)},
        }  # fmt: skip
        for _, value in compensations(report, cut_over=REFERRAL_CUT_OVER):
            values.append(log.message(REDEMPTIONS, partition, customer.encode(), value))
    feed([*values, *log.ends(new.version)], later + 3_000.0)
    assert a.waiting_count == b.waiting_count == 0
    got = {"c1": b.states[referrer]["c1"].balance, "c2": a.states[referee]["c2"].balance}
    expected = process_lines([line.encode() for line in REFERRAL + REFUND], new).states
    return _Run(
        got,
        {customer: state.balance for customer, state in expected.items()},
        [e for e in ledger if e.customer_id == "c1"],
        b,
        b_ledger,
        b_outputs,
        copies,
    )


def _window(ruleset, version: str, days: int):
    """`ruleset` under another version with another referral return window."""
    import yaml
    from test_replay_revalue import RULESETS

    from streams.rules.ruleset import parse_ruleset

    document = yaml.safe_load((RULESETS / "default.yaml").read_text())
    document["version"] = version
    document["referral"] = {"referrer_points": ruleset.referral.referrer_points,
                            "referee_points": ruleset.referral.referee_points, "return_window_days": days}  # fmt: skip
    return parse_ruleset(yaml.safe_dump(document))


@pytest.mark.parametrize("window", [30, 3])
def test_a_reversal_from_a_refund_before_the_markers_derived_in_place_is_in_the_live_entries_the_apply_compares(window):
    """One worker holds both partitions: the refund before c2's marker, decided under the old rules after the worker
    read c1's referrals marker, derives c1's reversal in place, under the old rules and not held (it is history). Its
    entry is written before the worker's commit passes c2's marker, so the apply compares it: c1 is not compensated
    for it again and ends as under the new rules, 0 (250 - 250), or 250 with a new return window of 3 days that does
    not reverse the referral; its published copy, read after the compensation, is a repeat."""
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    new = REFERRAL_NEW if window == 30 else _window(REFERRAL_NEW, "referrals-3d", window)
    run = _refund_before_the_markers(REFERRAL_OLD, new, workers=1)
    got, expected, ledger = run.got, run.expected, run.ledger
    assert got == expected and expected["c1"] == (0 if window == 30 else 250)
    reversal = [(e.points, e.ruleset_version) for e in ledger if e.caused_by == "r3:reversed"]
    assert reversal == [(-200, REFERRAL_OLD.version)]


def _reversal(run: _Run) -> list[tuple[str, int, str]]:
    return [(e.rule_id, e.points, e.ruleset_version) for e in run.ledger if e.caused_by == "r3:reversed"]


def test_a_published_reversal_of_a_refund_before_the_markers_read_by_another_worker_is_counted_once():
    """The referrer's partition is held by another worker (B). The reversal's published copy lies after c1's referrals
    marker and names the rule set of its cause (the refund, decided under the old rules before c2's marker): B holds it
    until c1's end marker, like any event after the marker. The apply's live entries before the markers do not contain
    it (not decided yet), and its replay of the history before them (the refund is there) derives the reversal again:
    the compensation takes 200 (0 - 200). The copy, decided after that, is covered by it: a 0-point entry. c1 ends at 0
    as under `loyalty process` under the new rules (before the fix -200: the copy, decided by its position under the
    new rules, took the 200 again)."""
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    run = _refund_before_the_markers(REFERRAL_OLD, REFERRAL_NEW, workers=2)
    assert (CAUSE_RULESET_HEADER, REFERRAL_OLD.version.encode()) in run.copies[0].headers
    assert _reversal(run) == [(COVERED_RULE, 0, REFERRAL_NEW.version)]
    assert run.got == run.expected and run.got["c1"] == 0


def test_a_published_reversal_the_new_rules_do_not_make_is_not_taken_after_the_compensation():
    """The same, with a new referral return window of 3 days: the refund (4 days after the order) reverses the referral
    under the old rules (30 days) and not under the new ones. The apply compensates c1 +50 (250 under the new rules,
    200 live) and restates its referral of c2 at 250; B's copy, decided after that, is covered: c1 ends at 250 as under
    `loyalty process` under the new rules (before the fix 0: the copy took the restated 250 back)."""
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    new = _window(REFERRAL_NEW, "referrals-3d", 3)
    run = _refund_before_the_markers(REFERRAL_OLD, new, workers=2)
    assert _reversal(run) == [(COVERED_RULE, 0, new.version)]
    assert run.got == run.expected and run.got["c1"] == 250


@pytest.mark.parametrize("window", [30, 3])
def test_a_published_reversal_after_a_wait_that_timed_out_is_decided_by_its_causes_rules(window):
    """B's wait after c1's marker times out before the apply compares (an apply slower than `HOLD_MS`): the copy is
    decided then, by its cause's rule set (the old one: -200), as the worker holding both partitions decides it in
    place. The apply then counts its entry among the live ones (an entry of another rule set than the new one) and
    compensates c1 for the rest: c1 ends as under the new rules, 0, or 250 with a new return window of 3 days (before
    the fix, decided by its position under the new rules and left out of the live entries: -200, and 50)."""
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    new = REFERRAL_NEW if window == 30 else _window(REFERRAL_NEW, "referrals-3d", window)
    run = _refund_before_the_markers(REFERRAL_OLD, new, workers=2, timed_out=True)
    assert _reversal(run) == [("referral.referrer.reversal", -200, REFERRAL_OLD.version)]
    assert run.got == run.expected and run.got["c1"] == (0 if window == 30 else 250)


@pytest.mark.parametrize("written", [True, False])
def test_a_covered_copy_read_again_after_a_restart_counts_once(written):
    """B restarts after the end marker's wait was recorded as compensated in loyalty.rulesets (`ended:`, how
    "compensated"), and reads the copy again. `written`: the copy's 0-point entry was written (its ledger restored): a
    repeat, nothing new; else (B died between the end marker's batch and the copy's) the restarted B, which knows from
    the record that the compensations are applied, decides the copy as covered again. c1 stays at 0 either way."""
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    run = _refund_before_the_markers(REFERRAL_OLD, REFERRAL_NEW, workers=2)
    referrer = partition_for(b"c1", PARTITIONS)
    restarted = _applier(old=REFERRAL_OLD, new=REFERRAL_NEW)
    restarted.local_partitions.intersection_update({referrer})
    ended: dict[tuple[str, int, int], str] = {}  # as `cutover.read_rulesets` reads the records
    for output in run.b_outputs:
        for topic, partition, offset, version in output.activations:
            restarted.activate(topic, partition, offset, version)
        for topic, partition, offset, _, how in output.ended:
            if ended.get((topic, partition, offset)) != "compensated":
                ended[(topic, partition, offset)] = how
    assert ended[(REFERRALS, referrer, min(m.offset for m in run.copies) - 1)] == "compensated"
    for (topic, partition, offset), how in ended.items():
        restarted.wait_ended(topic, partition, offset, how)
    kept = [e for e in run.b_ledger if e.customer_id == "c1" and (written or e.caused_by != "r3:reversed")]
    restarted.restore(referrer, kept)
    restarted.finish_restore(referrer)
    again = [dataclasses.replace(copy, received_ms=10_000.0) for copy in run.copies]
    entries = [entry for output in _step(restarted, again, 10_000.0) for _, entry, _ in output.ledger]
    if written:
        assert entries == []
    else:
        assert [(e.rule_id, e.points, e.ruleset_version) for e in entries] == [(COVERED_RULE, 0, REFERRAL_NEW.version)]
    assert restarted.states[referrer]["c1"].balance == run.expected["c1"] == 0


def test_the_end_of_a_wait_read_after_it_timed_out_is_recorded_as_compensated():
    """An end marker read after the wait it names timed out: the compensations are applied all the same, and a copy
    decided later must know it, after a restart too. So the end is recorded again, as compensated (a later record of
    the same `ended:` key), which `cutover.read_rulesets` keeps."""
    run = _refund_before_the_markers(*_referral_rulesets(), workers=2, timed_out=True)
    referrer = partition_for(b"c1", PARTITIONS)
    cut = (REFERRALS, referrer, min(m.offset for m in run.copies) - 1)
    hows = [how for output in run.b_outputs for *ended, _, how in output.ended if tuple(ended) == cut]
    assert hows == ["timed out", "compensated"] and cut in run.b.compensated


def _referral_rulesets():
    from test_replay_restate import REFERRAL_NEW, REFERRAL_OLD

    return REFERRAL_OLD, REFERRAL_NEW


def test_a_rebuilt_worker_decides_the_left_out_event_before_the_markers_before_the_compensation():
    """An embedded `loyalty up` SIGKILLed after an apply published its compensations, before they (as applied) reached
    ClickHouse: the rebuilt ledger leaves the customer's last event out (e3, a purchase before the markers, which
    may be only partly projected) for the worker to decide again as it re-reads every input. The small redemptions
    partition is read first; its end marker applies the compensation at once (`StreamApplier._compensated`), before
    e3 is read: e3 then finds its order recorded by the compensation's re-valuation and earns nothing (a duplicate
    order), and the ledger in ClickHouse keeps both decisions under the same sequence numbers. On the running system
    94 of 169 customers ended below `loyalty process` (424,086 points in all where 458,900 are due), and every later
    apply of the same rule set had its compensations dead-lettered as conflicting repeats. The same after a plain
    SIGTERM (Ctrl-C) of `loyalty up` 0.2 s after `--apply` returned (the worker stops before reading the plan; the
    projector then archives the compensations and end markers): 94 customers, 420,837 points against 458,900.
    Leaving the compensations of cuts already recorded as compensated in the event-time buffer makes this test pass
    (and took the running system from 94 customers to 9), but the events after the markers that the first run never
    decided are then decided before the compensation (the next test). Both need the order of positions, which the
    rebuilt worker now keeps (`StreamApplier._reread_marker`): every message before the markers, then the
    compensations, then the messages after them."""
    history = HISTORY[:3]  # e3, a purchase, is c1's last event before the markers
    first, log, ledger = _applier(), _Log(), []
    everything = log.lines(history)
    for output in _step(first, everything, 0.0):
        ledger += [entry for _, entry, _ in output.ledger]
    everything += log.markers(NEW.version)
    everything += [_compensation(log, history), *log.ends(NEW.version)]

    second = _applier()
    second.restore(C1, [entry for entry in ledger if entry.caused_by != "e3"])
    second.finish_restore(C1)
    for (topic, partition), offset in log.cuts.items():  # what the rebuilt loyalty.rulesets gives a restarted worker
        second.activate(topic, partition, offset, NEW.version)
        second.wait_ended(topic, partition, offset, "compensated")
    # Read again after the restart: the small redemptions partitions to their end first, while the other partitions
    # have delivered nothing yet.
    everything = [dataclasses.replace(message, received_ms=10_000.0) for message in everything]
    assigned = [(topic, partition) for topic in INPUT_TOPICS for partition in range(PARTITIONS)]
    second.accept([m for m in everything if m.topic == REDEMPTIONS])
    second.release(assigned, {tp: 10_000.0 for tp in assigned if tp[0] == REDEMPTIONS}, 10_500.0)
    _step(second, [m for m in everything if m.topic != REDEMPTIONS], 11_000.0)
    expected = process_lines([line.encode() for line in history], NEW).states["c1"]
    assert second.states[C1]["c1"].balance == expected.balance


# After the markers, while the apply replays: a review, and a redemption only the new rules' points cover (c1 has 350
# points under the old rules after e3, 530 under the new ones).
UNDECIDED = [
    event("u1", "review.approved", "2026-05-20T10:00:00+00:00", review_id="v9", sku="sku-0200", rating=4),
    event("u2", "points.redeem_requested", "2026-05-25T10:00:00+00:00", redemption_id="x9", points=500),
]


@pytest.mark.parametrize("redemptions_first", [True, False])
def test_a_rebuilt_worker_decides_the_events_after_the_markers_the_first_run_held_after_the_compensation(
    redemptions_first,
):
    """The first run held UNDECIDED after the markers for the compensation and died before reading it (and e3's
    entries, its last before the markers, did not all reach ClickHouse). The rebuilt worker re-reads every input,
    its cut-overs recorded `compensated`: whichever topics come first, it decides e3 (left out of the rebuilt ledger)
    under the old rules, then the compensation, then UNDECIDED under the new rules on the state the compensation gives,
    so the redemption of 500 points is granted, as `loyalty process` under the new rules grants it. (QA's partial fix,
    the compensation kept in the event-time buffer, refused it: dated before the compensation, it came first.)"""
    history = HISTORY[:3]
    first, log, ledger = _applier(), _Log(), []
    everything = log.lines(history)
    for output in _step(first, everything, 0.0):
        ledger += [entry for _, entry, _ in output.ledger]
    everything += log.markers(NEW.version, 1_000.0)
    everything += log.lines(UNDECIDED, 2_000.0)
    for output in _step(first, everything[-(len(INPUT_TOPICS) * PARTITIONS + len(UNDECIDED)) :], 2_000.0):
        assert not output.ledger  # held for the compensation, which this worker never reads
    assert first.waiting_count == len(UNDECIDED)
    everything += [_compensation(log, history), *log.ends(NEW.version)]

    second = _applier()
    second.restore(C1, [entry for entry in ledger if entry.caused_by != "e3"])
    second.finish_restore(C1)
    for (topic, partition), offset in log.cuts.items():
        second.activate(topic, partition, offset, NEW.version)
        second.wait_ended(topic, partition, offset, "compensated")
    everything = [dataclasses.replace(message, received_ms=10_000.0) for message in everything]
    assigned = [(topic, partition) for topic in INPUT_TOPICS for partition in range(PARTITIONS)]
    early = [m for m in everything if (m.topic == REDEMPTIONS) == redemptions_first]
    decided = [*second.accept(early).ledger]
    decided += second.release(assigned, {(m.topic, m.partition) for m in early}, 10_500.0).ledger
    for output in _step(second, [m for m in everything if m not in early], 11_000.0):
        decided += output.ledger
    decided += second.release(assigned, set(assigned), 12_000.0).ledger

    batch = process_lines([line.encode() for line in history + UNDECIDED], NEW)
    order = [entry.caused_by for _, entry, _ in decided]
    assert list(dict.fromkeys(order)) == ["e3", f"replay:{NEW.version}:c1", "u1", "u2"]
    assert [(e.kind, e.points) for _, e, _ in decided if e.caused_by == "u2"] == [("redeemed", -500)]
    assert second.states[C1]["c1"].balance == batch.states["c1"].balance
    assert second.waiting == {} and second.held == []


def test_a_rebuilt_workers_wait_that_times_out_lets_the_compensation_go_on_not_lose_it():
    """The rebuilt worker holds a compensated apply's compensation until every marker its end marker names is read
    again; when the other topics' partitions deliver nothing for `cutover_hold_ms`, the wait ends as a live one does,
    and the compensation is decided then, not kept for ever (it is unacknowledged meanwhile)."""
    history = HISTORY[:3]
    log = _Log()
    everything = [*log.lines(history), *log.markers(NEW.version)]
    everything += [_compensation(log, history), *log.ends(NEW.version)]
    rebuilt = _applier(hold_ms=5_000.0)
    for (topic, partition), offset in log.cuts.items():
        rebuilt.activate(topic, partition, offset, NEW.version)
        rebuilt.wait_ended(topic, partition, offset, "compensated")
    redemptions = [dataclasses.replace(m, received_ms=10_000.0) for m in everything if m.topic == REDEMPTIONS]
    accepted = rebuilt.accept(redemptions)
    assigned = [(topic, partition) for topic in INPUT_TOPICS for partition in range(PARTITIONS)]
    waiting = rebuilt.release(assigned, {tp: 10_000.0 for tp in assigned if tp[0] == REDEMPTIONS}, 14_999.0)
    assert not accepted.ledger and not waiting.ledger and not waiting.ended
    assert not any(message.key == b"c1" for message in accepted.acks + waiting.acks)
    released = rebuilt.release(assigned, {tp: 15_000.0 for tp in assigned if tp[0] == REDEMPTIONS}, 15_000.0)
    assert _caused(released) == {f"replay:{NEW.version}:c1"} and rebuilt.waiting == {}


@pytest.mark.xfail(strict=True, reason="review 2026-11-28, not fixed: see the docstring")
def test_a_rebuilt_worker_whose_big_topics_reach_the_markers_after_the_hold_keeps_the_order():
    """As `test_a_rebuilt_worker_decides_the_left_out_event_before_the_markers_before_the_compensation`, but the other
    topics give the left-out event back only 80 s after the redemptions partition was read again, with a hold of 60 s
    (a rebuild whose big topics take longer than `LOYALTY_CUTOVER_HOLD_S`, 900 s by default, to re-read up to their
    markers: about 6M input messages at the worker's measured drain rate). The rebuilt wait counts from the re-read of
    the redemptions marker, and the stashed compensations renew nothing, so it times out and the compensation is
    decided before the left-out event (470 where `loyalty process` gives 530), and a replayed wait's end is not logged
    (its cut is already in `ended`). Found by the review of 2026-11-28; it passes with the other topics at 20 s."""
    history = HISTORY[:3]
    first, log, ledger = _applier(), _Log(), []
    everything = log.lines(history)
    for output in _step(first, everything, 0.0):
        ledger += [entry for _, entry, _ in output.ledger]
    everything += log.markers(NEW.version)
    everything += [_compensation(log, history), *log.ends(NEW.version)]
    second = _applier(hold_ms=60_000.0)
    second.restore(C1, [entry for entry in ledger if entry.caused_by != "e3"])
    second.finish_restore(C1)
    for (topic, partition), offset in log.cuts.items():
        second.activate(topic, partition, offset, NEW.version)
        second.wait_ended(topic, partition, offset, "compensated")
    assigned = [(topic, partition) for topic in INPUT_TOPICS for partition in range(PARTITIONS)]
    second.accept([dataclasses.replace(m, received_ms=10_000.0) for m in everything if m.topic == REDEMPTIONS])
    second.release(assigned, {tp: 10_000.0 for tp in assigned if tp[0] == REDEMPTIONS}, 10_500.0)
    moment = 10_500.0
    while moment < 80_000.0:  # the big topics are still re-read up to their markers; releases go on meanwhile
        moment += 1_000.0
        second.release(assigned, {tp: moment for tp in assigned if tp[0] == REDEMPTIONS}, moment)
    rest = [dataclasses.replace(m, received_ms=80_000.0) for m in everything if m.topic != REDEMPTIONS]
    _step(second, rest, 80_500.0)
    expected = process_lines([line.encode() for line in history], NEW).states["c1"]
    assert second.states[C1]["c1"].balance == expected.balance
