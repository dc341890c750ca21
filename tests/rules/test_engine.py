"""The pure rules core, one behaviour per test, with exact values."""

from __future__ import annotations

import json

import pytest
from documents import event_document

from schemas import decode_event
from schemas.decode import EventRejected
from schemas.ledger import Kind
from streams.rules.engine import apply, entry_id_for
from streams.rules.ruleset import parse_ruleset
from streams.rules.state import CustomerState, evolve

BASE = """
version: test-1
rounding: floor
purchase:
  points_per_unit: "1"
"""


def rules(extra: str = "", base: str = BASE):
    return parse_ruleset(base + extra)


def event(event_type: str, event_id: str, at: str = "2026-03-01T10:00:00+00:00", customer: str = "c1", **fields):
    return decode_event(json.dumps(event_document(event_id, event_type, customer, at, **fields)))


def purchase(
    event_id: str, lines, at: str = "2026-03-01T10:00:00+00:00", order_id: str | None = None, customer="c1", **fields
):
    return event(
        "purchase.completed",
        event_id,
        at,
        customer,
        order_id=order_id or f"o-{event_id}",
        currency="EUR",
        lines=[
            {"sku": sku, "category": category, "quantity": quantity, "unit_price": price}
            for sku, category, quantity, price in lines
        ],
        **fields,
    )


def run(ruleset, *events, customer: str = "c1", side: str = "customer"):
    state = CustomerState(customer)
    ledger = []
    for item in events:
        ledger.extend(apply(state, item, ruleset, side=side))
    return state, ledger


def test_points_per_currency_unit_are_floored_once_per_line():
    state, ledger = run(rules(), purchase("e1", [("a", "books", 3, "9.99"), ("b", "toys", 1, "0.50")]))
    assert [(entry.rule_id, entry.points, entry.balance_after) for entry in ledger] == [
        ("purchase.rate", 29, 29),  # 3 x 9.99 = 29.97 -> 29
        ("purchase.rate", 0, 29),  # 0.50 -> 0
    ]
    assert [entry.kind for entry in ledger] == [Kind.earned, Kind.recorded]
    assert state.balance == 29


@pytest.mark.parametrize(("rounding", "expected"), [("floor", 29), ("nearest", 30), ("ceil", 30)])
def test_rounding_policy(rounding, expected):
    ruleset = rules(f"rounding: {rounding}\n", base="version: t\n")
    _, ledger = run(ruleset, purchase("e1", [("a", "books", 3, "9.99")]))
    assert ledger[0].points == expected


def test_discount_is_spread_over_lines_and_paid_with_points_never_earns():
    _, ledger = run(
        rules(),
        purchase(
            "e1",
            [("a", "books", 1, "60.00"), ("b", "toys", 1, "40.00")],
            discount_total="10.00",
            paid_with_points="20.00",
        ),
    )
    # earning total = 100 - 10 - 20 = 70, split 60:40 -> 42 and 28
    assert [entry.points for entry in ledger] == [42, 28]


def test_basis_with_tax_and_shipping():
    ruleset = rules("  basis: {after_discounts: false, include_tax: true, include_shipping: true}\n")
    _, ledger = run(
        ruleset,
        purchase("e1", [("a", "books", 1, "50.00")], discount_total="5.00", tax_total="10.00", shipping_total="4.99"),
    )
    assert ledger[0].points == 64  # 50 + 10 + 4.99 = 64.99 -> 64


def test_first_order_bonus_only_on_the_first_qualifying_order():
    ruleset = rules('  first_order_bonus: 100\n  minimum_order_total: "20"\n')
    state, ledger = run(
        ruleset,
        purchase("e1", [("a", "books", 1, "10.00")]),  # below the minimum: does not qualify
        purchase("e2", [("a", "books", 1, "30.00")], at="2026-03-02T10:00:00+00:00"),
        purchase("e3", [("a", "books", 1, "30.00")], at="2026-03-03T10:00:00+00:00"),
    )
    bonuses = [entry.caused_by for entry in ledger if entry.rule_id == "purchase.first_order_bonus"]
    assert bonuses == ["e2"]
    assert ledger[0].rule_id == "purchase.not_qualifying" and ledger[0].points == 0
    assert state.balance == 30 + 100 + 30


