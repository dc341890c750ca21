"""Replay derives referral reversals again under the replayed rules, instead of reading the live run's copies."""

from __future__ import annotations

import dataclasses
import functools
from datetime import UTC

from test_derived_events import PARTITIONS, RULES, drain, routed

from projections import LedgerSink
from projections.archive import ArchivedMessage, RawArchive
from schemas.decode import decode_event
from schemas.topics import CONTROL_HEADER, DERIVED_SIDE, REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK
from streams.applier import StreamApplier
from streams.batch import process_lines
from streams.replay import replay_messages
from streams.routing import partition_for
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.simulate import generate_events


def archived(messages) -> list[ArchivedMessage]:
    """Messages as the raw archive returns them: sorted by routing key, then event time, rank and offset."""
    result = []
    for message in messages:
        headers = message.headers
        side = 2 if any(name == CONTROL_HEADER for name, _ in headers) else 0
        side = 3 if (SIDE_HEADER, DERIVED_SIDE) in headers else 1 if (SIDE_HEADER, REFEREE_SIDE) in headers else side
        event = decode_event(message.value, message.topic)
        result.append(
            ArchivedMessage(
                message.topic,
                message.partition,
                message.offset,
                message.key.decode(),
                message.value,
                side,
                TOPIC_RANK[message.topic],
                event.event_id,
                event.occurred_at.astimezone(UTC),
            )
        )
    result.sort(key=lambda m: (m.routing_key, m.occurred_at, m.topic_rank, m.offset))
    return result


def live_archive(lines, ruleset) -> list[ArchivedMessage]:
    """What the archive holds after a live run: the input messages plus the derived events the worker published."""
    applier = StreamApplier(ruleset, partition_for=functools.partial(partition_for, partitions=PARTITIONS))
    messages = routed(lines)
    _, output = drain(applier, messages)
    assert output.derived
    published = [
        type(m)(m.topic, m.partition, 1_000_000 + n, m.key, m.value, m.headers) for n, m in enumerate(output.derived)
    ]
    return archived(messages + published)


def store_live_run(client, lines, ruleset, *, gapless: bool = False):
    """Write into a migrated ClickHouse what a live run of `lines` under `ruleset` leaves there: the raw archive (with
    the derived events) and the ledger; returns the batch driver's result. `gapless`: offsets from 0 in each
    partition (`live_archive` numbers derived events from 1,000,000, which the archive counts as a gap)."""
    messages = live_archive(lines, ruleset)
    if gapless:
        next_offset: dict[tuple[str, int], int] = {}
        for index, message in enumerate(messages):
            offset = next_offset.get((message.topic, message.partition), 0)
            next_offset[(message.topic, message.partition)] = offset + 1
            messages[index] = dataclasses.replace(message, offset=offset)
    RawArchive(client).write(messages, {})
    result = process_lines(lines, ruleset)
    LedgerSink(client).write(result.ledger)
    return result


def test_replay_under_other_referral_windows_equals_the_batch_driver():
    # Disputed referrals add withdrawals (no order, already referred), derived under every window.
    generated = generate_events(events=2000, customers=100, seed=5, mean_gap_seconds=5000, disputed_referral_share=0.3)
    lines = [line.encode() for line in generated]
    live_rules = load_ruleset(RULES)
    archive = live_archive(lines, live_rules)
    refetch_calls = []

    def refetch(keys):
        refetch_calls.append(set(keys))
        return [message for message in archive if message.routing_key in keys]

    text = open(RULES).read()
    for name, rules in {
        "same rules": live_rules,
        "no referral window": parse_ruleset(
            text.replace("referee_points: 100", "referee_points: 100\n  return_window_days: 0")
        ),
        "one-day window": parse_ruleset(
            text.replace("referee_points: 100", "referee_points: 100\n  return_window_days: 1")
        ),
    }.items():
        expected = process_lines(lines, rules)
        assert any(entry.rule_id == "referral.referrer.withdrawn" for entry in expected.ledger), name
        shadow = replay_messages(archive, rules, refetch=refetch)
        assert shadow.balances == {c: b for c, b in expected.balances().items()}, name
        assert shadow.entries == len(expected.ledger), name
        by_rule: dict[str, int] = {}
        for entry in expected.ledger:
            by_rule[entry.rule_id] = by_rule.get(entry.rule_id, 0) + entry.points
        assert {k: v for k, v in shadow.points_by_rule.items() if v or k in by_rule} == by_rule, name
    assert refetch_calls and all(refetch_calls)
