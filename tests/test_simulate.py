"""The traffic simulator: deterministic, valid where it means to be, and realistic enough to test with."""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas import EventRejected, decode_event
from schemas.events import payload_size_max_bytes
from streams.simulate import generate_events, write_events

SAMPLE = dict(events=20_000, customers=400, seed=7, stores=3, duplicate_share=0.02, bad_share=0.03)


class Sample:
    """One generated stream, split the way a consumer would see it."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.bad: list[tuple[int, str, EventRejected]] = []
        self.duplicates: list[tuple[int, str]] = []
        self.originals: list[tuple[int, str, dict]] = []  # (line number, text, parsed JSON)
        seen: set[str] = set()
        for number, line in enumerate(lines):
            try:
                decode_event(line)
            except EventRejected as error:
                self.bad.append((number, line, error))
                continue
            if line in seen:
                self.duplicates.append((number, line))
            else:
                seen.add(line)
                self.originals.append((number, line, json.loads(line)))

    def of_type(self, event_type: str) -> list[dict]:
        return [event for _, _, event in self.originals if event["event_type"] == event_type]


@pytest.fixture(scope="module")
def sample() -> Sample:
    return Sample(list(generate_events(**SAMPLE)))


def test_same_arguments_give_byte_identical_lines() -> None:
    first = list(generate_events(events=3_000, customers=50, seed=11, bad_share=0.05, stores=2))
    second = list(generate_events(events=3_000, customers=50, seed=11, bad_share=0.05, stores=2))
    assert first == second


def test_different_seeds_give_different_lines() -> None:
    first = list(generate_events(events=500, customers=50, seed=1))
    second = list(generate_events(events=500, customers=50, seed=2))
    assert first != second
    assert len(set(first) & set(second)) == 0  # event ids carry the seed


@pytest.mark.parametrize("events", [0, 1, 2, 49, 1_000])
def test_yields_exactly_the_requested_number_of_lines(events: int) -> None:
    lines = list(generate_events(events=events, customers=10, seed=3, duplicate_share=0.1, bad_share=0.1))
    assert len(lines) == events
    assert all(isinstance(line, str) and "\n" not in line for line in lines)


def test_all_lines_bad_when_bad_share_is_one() -> None:
    lines = list(generate_events(events=40, customers=5, seed=3, bad_share=1.0))
    assert len(lines) == 40
    for line in lines:
        with pytest.raises(EventRejected):
            decode_event(line)


def test_bad_and_duplicate_counts_follow_the_documented_rule(sample: Sample) -> None:
    events = SAMPLE["events"]
    bad = round(events * SAMPLE["bad_share"])
    duplicates = min(round(events * SAMPLE["duplicate_share"]), events - 1 - bad)
    assert (len(sample.bad), len(sample.duplicates)) == (600, 400) == (bad, duplicates)
    assert len(sample.originals) == events - bad - duplicates


def test_every_good_line_validates_and_duplicates_and_bad_lines_are_the_only_others(sample: Sample) -> None:
    # The Sample split already decoded every line; here, the originals round-trip as typed events.
    for _, line, event in sample.originals:
        decoded = decode_event(line)
        assert decoded.event_id == event["event_id"]
        assert decoded.event_type == event["event_type"]


def test_bad_lines_are_malformed_in_varied_ways(sample: Sample) -> None:
    reasons = [error.reason for _, _, error in sample.bad]
    expected = {
        "invalid or truncated JSON": "not valid JSON",
        "unknown event type": "unknown event type",
        "missing field": ": Field required",
        "negative quantity": "greater than or equal to 1",
        "float or NaN price": "decimal string",
        "identifier with space or control character": "printable ASCII",
        "occurred_at without offset": "timezone",
        "year 1": "between 2000-01-01 and 2100-01-01",
        "oversized payload": f"exceeds the limit of {payload_size_max_bytes} bytes",
    }
    missing = [name for name, fragment in expected.items() if not any(fragment in r for r in reasons)]
    assert missing == []
    oversized = [line for _, line, error in sample.bad if "exceeds the limit" in error.reason]
    assert all(len(line.encode()) > payload_size_max_bytes for line in oversized)
    assert any("NaN" in line for _, line, _ in sample.bad)
    arrays = [error.reason for _, line, error in sample.bad if line.startswith("[")]
    assert arrays and all(reason.endswith("object") for reason in arrays)  # a JSON array, not an object
    assert any(re.search(r'"unit_price":[0-9]', line) for _, line, _ in sample.bad)  # a float price


def test_duplicates_are_byte_identical_copies_of_one_of_the_last_50_original_lines(sample: Sample) -> None:
    recent: deque[str] = deque(maxlen=50)
    duplicate_numbers = {number for number, _ in sample.duplicates}
    bad_numbers = {number for number, _, _ in sample.bad}
    for number, line in enumerate(sample.lines):
        if number in bad_numbers:
            continue
        if number in duplicate_numbers:
            assert line in recent, f"line {number} repeats a line not among the last 50 originals"
        else:
            recent.append(line)


def test_occurred_at_never_decreases_over_the_original_lines(sample: Sample) -> None:
    times = [event["occurred_at"] for _, _, event in sample.originals]
    assert all(time.endswith("+00:00") for time in times)
    parsed = [datetime.fromisoformat(time) for time in times]
    assert parsed == sorted(parsed)
    assert parsed[0] >= datetime(2026, 1, 1, tzinfo=UTC)


def test_ids_are_unique(sample: Sample) -> None:
    events = [event for _, _, event in sample.originals]
    assert len({event["event_id"] for event in events}) == len(events)
    orders = [event["order_id"] for event in sample.of_type("purchase.completed")]
    assert len(set(orders)) == len(orders)
    for event_type, key in [
        ("purchase.refunded", "refund_id"),
        ("review.approved", "review_id"),
        ("referral.completed", "referral_id"),
        ("blog.commented", "comment_id"),
        ("points.redeem_requested", "redemption_id"),
        ("points.adjusted", "adjustment_id"),
    ]:
        values = [event[key] for event in sample.of_type(event_type)]
        assert values and len(set(values)) == len(values), event_type


def test_every_customer_is_registered_before_their_first_event(sample: Sample) -> None:
    registered: set[str] = set()
    for _, _, event in sample.originals:
        if event["event_type"] == "customer.registered":
            assert event["customer_id"] not in registered
            registered.add(event["customer_id"])
        else:
            assert event["customer_id"] in registered, event["event_id"]


def test_refunds_name_earlier_orders_of_the_same_customer_within_the_quantities_bought(sample: Sample) -> None:
    orders: dict[str, dict] = {}
    refunded: Counter[tuple[str, str]] = Counter()
    full, partial = 0, 0
    for _, _, event in sample.originals:
        if event["event_type"] == "purchase.completed":
            orders[event["order_id"]] = event
        elif event["event_type"] == "purchase.refunded":
            order = orders[event["order_id"]]  # KeyError: a refund of an order not seen before
            assert order["customer_id"] == event["customer_id"]
            if "lines" not in event:
                full += 1
                continue
            partial += 1
            bought = {line["sku"]: line["quantity"] for line in order["lines"]}
            for line in event["lines"]:
                refunded[order["order_id"], line["sku"]] += line["quantity"]
                assert 1 <= line["quantity"] <= bought[line["sku"]]
                assert refunded[order["order_id"], line["sku"]] <= bought[line["sku"]]
    assert full > 50 and partial > 50
    assert 0.3 < full / (full + partial) < 0.6


def test_cancellations_name_earlier_orders_of_the_same_customer(sample: Sample) -> None:
    owners: dict[str, str] = {}
    cancelled = 0
    for _, _, event in sample.originals:
        if event["event_type"] == "purchase.completed":
            owners[event["order_id"]] = event["customer_id"]
        elif event["event_type"] == "purchase.cancelled":
            assert owners[event["order_id"]] == event["customer_id"]
            cancelled += 1
    assert cancelled > 50


def test_reviews_are_for_skus_the_customer_bought(sample: Sample) -> None:
    bought: dict[str, set[str]] = {}
    reviews: Counter[tuple[str, str]] = Counter()
    for _, _, event in sample.originals:
        if event["event_type"] == "purchase.completed":
            bought.setdefault(event["customer_id"], set()).update(line["sku"] for line in event["lines"])
        elif event["event_type"] == "review.approved":
            assert event["sku"] in bought[event["customer_id"]]
            assert 1 <= event["rating"] <= 5
            reviews[event["customer_id"], event["sku"]] += 1
    assert max(reviews.values()) >= 2  # the same customer reviews the same SKU again


def test_referee_is_new_and_registers_and_buys_before_the_referral(sample: Sample) -> None:
    first_seen: dict[str, int] = {}
    registered_at: dict[str, int] = {}
    orders: dict[str, tuple[str, int]] = {}
    referrals = 0
    for position, (_, _, event) in enumerate(sample.originals):
        customer = event["customer_id"]
        first_seen.setdefault(customer, position)
        if event["event_type"] == "customer.registered":
            registered_at[customer] = position
        elif event["event_type"] == "purchase.completed":
            orders[event["order_id"]] = (customer, position)
        elif event["event_type"] == "referral.completed":
            referrals += 1
            referee = event["referee_id"]
            assert referee != customer
            assert registered_at[referee] == first_seen[referee] == position - 2
            assert orders[event["order_id"]] == (referee, position - 1)
            assert registered_at[customer] < registered_at[referee]
    assert referrals > 300


def test_top_tenth_of_customers_make_more_than_40_percent_of_purchases(sample: Sample) -> None:
    purchases = Counter(event["customer_id"] for event in sample.of_type("purchase.completed"))
    top = sum(count for _, count in purchases.most_common(len(purchases) // 10))
    assert top / sum(purchases.values()) > 0.40


def test_event_mix_is_close_to_the_documented_shares(sample: Sample) -> None:
    counts = Counter(event["event_type"] for _, _, event in sample.originals)
    total = sum(counts.values())
    shares = {event_type: count / total for event_type, count in counts.items()}
    documented = {
        "purchase.completed": 0.55,
        "purchase.refunded": 0.04,
        "purchase.cancelled": 0.01,
        "review.approved": 0.10,
        "referral.completed": 0.03,
        "blog.commented": 0.05,
        "social.shared": 0.04,
        "feedback.submitted": 0.02,
        "points.redeem_requested": 0.08,
        "points.adjusted": 0.01,
        "clock.tick": 0.01,
    }
    for event_type, share in documented.items():
        assert share * 0.7 < shares[event_type] < share * 1.3 + 0.01, event_type
    assert 0 < shares["customer.registered"] < 0.10


def test_purchases_look_like_store_orders(sample: Sample) -> None:
    purchases = sample.of_type("purchase.completed")
    categories = {line["category"] for event in purchases for line in event["lines"]}
    skus = {line["sku"] for event in purchases for line in event["lines"]}
    assert len(categories) == 12
    assert 200 <= len(skus) <= 400
    assert {len(event["lines"]) for event in purchases} == {1, 2, 3, 4, 5}
    assert {line["quantity"] for event in purchases for line in event["lines"]} == {1, 2, 3}
    for event in purchases:
        assert len({line["sku"] for line in event["lines"]}) == len(event["lines"])
        for line in event["lines"]:
            price = line["unit_price"]
            assert Decimal(price) > 0 and price == f"{Decimal(price):.2f}"
    for key in ["discount_total", "tax_total", "shipping_total", "paid_with_points", "coupon_codes"]:
        with_key = sum(key in event for event in purchases)
        assert 0 < with_key < len(purchases), key
    assert {event["store_id"] for _, _, event in sample.originals} == {"s1", "s2", "s3"}


def test_redemptions_and_adjustments_carry_points_in_range(sample: Sample) -> None:
    redemptions = [event["points"] for event in sample.of_type("points.redeem_requested")]
    assert min(redemptions) >= 50 and max(redemptions) <= 2000
    adjustments = sample.of_type("points.adjusted")
    assert any(event["points"] < 0 for event in adjustments)
    assert any(event["points"] > 0 for event in adjustments)
    assert all(event["note"] and event["actor"] for event in adjustments)


def test_write_events_writes_the_generated_lines_and_returns_the_count(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    arguments = dict(events=25_000, customers=30, seed=5, bad_share=0.01)
    assert write_events(path, **arguments) == 25_000
    assert path.read_text(encoding="utf-8") == "".join(line + "\n" for line in generate_events(**arguments))


@pytest.mark.parametrize(
    "arguments",
    [
        dict(events=-1),
        dict(customers=0),
        dict(stores=0),
        dict(duplicate_share=1.5),
        dict(bad_share=-0.1),
        dict(mean_gap_seconds=-1.0),
        dict(start=datetime(2026, 1, 1)),
        dict(disputed_referral_share=2.0),
    ],
)
def test_invalid_arguments_raise_before_any_line_is_produced(arguments: dict) -> None:
    base = dict(events=10, customers=10, seed=1)
    with pytest.raises(ValueError):
        generate_events(**(base | arguments))


def test_disputed_referrals_claim_a_referred_customer_again_or_name_an_order_never_placed() -> None:
    lines = [
        json.loads(line)
        for line in generate_events(
            events=6000, customers=300, seed=8, duplicate_share=0.0, disputed_referral_share=0.5
        )
    ]
    orders = {(line["customer_id"], line["order_id"]) for line in lines if line["event_type"] == "purchase.completed"}
    referrers: dict[str, set[str]] = {}
    second_claims = no_order = 0
    for line in lines:
        if line["event_type"] != "referral.completed":
            continue
        claimed = referrers.setdefault(line["referee_id"], set())
        second_claims += bool(claimed - {line["customer_id"]})
        claimed.add(line["customer_id"])
        no_order += (line["referee_id"], line["order_id"]) not in orders
    assert second_claims > 10 and no_order > 10