def test_highest_spend_threshold_once_per_order():
    ruleset = rules('  spend_thresholds: [{minimum_total: "100", bonus: 10}, {minimum_total: "200", bonus: 50}]\n')
    _, ledger = run(ruleset, purchase("e1", [("a", "books", 1, "250.00")]))
    assert [(entry.rule_id, entry.points) for entry in ledger] == [
        ("purchase.rate", 250),
        ("purchase.threshold_bonus", 50),
    ]


def test_category_rate_multiplier_and_product_precedence():
    ruleset = rules(
        "  categories:\n"
        '    books: {rate: "2"}\n'
        '    electronics: {multiplier: "3"}\n'
        "    gifts: {excluded: true}\n"
        "  products:\n"
        "    special: {fixed_points: 7}\n"
        "    banned: {excluded: true}\n"
    )
    _, ledger = run(
        ruleset,
        purchase(
            "e1",
            [
                ("b", "books", 1, "10.00"),
                ("e", "electronics", 1, "10.00"),
                ("g", "gifts", 1, "10.00"),
                ("special", "electronics", 2, "10.00"),
                ("banned", "books", 1, "10.00"),
            ],
        ),
    )
    assert [(entry.rule_id, entry.points) for entry in ledger] == [
        ("purchase.category:books", 20),
        ("purchase.category:electronics", 30),
        ("purchase.category:gifts", 0),
        ("purchase.product:special", 14),  # product fixed points win over the category multiplier
        ("purchase.product:banned", 0),
    ]


def test_maximum_points_per_order():
    ruleset = rules("  maximum_points_per_order: 50\n")
    _, ledger = run(ruleset, purchase("e1", [("a", "books", 1, "40.00"), ("b", "books", 1, "40.00")]))
    assert [entry.points for entry in ledger] == [40, 10]


def test_promotion_multiplier_applies_only_inside_its_window_by_event_time():
    ruleset = rules(
        "promotions:\n"
        "  - {id: bf, starts_at: '2026-11-27T00:00:00-05:00', ends_at: '2026-11-28T00:00:00-05:00', multiplier: '3'}\n"
    )
    _, ledger = run(
        ruleset,
        purchase("before", [("a", "books", 1, "10.00")], at="2026-11-27T04:59:59+00:00"),
        purchase("inside", [("a", "books", 1, "10.00")], at="2026-11-27T05:00:00+00:00"),
        purchase("after", [("a", "books", 1, "10.00")], at="2026-11-28T05:00:00+00:00"),
    )
    assert [(entry.caused_by, entry.points) for entry in ledger] == [("before", 10), ("inside", 30), ("after", 10)]


def test_first_review_per_product_only():
    ruleset = rules("fixed: {review: 25}\n")
    state, ledger = run(
        ruleset,
        event("review.approved", "r1", review_id="rv1", sku="a", rating=5),
        event("review.approved", "r2", review_id="rv2", sku="a", rating=4),
        event("review.approved", "r3", review_id="rv3", sku="b", rating=4),
    )
    assert [(entry.kind, entry.points) for entry in ledger] == [
        (Kind.earned, 25),
        (Kind.recorded, 0),
        (Kind.earned, 25),
    ]
    assert state.balance == 50


