"""Refunds that arrive before their order (another system's clock) are held and applied by the purchase in every
driver alike: the stream applier and replay give the batch driver's ledger and balances."""

from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta

from test_derived_events import PARTITIONS, RULES, drain, routed

from projections.archive import ArchivedMessage
from schemas.topics import REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK
from streams.applier import StreamApplier
from streams.batch import process_lines
from streams.replay import replay_messages
from streams.routing import partition_for, routes_for
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events


def _with_early_refunds(lines: list[str]) -> tuple[list[bytes], int]:
    """Every third refund dated an hour before its order was placed (and listed first)."""
    placed = {}
    for line in lines:
        document = json.loads(line)
        if document["event_type"] == "purchase.completed":
            placed[(document["customer_id"], document["order_id"])] = document["occurred_at"]
    early, result, count = [], [], 0
    for line in lines:
        document = json.loads(line)
        key = (document["customer_id"], document.get("order_id"))
        if document["event_type"] == "purchase.refunded" and key in placed:
            count += 1
            if count % 3 == 0:
                moment = datetime.fromisoformat(placed[key]) - timedelta(hours=1)
                document["occurred_at"] = moment.isoformat()
                early.append(json.dumps(document).encode())
                continue
        result.append(line.encode())
    return early + result, len(early)


def _archived(lines: list[bytes]) -> list[ArchivedMessage]:
    messages = []
    for raw in lines:
        document = json.loads(raw)
        moment = datetime.fromisoformat(document["occurred_at"])
        for route in routes_for(raw):
            side = 1 if (SIDE_HEADER, REFEREE_SIDE) in route.headers else 0
            messages.append(
                ArchivedMessage(
                    route.topic, 0, len(messages), route.key.decode(), raw, side, TOPIC_RANK[route.topic],
                    document["event_id"], moment,
                )
            )  # fmt: skip
    messages.sort(key=lambda m: (m.routing_key, m.occurred_at, m.topic_rank, m.offset))
    return messages


def test_early_refunds_are_held_and_every_driver_gives_the_batch_drivers_result():
    generated = list(generate_events(events=3000, customers=120, seed=5, mean_gap_seconds=5000))
    lines, early = _with_early_refunds(generated)
    assert early >= 10
    ruleset = load_ruleset(RULES)
    expected = process_lines(lines, ruleset)
    held = [entry for entry in expected.ledger if (entry.reference or "").startswith("held:")]
    applied = [e for e in expected.ledger if e.event_type == "purchase.completed" and e.kind.value == "reversed"]
    assert len(held) >= 10 and len(applied) >= 10, (len(held), len(applied))

    applier = StreamApplier(ruleset, partition_for=functools.partial(partition_for, partitions=PARTITIONS))
    _, output = drain(applier, routed(lines))
    streamed = {entry.entry_id: entry for _, entry, _ in output.ledger}
    assert streamed == {entry.entry_id: entry for entry in expected.ledger}

    messages = _archived(lines)
    replayed = replay_messages(messages, ruleset, refetch=lambda keys: [m for m in messages if m.routing_key in keys])
    assert replayed.balances == {customer: state.balance for customer, state in expected.states.items()}
