"""Referral guard: a referral whose qualifying order is refunded inside the return window is reversed for both.

The referee's side is decided on the referee's partition (where the refund is); the referrer's side by a
derived `referral.reversed` event on the referrer's partition. These tests run the batch driver, which
derives and applies those events exactly as the stream worker does.
"""

from __future__ import annotations

import json

import pytest

from schemas.ledger import Kind
from streams.batch import process_lines
from streams.rules.engine import derived_event_id
from streams.rules.ruleset import parse_ruleset

RULES = """
version: ref-1
purchase: {points_per_unit: '1', pending_days: 14}
referral: {referrer_points: 200, referee_points: 100}
"""


def line(number: int, at: str, event_type: str, customer: str, **fields) -> str:
    document = {
        "event_id": f"e{number}",
        "schema_version": 1,
        "occurred_at": at,
        "customer_id": customer,
        "store_id": "s1",
        "event_type": event_type,
        **fields,
    }
    return json.dumps(document)


def bob_order(number: int = 1, at: str = "2026-05-02T10:00:00+00:00", quantity: int = 2) -> str:
    items = [{"sku": "x", "category": "books", "quantity": quantity, "unit_price": "30.00"}]
    return line(number, at, "purchase.completed", "bob", order_id="b1", currency="EUR", lines=items)


def referral(number: int, at: str, referral_id: str = "r1") -> str:
    return line(number, at, "referral.completed", "alice", referral_id=referral_id, referee_id="bob", order_id="b1")


def refund(number: int, at: str, quantity: int | None = None) -> str:
    lines = None if quantity is None else [{"sku": "x", "quantity": quantity}]
    fields = {"order_id": "b1", "refund_id": f"rf{number}"}
    if lines is not None:
        fields["lines"] = lines
    return line(number, at, "purchase.refunded", "bob", **fields)


def referral_entries(result, customer: str) -> list[tuple]:
    return [
        (entry.rule_id, entry.kind, entry.points, entry.balance_after)
        for entry in result.ledger
        if entry.customer_id == customer and entry.source.value == "referral"
    ]


def test_a_full_refund_inside_the_window_reverses_both_sides():
    result = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-10T11:00:00+00:00")],
        parse_ruleset(RULES),
    )
    assert referral_entries(result, "bob") == [
        ("referral.referee", Kind.earned, 100, 100),
        ("referral.referee.reversal", Kind.reversed, -100, 0),
    ]
    assert referral_entries(result, "alice") == [
        ("referral.referrer", Kind.earned, 200, 200),
        ("referral.referrer.reversal", Kind.reversed, -200, 0),
    ]
    reversal = next(entry for entry in result.ledger if entry.rule_id == "referral.referrer.reversal")
    assert reversal.caused_by == derived_event_id("e2") == "e2:reversed"
    assert reversal.occurred_at.isoformat() == "2026-05-10T11:00:00+00:00"  # the refund's time
    assert result.balances() == {"alice": 0, "bob": 0}


def test_partial_refunds_reverse_the_referral_only_when_the_whole_order_is_refunded():
    first_half = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-05T00:00:00+00:00", 1)],
        parse_ruleset(RULES),
    )
    assert [rule for rule, *_ in referral_entries(first_half, "bob")] == ["referral.referee"]
    assert [rule for rule, *_ in referral_entries(first_half, "alice")] == ["referral.referrer"]
    both_halves = process_lines(
        [
            bob_order(),
            referral(2, "2026-05-02T11:00:00+00:00"),
            refund(3, "2026-05-05T00:00:00+00:00", 1),
            refund(4, "2026-05-06T00:00:00+00:00", 1),
        ],
        parse_ruleset(RULES),
    )
    assert referral_entries(both_halves, "alice")[-1] == ("referral.referrer.reversal", Kind.reversed, -200, 0)
    assert referral_entries(both_halves, "bob")[-1] == ("referral.referee.reversal", Kind.reversed, -100, 0)


def test_a_refund_after_the_window_keeps_the_referral():
    result = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-16T10:00:01+00:00")],
        parse_ruleset(RULES),
    )
    assert [rule for rule, *_ in referral_entries(result, "bob")] == ["referral.referee"]
    assert [rule for rule, *_ in referral_entries(result, "alice")] == ["referral.referrer"]


def test_a_cancellation_inside_the_window_reverses_both_sides():
    cancel = line(3, "2026-05-03T00:00:00+00:00", "purchase.cancelled", "bob", order_id="b1")
    result = process_lines([bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), cancel], parse_ruleset(RULES))
    assert referral_entries(result, "bob")[-1][:3] == ("referral.referee.reversal", Kind.reversed, -100)
    assert referral_entries(result, "alice")[-1][:3] == ("referral.referrer.reversal", Kind.reversed, -200)


def test_a_referral_arriving_after_its_order_was_refunded_earns_nothing_for_either_side():
    result = process_lines(
        [bob_order(), refund(2, "2026-05-03T00:00:00+00:00"), referral(3, "2026-05-04T00:00:00+00:00")],
        parse_ruleset(RULES),
    )
    assert referral_entries(result, "bob") == [("referral.referee.order_refunded", Kind.recorded, 0, 0)]
    # The referrer's copy is applied first (it is rewarded), then the derived reversal takes it back.
    assert referral_entries(result, "alice") == [
        ("referral.referrer", Kind.earned, 200, 200),
        ("referral.referrer.reversal", Kind.reversed, -200, 0),
    ]