def test_daily_cap_in_the_store_timezone():
    ruleset = rules(
        "timezone: America/New_York\nfixed: {social_share: 10}\n"
        "caps: [{source: social_share, period: day, points_max: 25}]\n"
    )
    shares = [
        event("social.shared", f"s{index}", at=at, share_id=f"sh{index}", network="x")
        for index, at in enumerate(
            [
                "2026-03-02T01:00:00+00:00",
                "2026-03-02T02:00:00+00:00",
                "2026-03-02T03:00:00+00:00",
                "2026-03-02T06:00:00+00:00",
            ]
        )
    ]
    _, ledger = run(ruleset, *shares)
    # 01:00-03:00 UTC are March 1st in New York (10 + 10 + 5 capped); 06:00 UTC is March 2nd there.
    assert [entry.points for entry in ledger] == [10, 10, 5, 10]


def test_referral_rewards_both_sides_on_their_own_states():
    ruleset = rules("referral: {referrer_points: 200, referee_points: 100}\n")
    referral = event("referral.completed", "rf", referral_id="r1", referee_id="c2", order_id="o1")
    first_order = purchase("p", [("a", "books", 1, "0.50")], order_id="o1", customer="c2")
    referrer, referrer_ledger = run(ruleset, referral)
    referee, referee_ledger = run(ruleset, first_order, customer="c2")
    referee_ledger += apply(referee, referral, ruleset, side="referee")
    assert [(e.customer_id, e.rule_id, e.points) for e in referrer_ledger] == [("c1", "referral.referrer", 200)]
    assert [(e.customer_id, e.rule_id, e.points) for e in referee_ledger[1:]] == [("c2", "referral.referee", 100)]
    assert referrer_ledger[0].entry_id != referee_ledger[1].entry_id


def test_the_referee_award_needs_the_qualifying_order():
    ruleset = rules("referral: {referrer_points: 200, referee_points: 100}\n")
    referral = event("referral.completed", "rf", referral_id="r1", referee_id="c2", order_id="o1")
    _, ledger = run(ruleset, referral, customer="c2", side="referee")
    assert [(e.kind, e.points, e.explanation) for e in ledger] == [
        (Kind.recorded, 0, "qualifying order o1 not found for c2")
    ]


def test_self_referral_earns_nothing():
    ruleset = rules("referral: {referrer_points: 200, referee_points: 100}\n")
    _, ledger = run(ruleset, event("referral.completed", "rf", referral_id="r1", referee_id="c1", order_id="o1"))
    assert [(entry.rule_id, entry.points) for entry in ledger] == [("referral.self", 0)]


def test_same_event_twice_is_applied_once_and_conflicting_reuse_is_rejected():
    ruleset = rules()
    first = purchase("e1", [("a", "books", 1, "10.00")])
    state, ledger = run(ruleset, first, first)
    assert len(ledger) == 1 and state.balance == 10
    with pytest.raises(EventRejected, match="conflict"):
        apply(state, purchase("e1", [("a", "books", 2, "10.00")]), ruleset)
    assert state.balance == 10


def test_partial_refunds_reverse_exactly_the_refunded_share():
    ruleset = rules('  spend_thresholds: [{minimum_total: "40", bonus: 20}]\n')
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 3, "10.00"), ("b", "toys", 1, "25.00")], order_id="o1"),
        event(
            "purchase.refunded",
            "r1",
            at="2026-03-02T10:00:00+00:00",
            order_id="o1",
            refund_id="rf1",
            lines=[{"sku": "a", "quantity": 1}],
        ),
        event(
            "purchase.refunded",
            "r2",
            at="2026-03-03T10:00:00+00:00",
            order_id="o1",
            refund_id="rf2",
            lines=[{"sku": "a", "quantity": 2}],
        ),
    )
    reversals = [(entry.caused_by, entry.points, entry.reference) for entry in ledger if entry.kind is Kind.reversed]
    assert reversals == [
        ("r1", -10, "line:0;refund:rf1"),
        ("r2", -20, "line:0;refund:rf2"),
        ("r2", -20, "purchase.threshold_bonus;refund:rf2"),  # 25.00 left is below 40
    ]
    assert state.balance == 25


