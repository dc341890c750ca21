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
from schemas.topics import EVENT_TYPE_TOPIC, TOPIC_RANK
from streams.rules.engine import Side, apply, customer_of
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
    """Application order within a customer: event time, then topic rank, then log position (or offset)."""
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

    for customer_id, items in work.items():
        state = result.states.setdefault(customer_id, CustomerState(customer_id))
        items.sort(key=lambda item: item[0])
        for _, event, side, number in items:
            assert customer_of(event, side) == customer_id
            try:
                entries = apply(state, event, ruleset, side=side)
            except EventRejected as error:
                # A conflict is decided per customer: a referral conflicting on both customers' states is
                # listed once per side, as the stream worker dead-letters each conflicting copy.
                reason = error.reason if side == "customer" else f"referee side: {error.reason}"
                result.rejected.append(Rejection(number, event.event_id, reason))
                continue
            if not entries and event.event_id in state.applied:
                result.duplicates += 1
            result.ledger.extend(entries)
    result.rejected.sort(key=lambda rejection: rejection.line)
    return result
