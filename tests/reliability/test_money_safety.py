"""Money safety of the pure core: interleaved redemptions, refunds and adjustments never make points.

The documented debt policy (docs/rules.md): a redemption needs the available balance to cover it, and an
adjustment that would take the balance below zero is refused unless it has `allow_negative: true`.
Reversals (refunds, cancellations) are not limited by the balance, so only they and `allow_negative`
adjustments can leave a customer in debt.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decode import decode_event
from schemas.ledger import Kind, LedgerEntry
from streams.batch import process_lines
from streams.rules.engine import apply
from streams.rules.ruleset import default_ruleset_path, parse_ruleset
from streams.rules.state import CustomerState

DEFAULT = yaml.safe_load(Path(default_ruleset_path()).read_text())
RULESETS = {
    "default": parse_ruleset(yaml.safe_dump(DEFAULT)),
    "pending-and-lot-expiry": parse_ruleset(
        yaml.safe_dump(
            {
                **DEFAULT,
                "version": "money-safety-2",
                "purchase": {**DEFAULT["purchase"], "pending_days": 1},
                "expiry": {"mode": "lot", "days": 2},
            }
        )
    ),
}
START = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
CUSTOMER = "c1"
MONEY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def one_customers_log(draw: st.DrawFn) -> list[dict]:
    """Purchases, redemptions, refunds, cancellations and adjustments of one customer, many at the same instant.

    The log order is arbitrary (concurrent requests); only a few distinct times exist so that ties, where
    topic rank and log position decide, are common.
    """
    documents: list[dict] = []
    orders: list[tuple[str, list[str]]] = []
    for index in range(draw(st.integers(1, 40))):
        moment = START + timedelta(hours=draw(st.sampled_from((0, 0, 1, 20, 30, 60))))
        document = {
            "event_id": f"e{index}",
            "schema_version": 1,
            "occurred_at": moment.isoformat(),
            "customer_id": CUSTOMER,
            "store_id": "s1",
        }
        kind = draw(st.sampled_from(("purchase", "redeem", "redeem", "refund", "cancel", "adjust")))
        if kind == "purchase" or (kind in ("refund", "cancel") and not orders):
            skus = draw(st.lists(st.sampled_from(("a", "b", "c")), min_size=1, max_size=3, unique=True))
            document.update(
                event_type="purchase.completed",
                order_id=f"o{index}",
                currency="EUR",
                lines=[
                    {
                        "sku": sku,
                        "category": "books",
                        "quantity": draw(st.integers(1, 3)),
                        "unit_price": draw(st.sampled_from(("5", "49.99", "130"))),
                    }
                    for sku in skus
                ],
            )
            orders.append((f"o{index}", skus))
        elif kind == "redeem":
            document.update(
                event_type="points.redeem_requested",
                redemption_id=draw(st.sampled_from((f"rd{index}", "rd-shared"))),  # a retried request id too
                points=draw(st.sampled_from((50, 60, 100, 150, 400, 1000))),
            )
        elif kind == "refund":
            order_id, skus = draw(st.sampled_from(orders))
            document.update(event_type="purchase.refunded", order_id=order_id, refund_id=f"rf{index}")
            if draw(st.booleans()):
                chosen = draw(st.lists(st.sampled_from(skus), min_size=1, max_size=len(skus), unique=True))
                document["lines"] = [{"sku": sku, "quantity": draw(st.integers(1, 3))} for sku in chosen]
        elif kind == "cancel":
            document.update(event_type="purchase.cancelled", order_id=draw(st.sampled_from(orders))[0])
        else:
            document.update(
                event_type="points.adjusted",
                adjustment_id=f"ad{index}",
                points=draw(st.integers(-500, 500)),
                note="support",
                actor="ops",
                allow_negative=draw(st.booleans()),
            )
        documents.append(document)
    return documents


def assert_money_safe(entries: list[LedgerEntry], documents: dict[str, dict]) -> None:
    balance = 0
    credited = 0
    redeemed = 0
    for entry in entries:
        before = balance
        balance += entry.points
        assert entry.balance_after == balance, "balance_after is the running sum of points"
        event = documents[entry.caused_by]
        if entry.points > 0:
            assert entry.kind in (Kind.earned, Kind.confirmed, Kind.adjusted), entry
            credited += entry.points
        if entry.kind is Kind.redeemed:
            # A redemption needs an available balance that covers it: never debt, never a negative start.
            assert before >= -entry.points and balance >= 0, entry
            redeemed += -entry.points
        if entry.kind is Kind.adjusted and entry.points < 0 and not event.get("allow_negative"):
            assert balance >= 0, entry
        if entry.kind is Kind.reversed:
            assert entry.points <= 0, "a reversal never gives points back"
        if entry.kind is Kind.expired:
            assert entry.points <= 0 and balance >= 0, "expiry takes at most what is available"
        if balance < 0 and entry.points < 0:
            # Only reversals and allow_negative adjustments may create or deepen debt.
            assert entry.kind is Kind.reversed or (entry.kind is Kind.adjusted and event.get("allow_negative")), entry
        assert redeemed <= credited, "more points redeemed than were ever credited"


@MONEY
@given(log=one_customers_log(), ruleset_name=st.sampled_from(sorted(RULESETS)))
def test_interleaved_redemptions_refunds_and_adjustments_never_go_below_the_debt_policy(log, ruleset_name):
    ruleset = RULESETS[ruleset_name]
    by_id = {document["event_id"]: document for document in log}

    # The batch driver: event-time order, ties by topic rank and log position.
    result = process_lines([json.dumps(document) for document in log], ruleset)
    assert result.rejected == []
    assert_money_safe(result.ledger, by_id)
    assert result.balances().get(CUSTOMER, 0) == sum(entry.points for entry in result.ledger)

    # The pure core in arrival order (events applied as they come, e.g. late ones after the reorder wait).
    state = CustomerState(CUSTOMER)
    entries: list[LedgerEntry] = []
    for document in log:
        entries.extend(apply(state, decode_event(json.dumps(document)), ruleset))
    assert_money_safe(entries, by_id)
    assert state.balance == sum(entry.points for entry in entries)


def test_a_refund_after_a_redemption_is_the_only_way_into_debt_and_blocks_further_redemptions():
    ruleset = RULESETS["default"]
    log = [
        {"event_type": "purchase.completed", "order_id": "o1", "currency": "EUR"}
        | {"lines": [{"sku": "a", "category": "books", "quantity": 1, "unit_price": "100"}]},
        {"event_type": "points.redeem_requested", "redemption_id": "r1", "points": 220},
        {"event_type": "purchase.refunded", "order_id": "o1", "refund_id": "f1"},
        {"event_type": "points.redeem_requested", "redemption_id": "r2", "points": 50},
        {"event_type": "points.adjusted", "adjustment_id": "a1", "points": -10, "note": "n", "actor": "ops"},
    ]
    lines = [
        json.dumps(
            document
            | {
                "event_id": f"e{index}",
                "schema_version": 1,
                "occurred_at": (START + timedelta(minutes=index)).isoformat(),
                "customer_id": CUSTOMER,
                "store_id": "s1",
            }
        )
        for index, document in enumerate(log)
    ]
    result = process_lines(lines, ruleset)
    summary = [(entry.kind.value, entry.points, entry.balance_after) for entry in result.ledger]
    assert summary == [
        ("earned", 100, 100),  # 100.00 at 1 point per unit
        ("earned", 100, 200),  # first order bonus
        ("earned", 20, 220),  # threshold bonus at 100
        ("redeemed", -220, 0),
        ("reversed", -100, -100),
        ("reversed", -100, -200),
        ("reversed", -20, -220),
        ("redemption_rejected", 0, -220),
        ("recorded", 0, -220),  # the negative adjustment is refused while in debt
    ]