def test_full_refund_and_repeated_refund():
    ruleset = rules("  first_order_bonus: 100\n")
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 2, "10.00")], order_id="o1"),
        event("purchase.refunded", "r1", at="2026-03-02T10:00:00+00:00", order_id="o1", refund_id="rf1"),
        event("purchase.refunded", "r1b", at="2026-03-02T10:00:00+00:00", order_id="o1", refund_id="rf1"),
        event("purchase.cancelled", "c", at="2026-03-03T10:00:00+00:00", order_id="o1"),
    )
    assert state.balance == 0
    assert [(entry.caused_by, entry.kind, entry.points) for entry in ledger[2:]] == [
        ("r1", Kind.reversed, -20),
        ("r1", Kind.reversed, -100),
        ("r1b", Kind.recorded, 0),
        ("c", Kind.recorded, 0),
    ]


def test_redemption_needs_available_points():
    ruleset = rules("redemption: {minimum_points: 10, maximum_points: 500}\n")
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 1, "100.00")]),
        event("points.redeem_requested", "x1", redemption_id="x1", points=150),
        event("points.redeem_requested", "x2", redemption_id="x2", points=5),
        event("points.redeem_requested", "x3", redemption_id="x3", points=60),
    )
    assert [(entry.kind, entry.points, entry.balance_after) for entry in ledger[1:]] == [
        (Kind.redemption_rejected, 0, 100),
        (Kind.redemption_rejected, 0, 100),
        (Kind.redeemed, -60, 40),
    ]
    assert ledger[3].amount == "0.6"


def test_pending_points_confirm_after_the_return_window():
    ruleset = rules("  pending_days: 14\n")
    state, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 1, "30.00")], at="2026-03-01T10:00:00+00:00"),
        event("points.redeem_requested", "x1", at="2026-03-05T10:00:00+00:00", redemption_id="x1", points=10),
        event("clock.tick", "t1", at="2026-03-15T10:00:00+00:00"),
    )
    assert [(entry.kind, entry.points, entry.pending_points) for entry in ledger] == [
        (Kind.pending, 0, 30),
        (Kind.redemption_rejected, 0, 0),
        (Kind.confirmed, 30, -30),
    ]
    assert (state.balance, state.pending) == (30, 0)


def test_adjustment_below_zero_is_refused_unless_allowed():
    ruleset = rules()
    state, ledger = run(
        ruleset,
        event("points.adjusted", "a1", adjustment_id="a1", points=-5, note="oops", actor="admin"),
        event("points.adjusted", "a2", adjustment_id="a2", points=-5, note="debt", actor="admin", allow_negative=True),
    )
    assert [(entry.rule_id, entry.points) for entry in ledger] == [("adjustment.refused", 0), ("adjustment", -5)]
    assert state.balance == -5


def test_excluded_segment_earns_nothing():
    ruleset = rules("fixed: {registration: 50}\neligibility: {excluded_segments: [staff]}\n")
    state, ledger = run(
        ruleset,
        event("customer.registered", "r", customer_segment="staff"),
        purchase("p", [("a", "books", 1, "30.00")], at="2026-03-02T10:00:00+00:00"),
    )
    assert [entry.points for entry in ledger] == [0, 0]
    assert state.balance == 0


def test_entry_ids_are_deterministic_and_include_rule_and_version():
    ruleset = rules()
    _, first = run(ruleset, purchase("e1", [("a", "books", 1, "10.00")]))
    _, again = run(ruleset, purchase("e1", [("a", "books", 1, "10.00")]))
    assert first[0].entry_id == again[0].entry_id == entry_id_for("e1", "c1", "purchase.rate", "test-1", 0)
    assert entry_id_for("e1", "c1", "purchase.rate", "test-2", 0) != first[0].entry_id


