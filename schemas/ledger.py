"""The ledger entry: the immutable record of one change (or one decision) about a customer's points."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from schemas.events import constructed


class Kind(StrEnum):
    """What an entry did. Entries of kind `recorded` and `redemption_rejected` carry 0 points."""

    earned = "earned"
    pending = "pending"
    confirmed = "confirmed"
    redeemed = "redeemed"
    redemption_rejected = "redemption_rejected"
    reversed = "reversed"
    expired = "expired"
    adjusted = "adjusted"
    recorded = "recorded"
    tier_changed = "tier_changed"


class Source(StrEnum):
    purchase = "purchase"
    review = "review"
    referral = "referral"
    registration = "registration"
    blog_comment = "blog_comment"
    social_share = "social_share"
    feedback = "feedback"
    redemption = "redemption"
    adjustment = "adjustment"
    expiry = "expiry"
    clock = "clock"
    tier = "tier"


class LedgerEntry(BaseModel):
    """One ledger event. `entry_id` is deterministic, so a re-delivered input event reproduces it exactly.

    Two buckets per customer: `points` is the signed change of the available balance and
    `pending_points` the signed change of the pending balance; `balance_after` and `pending_after` are
    their running sums over the customer's entries in `sequence` order (1, 2, 3, ...). So `pending`
    entries have points 0 and pending_points > 0; `confirmed` moves n from pending (-n) to available
    (+n); a reversal of pending points has points 0 and pending_points < 0.

    `caused_by` is the input event id and `fingerprint` a hash of that event's content: together they let
    a worker rebuild what it has applied from the ledger alone, and tell a retry from a conflicting reuse.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    entry_id: str
    customer_id: str
    store_id: str
    kind: Kind
    sequence: int
    points: int
    balance_after: int
    pending_points: int = 0
    pending_after: int = 0
    source: Source
    rule_id: str
    ruleset_version: str
    caused_by: str
    event_type: str
    fingerprint: str
    occurred_at: datetime
    order_id: str | None = None
    sku: str | None = None
    category: str | None = None
    quantity: int | None = None
    amount: str | None = None  # the money (decimal string) the entry was computed from, if any
    reference: str | None = None  # what inside the source the entry is about (line key, post id, ...)
    available_at: datetime | None = None  # pending entries: when they become available; confirmed: when they did
    explanation: str = ""
    schema_version: Literal[1] = 1


# The ledger's columns (`points`, `balance_after`, `pending_points`, `pending_after`) are ClickHouse Int64 (at most
# about 9.2 x 10^18). The rules core keeps every entry's points and every running balance, available and pending,
# within +-ledger_points_max, and rejects the event that would go beyond (docs/events.md): the limit is far above
# any real balance and about 9 million times below Int64, so the sums of the projections stay within it too.
ledger_points_max = 10**12

_entry_fields = tuple(LedgerEntry.model_fields)
_entry_fields_given = frozenset(_entry_fields) - {"schema_version"}


def ledger_entry_trusted(values: dict[str, Any]) -> LedgerEntry:
    """The `LedgerEntry(**values)` of values that are already of the field types (the rules core's), unvalidated.

    `values` holds every field but `schema_version`, in declaration order; the entry is equal to the validated
    one, field by field and type by type (tests/rules/test_engine.py checks it over the packaged rule sets).
    """
    values["schema_version"] = 1
    return constructed(LedgerEntry, values, set(_entry_fields_given))
