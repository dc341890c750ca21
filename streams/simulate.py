"""Deterministic synthetic loyalty traffic: JSON lines of event contract v1 for tests, demos and benchmarks.

`generate_events` yields exactly `events` lines (str, no trailing newline); `write_events` writes them
to a file, one per line. All randomness comes from one `random.Random(seed)` and no wall clock is
read, so the same arguments give byte-identical output on every run and machine.

What the traffic looks like:

- Customers `c000000 .. c<customers-1>` with Zipf weights (exponent 1) over a seeded permutation of
  the pool: a few heavy buyers make most of the purchases. Each customer gets `customer.registered`
  right before their first event. Stores `s1 .. s<stores>`: a customer uses a home store 85% of the
  time and a random one otherwise.
- A catalogue of 250 to 400 SKUs (drawn from the seed) over 12 categories with category-typical price
  ranges (grocery 1 to 40, electronics 15 to 2000, ...); SKU popularity is Zipf-distributed too.
- Each good line that is not a registration comes from an activity drawn with these weights
  (the shares of activities; registrations and the referee's first purchase come on top):

  ========================  ======  =====================================================================
  activity                  weight  shape
  ========================  ======  =====================================================================
  purchase.completed        55      1 to 5 distinct lines, quantity 1 to 3, USD; 20% discount_total,
                                    60% tax_total, 40% shipping_total, 5% paid_with_points,
                                    10% coupon_codes
  purchase.refunded         4       an open earlier order of the same customer: half full refunds
                                    (no `lines`, only for untouched orders), half partial (a subset
                                    of the lines, never more than is still unrefunded)
  purchase.cancelled        1       the customer's most recent untouched order
  review.approved           10      a SKU from the customer's open orders, rating 1 to 5 (skewed
                                    high); 15% re-review the customer's previously reviewed SKU
  referral.completed        3       the referrer is a known customer; the referee is a customer
                                    never seen before, whose customer.registered and first
                                    purchase.completed come first and whose order_id it carries;
                                    in 15% the referee then refunds that order in full (a referral
                                    reversed when inside the return window); with
                                    `disputed_referral_share` (default 0) that share of referrals
                                    is followed by one the referee's side refuses: another
                                    customer claims the same referee, or a new referee's referral
                                    names an order never placed (the referrer's reward withdrawn)
  blog.commented            5       one of 30 posts (popular posts skewed); 20% the same post again
  social.shared             4       one of six networks
  feedback.submitted        2
  points.redeem_requested   8       50 to 2000 points in steps of 10 (may exceed the balance)
  points.adjusted           1       signed points (30% negative), a note and an actor
  clock.tick                1       for a uniformly chosen known customer (quiet ones included)
  ========================  ======  =====================================================================

  A refund, cancellation or review drawn for a customer without a suitable order becomes a purchase.

- `occurred_at` advances by an exponential gap (mean `mean_gap_seconds`, microsecond resolution)
  before every original good line, so the original lines are in event-time order; it is written
  in ISO 8601 with a `+00:00` offset.
- Ids are unique: `event_id` is `ev-<seed>-<n>` where n is the 0-based output line of the original,
  and order, refund, review, referral, comment, share, feedback, redemption and adjustment ids
  carry the same n.

Line counts (exact): `bad = round(events * bad_share)` (Python's round, half to even), capped at
`events`; `duplicates = min(round(events * duplicate_share), events - 1 - bad)` (never negative);
the rest are original good lines. Line 0 is always good unless every line is bad. Bad and
duplicate positions are a seeded sample of lines 1 .. events-1.

- A duplicate is a byte-identical re-send of one of the last 50 original good lines (a producer
  retry), so it carries that line's earlier `occurred_at`: event time is non-decreasing over the
  original lines, not over the re-sends.
- A bad line is rejected by `schemas.decode_event`. Kinds (`BAD_LINE_KINDS`): invalid JSON,
  truncated JSON, unknown event_type, missing required field, negative quantity, float price,
  price "NaN", identifier with a space, identifier with a control character, occurred_at without
  offset, year 1 date, payload over `payload_size_max_bytes`, and a JSON array instead of an
  object. Non-UTF-8 bytes cannot be represented in a str and are not generated. Bad lines do not
  change the simulated state (a customer first seen in a bad line is still registered later).
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from os import PathLike

from schemas import events as contract

__all__ = ["BAD_LINE_KINDS", "generate_events", "write_events"]

default_start = datetime(2026, 1, 1, tzinfo=UTC)
duplicate_window_lines = 50
orders_remembered_per_customer_max = 10
customer_zipf_exponent = 1.0
sku_zipf_exponent = 0.9
blog_posts_count = 30
home_store_share = 0.85
referral_refunded_share = 0.15  # referrals whose referee refunds the qualifying order in full right after
currency = "USD"

ACTIVITY_WEIGHTS: dict[str, int] = {
    "purchase.completed": 55,
    "purchase.refunded": 4,
    "purchase.cancelled": 1,
    "review.approved": 10,
    "referral.completed": 3,
    "blog.commented": 5,
    "social.shared": 4,
    "feedback.submitted": 2,
    "points.redeem_requested": 8,
    "points.adjusted": 1,
    "clock.tick": 1,
}

# (category, SKU prefix, lowest price, highest price) in whole currency units.
CATEGORIES: tuple[tuple[str, str, int, int], ...] = (
    ("books", "BK", 4, 80),
    ("electronics", "EL", 15, 2000),
    ("grocery", "GR", 1, 40),
    ("apparel", "AP", 8, 250),
    ("home", "HM", 5, 600),
    ("toys", "TY", 5, 150),
    ("beauty", "BE", 3, 120),
    ("sports", "SP", 8, 800),
    ("garden", "GD", 4, 400),
    ("pet", "PT", 2, 90),
    ("office", "OF", 1, 200),
    ("jewelry", "JW", 20, 3000),
)

BAD_LINE_KINDS: tuple[str, ...] = (
    "invalid_json",
    "truncated_json",
    "unknown_event_type",
    "missing_field",
    "negative_quantity",
    "float_price",
    "nan_price",
    "identifier_with_space",
    "identifier_with_control_character",
    "occurred_at_without_offset",
    "year_one",
    "oversized_payload",
    "json_array",
)

# Weighted choices as (values, cumulative weights): 1 to 5 purchase lines, quantities 1 to 3, ratings.
_LINE_COUNTS = ((1, 2, 3, 4, 5), (40, 65, 82, 92, 100))
_QUANTITIES = ((1, 2, 3), (75, 93, 100))
_RATINGS = ((1, 2, 3, 4, 5), (5, 12, 25, 55, 100))
_CENT_ENDINGS = (99, 99, 99, 49, 95, 0)
_COUPONS = ("WELCOME10", "SPRING5", "FREESHIP", "VIP20", "BUNDLE15", "FLASH25")
_NETWORKS = ("facebook", "x", "instagram", "pinterest", "linkedin", "whatsapp")
_ADJUSTMENT_NOTES = (
    "goodwill for a late delivery",
    "correction of a duplicate award",
    "birthday bonus",
    "fraud review: points withdrawn",
    "migration from the old loyalty plugin",
)
_ACTORS = ("admin:alice", "admin:bob", "support:carol", "system:migration")
_UNKNOWN_EVENT_TYPES = ("order.shipped", "purchase.teleported", "Purchase.Completed", "points.earned")
_REQUIRED_PURCHASE_FIELDS = ("event_id", "schema_version", "occurred_at", "store_id", "order_id", "currency")
_CONTROL_CHARACTERS = ("\x00", "\x07", "\x1b", "\n", "\t", "\x7f")


_encoder = json.JSONEncoder(separators=(",", ":"))


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _cumulative_zipf(count: int, exponent: float) -> list[float]:
    total = 0.0
    cumulative = []
    for rank in range(1, count + 1):
        total += rank**-exponent
        cumulative.append(total)
    return cumulative


class _Customer:
    """What the simulation remembers about one customer to make later events refer to earlier ones."""

    __slots__ = ("customer_id", "home_store", "orders", "last_post", "last_reviewed_sku")

    def __init__(self, customer_id: str, home_store: str) -> None:
        self.customer_id = customer_id
        self.home_store = home_store
        # Open orders, oldest first: [order_id, {sku: quantity not yet refunded}, touched].
        self.orders: list[list] = []
        self.last_post: str | None = None
        self.last_reviewed_sku: str | None = None


class _Simulation:
    def __init__(
        self,
        *,
        customers: int,
        seed: int,
        stores: int,
        start: datetime,
        mean_gap_seconds: float,
        disputed_referral_share: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.disputed_referral_share = disputed_referral_share
        self.seed = seed
        self.stores = [f"s{number}" for number in range(1, stores + 1)]
        self.start = start.astimezone(UTC)
        self.gap_rate = 1.0 / mean_gap_seconds if mean_gap_seconds > 0 else 0.0
        self.clock_microseconds = 0
        self.line_number = 0
        self.pool_size = customers
        self.known: dict[int, _Customer] = {}
        self.known_list: list[_Customer] = []
        self.minted_customers = 0
        rng = self.rng

        # Catalogue: (sku, category, unit price in cents), then a Zipf popularity order over it.
        catalogue: list[tuple[str, str, int]] = []
        for _ in range(rng.randint(250, 400)):
            category, prefix, lowest, highest = CATEGORIES[rng.randrange(len(CATEGORIES))]
            units = int(math.exp(rng.uniform(math.log(lowest), math.log(highest + 1))))
            cents = max(units, 1) * 100 + rng.choice(_CENT_ENDINGS) - 100
            catalogue.append((f"{prefix}-{len(catalogue) + 1:05d}", category, max(cents, 49)))
        rng.shuffle(catalogue)
        self.catalogue = catalogue
        self.catalogue_cumulative = _cumulative_zipf(len(catalogue), sku_zipf_exponent)

        # Customers: Zipf weights over a seeded permutation, so the heavy buyers differ per seed.
        self.customer_by_rank = list(range(customers))
        rng.shuffle(self.customer_by_rank)
        self.customer_cumulative = _cumulative_zipf(customers, customer_zipf_exponent)
        # Referees are taken from the pool in this order, skipping customers already seen.
        self.referee_order = list(range(customers))
        rng.shuffle(self.referee_order)
        self.referee_cursor = 0

        self.post_cumulative = _cumulative_zipf(blog_posts_count, 1.0)
        self.activities = list(ACTIVITY_WEIGHTS)
        total = 0
        self.activity_cumulative = []
        for weight in ACTIVITY_WEIGHTS.values():
            total += weight
            self.activity_cumulative.append(total)
        self.handlers: dict[str, Callable[[], Iterator[str]]] = {
            "purchase.completed": self._purchase_completed,
            "purchase.refunded": self._purchase_refunded,
            "purchase.cancelled": self._purchase_cancelled,
            "review.approved": self._review_approved,
            "referral.completed": self._referral_completed,
            "blog.commented": self._blog_commented,
            "social.shared": self._social_shared,
            "feedback.submitted": self._feedback_submitted,
            "points.redeem_requested": self._redeem_requested,
            "points.adjusted": self._points_adjusted,
            "clock.tick": self._clock_tick,
        }

    # -- drawing -------------------------------------------------------------------------------

    def _zipf_index(self, cumulative: list[float]) -> int:
        index = bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])
        return min(index, len(cumulative) - 1)

    def _draw_customer_index(self) -> int:
        return self.customer_by_rank[self._zipf_index(self.customer_cumulative)]

    def _draw_product(self) -> tuple[str, str, int]:
        return self.catalogue[self._zipf_index(self.catalogue_cumulative)]

    def _customer(self, index: int) -> tuple[_Customer, bool]:
        """The customer with this index, and whether this is their first appearance."""
        customer = self.known.get(index)
        if customer is not None:
            return customer, False
        customer = _Customer(f"c{index:06d}", self.stores[index % len(self.stores)])
        self.known[index] = customer
        self.known_list.append(customer)
        return customer, True

    # -- envelope --------------------------------------------------------------------------------

    def _timestamp(self) -> str:
        return (self.start + timedelta(microseconds=self.clock_microseconds)).isoformat()

    def _envelope(self, event_type: str, customer: _Customer) -> dict:
        """A new good event at the next moment of event time, numbered by its output line."""
        if self.gap_rate:
            self.clock_microseconds += int(self.rng.expovariate(self.gap_rate) * 1_000_000)
        store = customer.home_store
        if len(self.stores) > 1 and self.rng.random() >= home_store_share:
            store = self.stores[self.rng.randrange(len(self.stores))]
        return {
            "event_id": f"ev-{self.seed}-{self.line_number}",
            "event_type": event_type,
            "schema_version": 1,
            "occurred_at": self._timestamp(),
            "customer_id": customer.customer_id,
            "store_id": store,
        }

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{self.seed}-{self.line_number}"

    _dump = staticmethod(_encoder.encode)

    def _weighted(self, choices: tuple[tuple[int, ...], tuple[int, ...]]) -> int:
        values, cumulative = choices
        return values[bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])]

    def _registration(self, customer: _Customer) -> str:
        return self._dump(self._envelope("customer.registered", customer))

    def _known_customer(self) -> Iterator[str | _Customer]:
        """Draw a customer by weight; yields their registration first if they are new, then them."""
        customer, first = self._customer(self._draw_customer_index())
        if first:
            yield self._registration(customer)
        yield customer

    # -- good lines --------------------------------------------------------------------------

    def good_lines(self) -> Iterator[str]:
        rng = self.rng
        activities = self.activities
        cumulative = self.activity_cumulative
        total = cumulative[-1]
        handlers = self.handlers
        while True:
            activity = activities[bisect.bisect_right(cumulative, rng.random() * total)]
            yield from handlers[activity]()

    def _with_customer(self, action: Callable[[_Customer], Iterator[str]]) -> Iterator[str]:
        for item in self._known_customer():
            if isinstance(item, str):
                yield item
            else:
                yield from action(item)

    def _purchase_completed(self) -> Iterator[str]:
        return self._with_customer(self._purchase)

    def _purchase(self, customer: _Customer) -> Iterator[str]:
        rng = self.rng
        event = self._envelope("purchase.completed", customer)
        order_id = self._id("o")
        wanted = self._weighted(_LINE_COUNTS)
        lines = []
        bought: dict[str, int] = {}
        subtotal = 0
        for _ in range(wanted * 3):  # a few extra draws to find distinct SKUs
            sku, category, cents = self._draw_product()
            if sku in bought:
                continue
            quantity = self._weighted(_QUANTITIES)
            bought[sku] = quantity
            subtotal += cents * quantity
            lines.append({"sku": sku, "category": category, "quantity": quantity, "unit_price": _money(cents)})
            if len(lines) == wanted:
                break
        event["order_id"] = order_id
        event["currency"] = currency
        event["lines"] = lines
        discount = 0
        if rng.random() < 0.20:
            discount = subtotal * rng.choice((5, 10, 15, 20)) // 100
            event["discount_total"] = _money(discount)
        if rng.random() < 0.60:
            event["tax_total"] = _money((subtotal - discount) * 8 // 100)
        if rng.random() < 0.40:
            event["shipping_total"] = _money(rng.choice((0, 499, 599, 999)))
        if rng.random() < 0.05:
            event["paid_with_points"] = _money(min(subtotal - discount, rng.randint(1, 40) * 50))
        if rng.random() < 0.10:
            event["coupon_codes"] = rng.sample(_COUPONS, rng.choice((1, 1, 1, 2)))
        customer.orders.append([order_id, bought, False])
        if len(customer.orders) > orders_remembered_per_customer_max:
            del customer.orders[0]
        yield self._dump(event)

    def _purchase_refunded(self) -> Iterator[str]:
        return self._with_customer(self._refund)

    def _refund(self, customer: _Customer) -> Iterator[str]:
        rng = self.rng
        if not customer.orders:
            yield from self._purchase(customer)
            return
        order = customer.orders[rng.randrange(len(customer.orders))]
        order_id, remaining, touched = order
        event = self._envelope("purchase.refunded", customer)
        event["order_id"] = order_id
        event["refund_id"] = self._id("rf")
        if not touched and rng.random() < 0.5:
            customer.orders.remove(order)
        else:
            open_skus = [sku for sku, quantity in remaining.items() if quantity > 0]
            count = rng.randint(1, len(open_skus) - 1) if len(open_skus) > 1 else 1
            chosen = set(rng.sample(open_skus, count))
            refund_lines = []
            for sku in open_skus:  # keep the order's line order
                if sku in chosen:
                    quantity = rng.randint(1, remaining[sku])
                    remaining[sku] -= quantity
                    refund_lines.append({"sku": sku, "quantity": quantity})
            event["lines"] = refund_lines
            order[2] = True
            if not any(remaining.values()):
                customer.orders.remove(order)
        yield self._dump(event)

    def _purchase_cancelled(self) -> Iterator[str]:
        return self._with_customer(self._cancel)

    def _cancel(self, customer: _Customer) -> Iterator[str]:
        for order in reversed(customer.orders):
            if not order[2]:
                customer.orders.remove(order)
                event = self._envelope("purchase.cancelled", customer)
                event["order_id"] = order[0]
                yield self._dump(event)
                return
        yield from self._purchase(customer)

    def _review_approved(self) -> Iterator[str]:
        return self._with_customer(self._review)

    def _review(self, customer: _Customer) -> Iterator[str]:
        rng = self.rng
        if not customer.orders:
            yield from self._purchase(customer)
            return
        sku = customer.last_reviewed_sku
        if sku is None or rng.random() >= 0.15:
            remaining = customer.orders[rng.randrange(len(customer.orders))][1]
            sku = list(remaining)[rng.randrange(len(remaining))]
        customer.last_reviewed_sku = sku
        event = self._envelope("review.approved", customer)
        event["review_id"] = self._id("rv")
        event["sku"] = sku
        event["rating"] = self._weighted(_RATINGS)
        yield self._dump(event)

    def _referral_completed(self) -> Iterator[str]:
        return self._with_customer(self._referral)

    def _new_customer(self) -> _Customer:
        """A customer never seen before: the next unseen one of the pool, or a fresh id beyond it."""
        while self.referee_cursor < len(self.referee_order):
            index = self.referee_order[self.referee_cursor]
            self.referee_cursor += 1
            if index not in self.known:
                return self._customer(index)[0]
        index = self.pool_size + self.minted_customers
        self.minted_customers += 1
        return self._customer(index)[0]

    def _referral(self, referrer: _Customer) -> Iterator[str]:
        referee = self._new_customer()
        yield self._registration(referee)
        yield from self._purchase(referee)
        order_id = referee.orders[-1][0]
        event = self._envelope("referral.completed", referrer)
        event["referral_id"] = self._id("ref")
        event["referee_id"] = referee.customer_id
        event["order_id"] = order_id
        yield self._dump(event)
        if self.rng.random() < referral_refunded_share:
            order = referee.orders[-1]
            refund = self._envelope("purchase.refunded", referee)
            refund["order_id"] = order_id
            refund["refund_id"] = self._id("rf")
            referee.orders.remove(order)
            yield self._dump(refund)
        if self.disputed_referral_share and self.rng.random() < self.disputed_referral_share:
            yield from self._disputed_referral(referrer, referee, order_id)

    def _disputed_referral(self, referrer: _Customer, referee: _Customer, order_id: str) -> Iterator[str]:
        """A referral the referee's side refuses, so that the referrer's reward is withdrawn: half the time
        another customer claims the referee just referred (already referred), otherwise the referrer refers
        a new customer naming an order that customer never placed (no such order)."""
        if self.rng.random() < 0.5:
            claimant = self.known_list[self.rng.randrange(len(self.known_list))]
            if claimant is referrer or claimant is referee:
                return
            event = self._envelope("referral.completed", claimant)
            event["referee_id"], event["order_id"] = referee.customer_id, order_id
        else:
            newcomer = self._new_customer()
            yield self._registration(newcomer)
            event = self._envelope("referral.completed", referrer)
            event["referee_id"], event["order_id"] = newcomer.customer_id, self._id("o")
        event["referral_id"] = self._id("ref")
        yield self._dump(event)

    def _blog_commented(self) -> Iterator[str]:
        return self._with_customer(self._comment)

    def _comment(self, customer: _Customer) -> Iterator[str]:
        post = customer.last_post
        if post is None or self.rng.random() >= 0.20:
            post = f"post-{self._zipf_index(self.post_cumulative) + 1}"
        customer.last_post = post
        event = self._envelope("blog.commented", customer)
        event["comment_id"] = self._id("cm")
        event["post_id"] = post
        yield self._dump(event)

    def _social_shared(self) -> Iterator[str]:
        return self._with_customer(self._share)

    def _share(self, customer: _Customer) -> Iterator[str]:
        event = self._envelope("social.shared", customer)
        event["share_id"] = self._id("sh")
        event["network"] = self.rng.choice(_NETWORKS)
        yield self._dump(event)

    def _feedback_submitted(self) -> Iterator[str]:
        return self._with_customer(self._feedback)

    def _feedback(self, customer: _Customer) -> Iterator[str]:
        event = self._envelope("feedback.submitted", customer)
        event["feedback_id"] = self._id("fb")
        yield self._dump(event)

    def _redeem_requested(self) -> Iterator[str]:
        return self._with_customer(self._redeem)

    def _redeem(self, customer: _Customer) -> Iterator[str]:
        event = self._envelope("points.redeem_requested", customer)
        event["redemption_id"] = self._id("rd")
        event["points"] = self.rng.randint(5, 200) * 10
        yield self._dump(event)

    def _points_adjusted(self) -> Iterator[str]:
        return self._with_customer(self._adjust)

    def _adjust(self, customer: _Customer) -> Iterator[str]:
        rng = self.rng
        event = self._envelope("points.adjusted", customer)
        points = rng.randint(1, 100) * 10
        event["adjustment_id"] = self._id("adj")
        event["points"] = -points if rng.random() < 0.30 else points
        event["note"] = rng.choice(_ADJUSTMENT_NOTES)
        event["actor"] = rng.choice(_ACTORS)
        yield self._dump(event)

    def _clock_tick(self) -> Iterator[str]:
        if not self.known_list:
            return self._with_customer(self._tick)
        return self._tick(self.known_list[self.rng.randrange(len(self.known_list))])

    def _tick(self, customer: _Customer) -> Iterator[str]:
        yield self._dump(self._envelope("clock.tick", customer))

    # -- bad lines -------------------------------------------------------------------------------

    def bad_line(self) -> str:
        """A purchase-shaped line, numbered by its output line, broken in one of BAD_LINE_KINDS."""
        rng = self.rng
        index = self._draw_customer_index()
        sku, category, cents = self._draw_product()
        event: dict = {
            "event_id": f"ev-{self.seed}-{self.line_number}",
            "event_type": "purchase.completed",
            "schema_version": 1,
            "occurred_at": self._timestamp(),
            "customer_id": f"c{index:06d}",
            "store_id": self.stores[index % len(self.stores)],
            "order_id": self._id("o"),
            "currency": currency,
            "lines": [{"sku": sku, "category": category, "quantity": 1, "unit_price": _money(cents)}],
        }
        line = event["lines"][0]
        kind = BAD_LINE_KINDS[rng.randrange(len(BAD_LINE_KINDS))]
        if kind == "invalid_json":
            return self._dump(event)[:-1] + ",}"
        if kind == "truncated_json":
            text = self._dump(event)
            return text[: rng.randint(1, len(text) - 1)]
        if kind == "json_array":
            return "[" + self._dump(event) + "]"
        if kind == "unknown_event_type":
            event["event_type"] = rng.choice(_UNKNOWN_EVENT_TYPES)
        elif kind == "missing_field":
            del event[rng.choice(_REQUIRED_PURCHASE_FIELDS)]
        elif kind == "negative_quantity":
            line["quantity"] = -rng.randint(1, 3)
        elif kind == "float_price":
            line["unit_price"] = cents / 100
        elif kind == "nan_price":
            line["unit_price"] = "NaN"
        elif kind == "identifier_with_space":
            event["order_id"] = f"o-{self.seed} {self.line_number}"
        elif kind == "identifier_with_control_character":
            line["sku"] = sku[:2] + rng.choice(_CONTROL_CHARACTERS) + sku[2:]
        elif kind == "occurred_at_without_offset":
            event["occurred_at"] = event["occurred_at"].removesuffix("+00:00")
        elif kind == "year_one":
            event["occurred_at"] = "0001-01-01T00:00:00+00:00"
        elif kind == "oversized_payload":
            # Otherwise valid lines with long SKUs, just enough of them to pass the size limit.
            padded = {
                "sku": (sku + "-").ljust(contract.identifier_length_max, "x"),
                "category": category,
                "quantity": 1,
                "unit_price": _money(cents),
            }
            count = contract.payload_size_max_bytes // len(self._dump(padded)) + 2
            event["lines"] = [padded] * count
        return self._dump(event)


def _check_arguments(
    events: int,
    customers: int,
    seed: int,
    stores: int,
    duplicate_share: float,
    bad_share: float,
    start: datetime,
    mean_gap_seconds: float,
    disputed_referral_share: float,
) -> None:
    if not isinstance(events, int) or events < 0:
        raise ValueError(f"events must be a non-negative integer, got {events!r}")
    if not isinstance(customers, int) or customers < 1:
        raise ValueError(f"customers must be a positive integer, got {customers!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(stores, int) or stores < 1:
        raise ValueError(f"stores must be a positive integer, got {stores!r}")
    for name, share in (
        ("duplicate_share", duplicate_share),
        ("bad_share", bad_share),
        ("disputed_referral_share", disputed_referral_share),
    ):
        if not (0.0 <= share <= 1.0):
            raise ValueError(f"{name} must be between 0 and 1, got {share!r}")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be a timezone-aware datetime")
    if not (math.isfinite(mean_gap_seconds) and mean_gap_seconds >= 0):
        raise ValueError(f"mean_gap_seconds must be a finite, non-negative number, got {mean_gap_seconds!r}")


def generate_events(
    *,
    events: int,
    customers: int,
    seed: int,
    stores: int = 1,
    duplicate_share: float = 0.02,
    bad_share: float = 0.0,
    start: datetime = default_start,
    mean_gap_seconds: float = 30.0,
    disputed_referral_share: float = 0.0,
) -> Iterator[str]:
    """Exactly `events` JSON lines (without newline) of synthetic traffic; see the module docstring.

    Arguments are checked when this is called, before any line is produced (ValueError).
    """
    _check_arguments(
        events, customers, seed, stores, duplicate_share, bad_share, start, mean_gap_seconds, disputed_referral_share
    )
    simulation = _Simulation(
        customers=customers,
        seed=seed,
        stores=stores,
        start=start,
        mean_gap_seconds=mean_gap_seconds,
        disputed_referral_share=disputed_referral_share,
    )
    return _lines(simulation, events, duplicate_share, bad_share)


def _lines(simulation: _Simulation, events: int, duplicate_share: float, bad_share: float) -> Iterator[str]:
    rng = simulation.rng
    bad_count = min(round(events * bad_share), events)
    if bad_count == events:
        bad_lines, duplicate_lines = set(range(events)), set()
    else:
        duplicate_count = min(round(events * duplicate_share), events - 1 - bad_count)
        chosen = rng.sample(range(1, events), bad_count + duplicate_count)
        bad_lines, duplicate_lines = set(chosen[:bad_count]), set(chosen[bad_count:])
    good = simulation.good_lines()
    recent: deque[str] = deque(maxlen=duplicate_window_lines)
    for number in range(events):
        simulation.line_number = number
        if number in bad_lines:
            yield simulation.bad_line()
        elif number in duplicate_lines:
            yield recent[rng.randrange(len(recent))]
        else:
            line = next(good)
            recent.append(line)
            yield line


def write_events(
    path: str | PathLike[str],
    *,
    events: int,
    customers: int,
    seed: int,
    stores: int = 1,
    duplicate_share: float = 0.02,
    bad_share: float = 0.0,
    start: datetime = default_start,
    mean_gap_seconds: float = 30.0,
    disputed_referral_share: float = 0.0,
) -> int:
    """Write `generate_events(...)` to `path`, one line each (UTF-8, `\\n`); returns the line count."""
    lines = generate_events(
        events=events,
        customers=customers,
        seed=seed,
        stores=stores,
        duplicate_share=duplicate_share,
        bad_share=bad_share,
        start=start,
        mean_gap_seconds=mean_gap_seconds,
        disputed_referral_share=disputed_referral_share,
    )
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as output:
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) == 10_000:
                output.write("\n".join(batch) + "\n")
                written += len(batch)
                batch.clear()
        if batch:
            output.write("\n".join(batch) + "\n")
            written += len(batch)
    return written