def test_state_is_the_fold_of_its_ledger():
    ruleset = rules("  pending_days: 3\n  first_order_bonus: 10\nfixed: {review: 5, blog_comment: 2}\n")
    live, ledger = run(
        ruleset,
        purchase("p", [("a", "books", 2, "10.00")], order_id="o1"),
        event("review.approved", "r", at="2026-03-02T10:00:00+00:00", review_id="rv", sku="a", rating=5),
        event("blog.commented", "b", at="2026-03-02T11:00:00+00:00", comment_id="c", post_id="post"),
        event(
            "purchase.refunded",
            "rf",
            at="2026-03-03T10:00:00+00:00",
            order_id="o1",
            refund_id="x",
            lines=[{"sku": "a", "quantity": 1}],
        ),
        event("clock.tick", "t", at="2026-03-09T10:00:00+00:00"),
    )
    rebuilt = CustomerState("c1")
    for entry in ledger:
        evolve(rebuilt, entry, ruleset.zone)
    assert rebuilt == live


@pytest.mark.parametrize("ruleset_file", ["default", "full-lifecycle", "advanced-coupons", "seasonal-promotion"])
def test_entries_built_without_validation_are_valid_ledger_entries(ruleset_file):
    """The core builds entries without validating them (ledger_entry_trusted): each must be the validated entry,
    value by value and type by type (an int, not a bool or a Decimal; a Kind, not a str), with the same given
    fields, so that every driver's ledger stays byte-identical."""
    from pathlib import Path

    from schemas.ledger import LedgerEntry
    from streams.batch import process_lines
    from streams.simulate import generate_events

    ruleset = parse_ruleset(Path(f"streams/rules/rulesets/{ruleset_file}.yaml").read_text())
    result = process_lines(generate_events(events=3000, customers=100, seed=3, mean_gap_seconds=5000), ruleset)
    assert len(result.ledger) > 3000
    for entry in result.ledger:
        validated = LedgerEntry(**{name: value for name, value in entry.__dict__.items() if name != "schema_version"})
        assert validated == entry
        assert list(entry.__dict__) == list(validated.__dict__)
        assert [type(value) for value in entry.__dict__.values()] == [type(v) for v in validated.__dict__.values()]
        assert entry.model_fields_set == validated.model_fields_set
        assert entry.model_dump_json() == validated.model_dump_json()
        assert LedgerEntry.model_validate(entry.model_dump()) == entry
        assert LedgerEntry.model_validate_json(entry.model_dump_json()) == entry


# --- the ledger's limit: no entry or balance beyond what its Int64 columns hold -----------------------------

HUGE_LINE = ("a", "books", 100_000, "999999999999.999999")  # inside the event contract's limits


def test_an_entry_beyond_the_ledger_limit_rejects_the_event_and_changes_nothing():
    ruleset = rules(base='version: t\npurchase: {points_per_unit: "10000"}\n')
    state = CustomerState("c1")
    with pytest.raises(EventRejected) as caught:
        apply(state, purchase("e1", [("a", "books", 1, "1"), HUGE_LINE]), ruleset)
    assert caught.value.reason == (
        "lines.1: rule purchase.rate computes 999,999,999,999,999,999,000 points for one ledger entry, beyond the "
        "ledger's limit of 1,000,000,000,000 points (the rule set's rates and multipliers applied to the event's "
        "amounts)"
    )
    assert (state.balance, state.sequence, state.applied) == (0, 0, {})
    # The next event is decided as if the rejected one never came.
    _, ledger = run(ruleset, purchase("e2", [("a", "books", 1, "1")]))
    assert [(entry.points, entry.balance_after) for entry in ledger] == [(10_000, 10_000)]


PROMOTIONS_X10_8 = (
    "promotions:\n"
    '  - {id: p1, starts_at: "2026-01-01T00:00:00Z", ends_at: "2027-01-01T00:00:00Z", multiplier: "10000", '
    "sources: [purchase, registration]}\n"
    '  - {id: p2, starts_at: "2026-01-01T00:00:00Z", ends_at: "2027-01-01T00:00:00Z", multiplier: "10000", '
    "sources: [purchase, registration]}\n"
)


