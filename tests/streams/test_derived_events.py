"""Derived events in the stream applier: a referral reversed on the referrer's partition, in order."""

from __future__ import annotations

import collections
import functools

from schemas.topics import DERIVED_SIDE, REFERRALS, SIDE_HEADER
from streams.applier import InputMessage, StreamApplier
from streams.batch import process_lines
from streams.routing import partition_for, routes_for
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

PARTITIONS = 4
RULES = "streams/rules/rulesets/full-lifecycle.yaml"


def routed(lines: list[bytes]) -> list[InputMessage]:
    """The log as the producer publishes it: per line its routes, each on its key's partition."""
    offsets: collections.Counter = collections.Counter()
    messages = []
    for raw in lines:
        for route in routes_for(raw):
            partition = partition_for(route.key, PARTITIONS) if route.key else 0
            offset = offsets[(route.topic, partition)]
            offsets[(route.topic, partition)] += 1
            messages.append(InputMessage(route.topic, partition, offset, route.key, raw, route.headers))
    return messages


def drain(applier: StreamApplier, messages: list[InputMessage]):
    """Everything accepted, then released at once (every partition caught up), as a single worker does."""
    applier.local_partitions.update(range(PARTITIONS))
    accepted = applier.accept(messages)
    assert not accepted.ledger
    return accepted, applier.release([], set(), 0.0)


def test_a_single_worker_applies_derived_reversals_in_place_and_equals_the_batch_driver():
    lines = [line.encode() for line in generate_events(events=3000, customers=120, seed=5, mean_gap_seconds=5000)]
    ruleset = load_ruleset(RULES)
    expected = process_lines(lines, ruleset)
    derived_rules = ("referral.referrer.reversal", "referral.referrer.withdrawn")
    reversals = [entry for entry in expected.ledger if entry.rule_id in derived_rules]
    assert sum(entry.rule_id == "referral.referrer.reversal" for entry in reversals) >= 3, "no referral reversals"

    applier = StreamApplier(ruleset, partition_for=functools.partial(partition_for, partitions=PARTITIONS))
    _, output = drain(applier, routed(lines))
    streamed = {entry.entry_id: entry for _, entry, _ in output.ledger}
    wanted = {entry.entry_id: entry for entry in expected.ledger}
    assert set(streamed) == set(wanted)
    differing = [key for key in wanted if streamed[key] != wanted[key]]
    assert not differing, f"{len(differing)} entries differ, e.g. {differing[:1]}"

    # Every derived event is published, keyed by the referrer, on the referrer's partition of loyalty.referrals.
    derived = output.derived
    assert len(derived) == len({entry.caused_by for entry in reversals})
    for message in derived:
        assert message.topic == REFERRALS and (SIDE_HEADER, DERIVED_SIDE) in message.headers
        assert message.partition == partition_for(message.key, PARTITIONS)
    # The published copy comes back as a duplicate: it changes nothing.
    copies = [InputMessage(m.topic, m.partition, 10_000 + n, m.key, m.value, m.headers) for n, m in enumerate(derived)]
    accepted, again = drain(applier, copies)
    assert not again.ledger and not again.dead_letters and again.duplicates == len(copies)


def test_a_worker_not_holding_the_referrers_partition_applies_the_published_copy_once():
    lines = [line.encode() for line in generate_events(events=3000, customers=120, seed=5, mean_gap_seconds=5000)]
    ruleset = load_ruleset(RULES)
    expected = process_lines(lines, ruleset)
    wanted = [(e.customer_id, e.caused_by) for e in expected.ledger if e.rule_id == "referral.referrer.reversal"]
    applier = StreamApplier(ruleset, partition_for=functools.partial(partition_for, partitions=PARTITIONS))
    applier.accept(routed(lines))
    output = applier.release([], set(), 0.0)  # no local partitions: nothing is applied in place
    assert not any(entry.rule_id == "referral.referrer.reversal" for _, entry, _ in output.ledger)
    copies = [
        InputMessage(m.topic, m.partition, 10_000 + n, m.key, m.value, m.headers) for n, m in enumerate(output.derived)
    ]
    copies += copies  # delivered twice (at-least-once)
    applier.accept(copies)
    late = applier.release([], set(), 0.0)
    # Applied late (after the referrer's later events, so other entries may differ), but each exactly once.
    reversals = [(e.customer_id, e.caused_by) for _, e, _ in late.ledger if e.rule_id == "referral.referrer.reversal"]
    assert sorted(reversals) == sorted(wanted)
    assert late.duplicates == len(copies) // 2


def test_a_derived_event_applied_in_place_is_decided_by_its_cause_rule_set():
    """Its cause's offset is one of another topic's partition: compared with the referrals partition's cut-over
    markers it picked a rule set by chance (here the new one, for a refund the old rules decided)."""
    from schemas.decode import decode_event
    from schemas.topics import PURCHASES, REFERRALS
    from streams.applier import InputMessage, Output, StreamApplier, _Held

    old = load_ruleset()
    new = load_ruleset("streams/rules/rulesets/seasonal-promotion.yaml")
    applier = StreamApplier(old, partition_for=lambda key: 0)
    applier.local_partitions = {0}
    applier.rulesets[new.version] = new
    applier.activate(REFERRALS, 0, 5, new.version)  # a marker at offset 5 of the referrals partition
    refund = decode_event(
        b'{"event_id": "r1", "event_type": "purchase.refunded", "schema_version": 1, "occurred_at": '
        b'"2026-01-02T00:00:00+00:00", "customer_id": "referee", "store_id": "s1", "order_id": "o1", "refund_id": "x"}'
    )
    cause = _Held(InputMessage(PURCHASES, 0, 100, b"referee", b"{}"), refund, "customer", old)  # before its markers
    reversal = decode_event(
        b'{"event_id": "d1", "event_type": "referral.reversed", "schema_version": 1, "occurred_at": '
        b'"2026-01-02T00:00:00+00:00", "customer_id": "referrer", "store_id": "s1", "referee_id": "referee", '
        b'"order_id": "o1", "referral_event_id": "ref1"}'
    )
    applier._derive(reversal, cause, Output(), 0.0)
    ((_, _, held),) = applier.held
    assert held.ruleset is old
