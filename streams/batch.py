"""The offline batch driver: a JSONL event log through the pure core, with no Kafka and no ClickHouse.

It applies each customer's events in the same order as the stream worker does (event time, then topic
rank, then position in the log), so that both drivers produce the identical ledger for the same input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas import events as ev
from schemas.decode import EventRejected, decode_event
from schemas.ledger import LedgerEntry
from schemas.topics import DERIVED_RANK, EVENT_TYPE_TOPIC, TOPIC_RANK
from streams.rules.engine import Side, apply, customer_of, derived_events
from streams.rules.ruleset import RuleSet
from streams.rules.state import CustomerState


@dataclass
class Rejection:
    line: int
    event_id: str | None
    reason: str


@dataclass
class ProcessResult:
    ledger: list[LedgerEntry] = field(default_factory=list)
    states: dict[str, CustomerState] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: int = 0

    def balances(self) -> dict[str, int]:
        return {customer_id: state.balance for customer_id, state in self.states.items()}

    def to_json(self) -> dict[str, Any]:
        """The `loyalty process --json` document of the CLI output contract."""
        return {
            "ledger": [entry.model_dump(mode="json") for entry in self.ledger],
            "balances": self.balances(),
            "rejected": [
                {"line": rejection.line, "event_id": rejection.event_id, "reason": rejection.reason}
                for rejection in self.rejected
            ],
        }


def order_key(event: ev.Event, position: int) -> tuple:
    """Application order within a customer: event time, then topic rank, then log position (or offset).

    A `referral.reversed` event (derived by the engine, or sent by a store) ranks after every input topic.
    """
    if event.event_type == "referral.reversed":
        return (event.occurred_at, DERIVED_RANK, position)
    return (event.occurred_at, TOPIC_RANK[EVENT_TYPE_TOPIC[event.event_type]], position)


def _event_id_of(raw: bytes) -> str | None:
    """Best-effort event id of a rejected line, for the rejection report."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("event_id"), str):
        return document["event_id"][:128]
    return None


def process_lines(lines: Iterable[bytes | str], ruleset: RuleSet) -> ProcessResult:
    """Decode, order and apply a whole log; bad lines are listed, never raised."""
    result = ProcessResult()
    work: dict[str, list[tuple[tuple, ev.Event, Side, int]]] = {}
    for number, line in enumerate(lines, start=1):
        raw = line.encode() if isinstance(line, str) else line
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            event = decode_event(raw)
        except EventRejected as error:
            result.rejected.append(Rejection(number, _event_id_of(raw), error.reason))
            continue
        work.setdefault(event.customer_id, []).append((order_key(event, number), event, "customer", number))
        if isinstance(event, ev.ReferralCompleted):
            work.setdefault(event.referee_id, []).append((order_key(event, number), event, "referee", number))

    # Derived events (a referral reversed on the referrer's side when the referee's qualifying order is refunded)
    # join their target customer's events in order; a customer that receives some is decided again with them.
    # They depend only on the referee's own events, so a second round derives the same set (checked).
    outcomes = {customer_id: _run_customer(customer_id, items, ruleset) for customer_id, items in work.items()}
    derived = _derived_of(outcomes)
    if derived:
        for target, extra in derived.items():
            items = work.setdefault(target, [])
            items.extend(extra)
            outcomes[target] = _run_customer(target, items, ruleset)
        again = _derived_of(outcomes)
        assert {k: [i[1] for i in v] for k, v in again.items()} == {k: [i[1] for i in v] for k, v in derived.items()}, (
            "derived events changed after their targets were decided again"
        )
    for customer_id, outcome in outcomes.items():
        result.states[customer_id] = outcome.state
        result.ledger.extend(outcome.ledger)
        result.rejected.extend(outcome.rejected)
        result.duplicates += outcome.duplicates
    result.rejected.sort(key=lambda rejection: rejection.line)
    return result


@dataclass
class _Outcome:
    state: CustomerState
    ledger: list[LedgerEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: int = 0
    derived: list[tuple[ev.Event, int]] = field(default_factory=list)  # (derived event, line that caused it)


def _run_customer(customer_id: str, items: list, ruleset: RuleSet) -> _Outcome:
    outcome = _Outcome(CustomerState(customer_id))
    state = outcome.state
    items.sort(key=lambda item: item[0])
    for _, event, side, number in items:
        assert customer_of(event, side) == customer_id
        try:
            entries = apply(state, event, ruleset, side=side)
        except EventRejected as error:
            # A conflict is decided per customer: a referral conflicting on both customers' states is
            # listed once per side, as the stream worker dead-letters each conflicting copy.
            reason = error.reason if side == "customer" else f"referee side: {error.reason}"
            outcome.rejected.append(Rejection(number, event.event_id, reason))
            continue
        if not entries and event.event_id in state.applied:
            outcome.duplicates += 1
        outcome.ledger.extend(entries)
        outcome.derived.extend((derived, number) for derived in derived_events(state, event, entries))
    return outcome


def _derived_of(outcomes: dict[str, _Outcome]) -> dict[str, list[tuple[tuple, ev.Event, Side, int]]]:
    derived: dict[str, list[tuple[tuple, ev.Event, Side, int]]] = {}
    for customer_id in sorted(outcomes):
        for event, number in outcomes[customer_id].derived:
            derived.setdefault(event.customer_id, []).append((order_key(event, number), event, "customer", number))
    for items in derived.values():
        items.sort(key=lambda item: item[0])
    return derived
