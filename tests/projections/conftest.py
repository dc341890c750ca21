"""Fixtures for the projection tests: a migrated chDB directory per test, and a ledger builder."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from projections import connect, migrate
from schemas.ledger import Kind, LedgerEntry, Source


@pytest.fixture
def chdb_dsn(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'clickhouse'}"


@pytest.fixture
def client(chdb_dsn: str) -> Iterator[Client]:
    # One process can host one chDB directory at a time: every client must be closed before the next
    # test opens its own directory (clients on the same directory may coexist).
    opened = connect(chdb_dsn)
    migrate(opened)
    yield opened
    opened.close()


class LedgerBuilder:
    """Builds ledger entries with consistent sequences and running balances, one customer at a time."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self._state: dict[str, tuple[int, int, int]] = {}  # customer -> (sequence, balance, pending)

    def add(
        self,
        customer_id: str,
        kind: Kind | str,
        occurred_at: str,
        points: int = 0,
        *,
        pending_points: int = 0,
        source: Source | str = Source.purchase,
        rule_id: str = "rule",
        store_id: str = "store-1",
        sku: str | None = None,
        category: str | None = None,
        **details: object,
    ) -> LedgerEntry:
        sequence, balance, pending = self._state.get(customer_id, (0, 0, 0))
        sequence, balance, pending = sequence + 1, balance + points, pending + pending_points
        self._state[customer_id] = (sequence, balance, pending)
        entry = LedgerEntry(
            entry_id=f"{customer_id}-{sequence}",
            customer_id=customer_id,
            store_id=store_id,
            kind=Kind(kind),
            sequence=sequence,
            points=points,
            balance_after=balance,
            pending_points=pending_points,
            pending_after=pending,
            source=Source(source),
            rule_id=rule_id,
            ruleset_version="2024.1",
            caused_by=f"event-{customer_id}-{sequence}",
            event_type="test.event",
            fingerprint=f"fp-{customer_id}-{sequence}",
            occurred_at=datetime.fromisoformat(occurred_at),
            sku=sku,
            category=category,
            **details,
        )
        self.entries.append(entry)
        return entry


@pytest.fixture
def ledger() -> LedgerBuilder:
    return LedgerBuilder()


@pytest.fixture
def scenario(ledger: LedgerBuilder) -> list[LedgerEntry]:
    """Three customers over December 2023 to February 2024; the expected figures in the tests follow."""
    add = ledger.add
    # alice, store-1: balances 100, 150, 150, 190, 130, 110, 115; pending 0, 0, 40, 0, ...
    add("alice", "earned", "2024-01-01T10:00:00+00:00", 100, rule_id="purchase-base", sku="SKU-1", category="shoes")
    add("alice", "earned", "2024-01-02T10:00:00+00:00", 50, source="review", rule_id="review", sku="SKU-1")
    add("alice", "pending", "2024-01-03T10:00:00+00:00", pending_points=40, rule_id="purchase-pending")
    add(
        "alice", "confirmed", "2024-01-10T10:00:00+00:00", 40,
        pending_points=-40, rule_id="purchase-pending", sku="SKU-1", category="shoes",
    )  # fmt: skip
    add("alice", "redeemed", "2024-01-15T10:00:00+00:00", -60, source="redemption", rule_id="redeem")
    add("alice", "expired", "2024-02-01T10:00:00+00:00", -20, source="expiry", rule_id="expiry")
    add("alice", "adjusted", "2024-02-03T10:00:00+00:00", 5, source="adjustment", rule_id="admin")
    # bob, store-2: balances 30, 230, 80, -120, -120, -130 (a refund after a redemption leaves a debt)
    add("bob", "earned", "2023-12-31T23:30:00+00:00", 30, source="registration", rule_id="signup", store_id="store-2")
    add(
        "bob", "earned", "2024-01-05T10:00:00+00:00", 200,
        rule_id="purchase-base", store_id="store-2", sku="SKU-2", category="bags",
    )  # fmt: skip
    add("bob", "redeemed", "2024-01-06T10:00:00+00:00", -150, source="redemption", rule_id="redeem", store_id="store-2")
    add("bob", "reversed", "2024-01-08T10:00:00+00:00", -200, rule_id="purchase-base", store_id="store-2")
    add(
        "bob",
        "redemption_rejected",
        "2024-01-09T10:00:00+00:00",
        source="redemption",
        rule_id="redeem",
        store_id="store-2",
    )
    add("bob", "adjusted", "2024-01-20T10:00:00+00:00", -10, source="adjustment", rule_id="admin", store_id="store-2")
    # carol, store-1: 300, 310; the second entry is 1 February in +02:00 but 31 January in UTC
    add("carol", "earned", "2024-01-07T10:00:00+00:00", 300, source="referral", rule_id="referral")
    add("carol", "earned", "2024-02-01T01:00:00+02:00", 10, source="social_share", rule_id="share")
    return ledger.entries
