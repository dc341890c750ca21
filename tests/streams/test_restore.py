"""Restoring a worker's state from the ledger: partially written events are not folded."""

from __future__ import annotations

import json

from schemas import decode_event
from streams.applier import StreamApplier
from streams.rules.engine import apply
from streams.rules.ruleset import load_ruleset
from streams.rules.state import CustomerState


def purchase(event_id: str, order_id: str, at: str):
    return decode_event(
        json.dumps(
            {
                "event_id": event_id,
                "event_type": "purchase.completed",
                "schema_version": 1,
                "occurred_at": at,
                "customer_id": "c1",
                "store_id": "s1",
                "order_id": order_id,
                "currency": "EUR",
                "lines": [
                    {"sku": "a", "category": "books", "quantity": 1, "unit_price": "150.00"},
                    {"sku": "b", "category": "books", "quantity": 1, "unit_price": "10.00"},
                ],
            }
        )
    )


def test_an_event_whose_entries_were_only_partly_written_is_not_folded():
    ruleset = load_ruleset()
    live = CustomerState("c1")
    first = apply(live, purchase("e1", "o1", "2026-01-01T10:00:00+00:00"), ruleset)
    second = apply(live, purchase("e2", "o2", "2026-01-02T10:00:00+00:00"), ruleset)
    assert len(second) == 3  # two lines and the threshold bonus
    applier = StreamApplier(ruleset)
    # The worker died after writing e2's first entry: the restore must not mark e2 as applied.
    folded = applier.restore(0, [(entry, len(first)) for entry in first] + [(second[0], len(second))])
    assert folded == len(first)
    assert applier.finish_restore(0) == 1
    restored = applier.states[0]["c1"]
    assert "e2" not in restored.applied and restored.sequence == len(first)
    # Decided again, e2 reproduces exactly the same entries (same ids, same sequence numbers).
    assert apply(restored, purchase("e2", "o2", "2026-01-02T10:00:00+00:00"), ruleset) == second


def test_entries_written_twice_are_folded_once():
    ruleset = load_ruleset()
    live = CustomerState("c1")
    entries = apply(live, purchase("e1", "o1", "2026-01-01T10:00:00+00:00"), ruleset)
    applier = StreamApplier(ruleset)
    twice = [(entry, len(entries)) for entry in entries] * 2
    assert applier.restore(0, twice) == len(entries)
    assert applier.states[0]["c1"] == live