def test_fixed_points_and_promotions_beyond_the_limit_are_rejected_not_a_rounding_crash():
    # 10^7 fixed points x 10^5 units x 10^4 x 10^4: 10^20, more digits than Decimal rounding can quantize.
    ruleset = rules("  products: {a: {fixed_points: 10000000}}\nfixed: {registration: 10000000}\n" + PROMOTIONS_X10_8)
    with pytest.raises(EventRejected) as caught:
        run(ruleset, purchase("e1", [("a", "books", 100_000, "1")]))
    assert caught.value.reason.startswith(
        "lines.0: rule purchase.product:a computes 100,000,000,000,000,000,000 points for one ledger entry"
    )
    with pytest.raises(EventRejected) as caught:
        run(ruleset, event("customer.registered", "r1"))
    assert caught.value.reason.startswith("rule registration computes 1,000,000,000,000,000 points")


def test_a_balance_beyond_the_ledger_limit_rejects_the_event():
    # Each line earns 999,999,999,999 (within the limit per entry); the second takes the balance beyond it.
    line = ("a", "books", 100_000, "9999999.999999")
    state, ledger = run(rules(), purchase("e1", [line]))
    assert state.balance == 999_999_999_999
    with pytest.raises(EventRejected) as caught:
        apply(state, purchase("e2", [line]), rules())
    assert caught.value.reason == (
        "rule purchase.rate would take the balance to 1,999,999,999,998 for customer c1, beyond the ledger's limit "
        "of 1,000,000,000,000 points (a ledger entry or balance holds at most that many)"
    )
    assert state.balance == 999_999_999_999
    pending = rules("  pending_days: 14\n")
    state, _ = run(pending, purchase("e1", [line]))
    with pytest.raises(EventRejected, match="would take the pending balance to 1,999,999,999,998 for customer c1"):
        apply(state, purchase("e2", [line]), pending)


def test_the_batch_driver_lists_an_event_beyond_the_limit_and_applies_the_rest():
    from streams.batch import process_lines

    ruleset = rules(base='version: t\npurchase: {points_per_unit: "10000"}\n')
    lines = [
        json.dumps(
            event_document(
                f"e{n}",
                "purchase.completed",
                "c1",
                f"2026-03-0{n}T10:00:00+00:00",
                order_id=f"o{n}",
                currency="EUR",
                lines=[{"sku": s, "category": c, "quantity": q, "unit_price": p}],
            )
        )
        for n, (s, c, q, p) in enumerate([HUGE_LINE, ("a", "books", 1, "1")], start=1)
    ]
    result = process_lines(lines, ruleset)
    assert [(r.line, r.event_id, r.reason.split(":")[0]) for r in result.rejected] == [(1, "e1", "lines.0")]
    assert [(entry.caused_by, entry.balance_after) for entry in result.ledger] == [("e2", 10_000)]


def test_a_tier_multiplies_rate_based_line_points_only_as_docs_lifecycle_md_says():
    ruleset = rules(
        "  products: {fixed: {fixed_points: 10}}\n"
        "  first_order_bonus: 5\n"
        "tiers: {levels: [{name: silver, minimum: '100', multiplier: '2'}]}\n"
    )
    _, ledger = run(
        ruleset,
        purchase("e1", [("a", "books", 1, "150")]),  # lifts the customer into silver: earned at no tier
        purchase("e2", [("a", "books", 1, "10"), ("fixed", "books", 1, "10")]),
    )
    assert [(entry.caused_by, entry.rule_id, entry.points) for entry in ledger if entry.points] == [
        ("e1", "purchase.rate", 150),
        ("e1", "purchase.first_order_bonus", 5),
        ("e2", "purchase.rate", 20),  # x tier silver 2
        ("e2", "purchase.product:fixed", 10),  # fixed points: no tier multiplier
    ]