def test_a_reversed_referee_never_earns_the_referrer_again():
    result = process_lines(
        [
            bob_order(),
            referral(2, "2026-05-02T11:00:00+00:00"),
            refund(3, "2026-05-03T00:00:00+00:00"),
            referral(4, "2026-05-04T00:00:00+00:00", referral_id="r2"),
        ],
        parse_ruleset(RULES),
    )
    assert [rule for rule, *_ in referral_entries(result, "alice")] == [
        "referral.referrer",
        "referral.referrer.reversal",
        "referral.referrer.reversed",
    ]
    assert result.balances()["alice"] == 0


def test_the_reversal_is_a_debt_when_the_referrer_already_spent_the_points():
    spend = line(3, "2026-05-03T00:00:00+00:00", "points.redeem_requested", "alice", redemption_id="x", points=200)
    result = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), spend, refund(4, "2026-05-04T00:00:00+00:00")],
        parse_ruleset(RULES + "redemption: {minimum_points: 1}\n"),
    )
    assert referral_entries(result, "alice")[-1] == ("referral.referrer.reversal", Kind.reversed, -200, -200)
    assert result.balances()["alice"] == -200


@pytest.mark.parametrize("window", ["0", "null"])
def test_without_a_return_window_a_refund_keeps_the_referral(window):
    rules = RULES.replace("pending_days: 14", "pending_days: 0")
    rules = rules.replace("referee_points: 100}", f"referee_points: 100, return_window_days: {window}}}")
    result = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-03T00:00:00+00:00")],
        parse_ruleset(rules),
    )
    assert [rule for rule, *_ in referral_entries(result, "alice")] == ["referral.referrer"]


def test_an_explicit_referral_window_overrides_the_purchase_return_window():
    rules = RULES.replace("referee_points: 100}", "referee_points: 100, return_window_days: 3}")
    inside = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-05T09:00:00+00:00")],
        parse_ruleset(rules),
    )
    outside = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-05T11:00:00+00:00")],
        parse_ruleset(rules),
    )
    assert referral_entries(inside, "alice")[-1][0] == "referral.referrer.reversal"
    assert referral_entries(outside, "alice")[-1][0] == "referral.referrer"


def test_the_derived_event_is_applied_in_event_time_order_among_the_referrers_events():
    later_spend = line(
        4, "2026-05-11T00:00:00+00:00", "points.redeem_requested", "alice", redemption_id="y", points=150
    )
    result = process_lines(
        [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-10T00:00:00+00:00"), later_spend],
        parse_ruleset(RULES + "redemption: {minimum_points: 1}\n"),
    )
    alice = [(entry.rule_id, entry.points) for entry in result.ledger if entry.customer_id == "alice"]
    # The reversal (at the refund's time) comes before the later request, which the balance no longer covers.
    assert alice[:2] == [("referral.referrer", 200), ("referral.referrer.reversal", -200)]
    assert alice[2][0].startswith("redemption") and alice[2][1] == 0


def test_replaying_the_same_log_twice_gives_the_same_ledger():
    lines = [bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), refund(3, "2026-05-10T11:00:00+00:00")]
    first = process_lines(lines, parse_ruleset(RULES))
    second = process_lines(lines + lines, parse_ruleset(RULES))
    assert [entry.entry_id for entry in first.ledger] == [entry.entry_id for entry in second.ledger]
    assert second.duplicates == 4  # the repeated order and refund, and both copies of the repeated referral


def test_a_referral_before_the_referees_order_is_withdrawn_for_the_referrer_and_a_later_one_pays_both():
    result = process_lines(
        [
            referral(1, "2026-05-01T09:00:00+00:00"),  # bob has no order b1 yet
            bob_order(2, "2026-05-02T10:00:00+00:00"),
            referral(3, "2026-05-02T11:00:00+00:00", referral_id="r2"),
        ],
        parse_ruleset(RULES),
    )
    assert referral_entries(result, "alice") == [
        ("referral.referrer", Kind.earned, 200, 200),
        ("referral.referrer.withdrawn", Kind.reversed, -200, 0),
        ("referral.referrer", Kind.earned, 200, 200),
    ]
    assert referral_entries(result, "bob") == [
        ("referral.referee.no_order", Kind.recorded, 0, 0),
        ("referral.referee", Kind.earned, 100, 100),
    ]


def test_one_reward_per_referee_the_second_referrer_is_withdrawn():
    carol = line(3, "2026-05-03T00:00:00+00:00", "referral.completed", "carol", referral_id="r9", referee_id="bob")
    carol = carol.replace('"referee_id": "bob"', '"referee_id": "bob", "order_id": "b1"')
    result = process_lines([bob_order(), referral(2, "2026-05-02T11:00:00+00:00"), carol], parse_ruleset(RULES))
    assert [rule for rule, *_ in referral_entries(result, "alice")] == ["referral.referrer"]
    assert referral_entries(result, "carol") == [
        ("referral.referrer", Kind.earned, 200, 200),
        ("referral.referrer.withdrawn", Kind.reversed, -200, 0),
    ]
    assert result.balances()["bob"] == 100  # the referee is rewarded once (its 60 purchase points are pending)
