"""Input events of contract v1: the envelope, every event type, and one discriminated union per topic."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    StrictBool,
    StringConstraints,
)
from pydantic_core import CoreSchema, TzInfo, core_schema

# Limits, named with the unit last (see docs/events.md for the producer-facing list).
payload_size_max_bytes = 64 * 1024
identifier_length_max = 128
purchase_lines_max = 500
line_quantity_max = 100_000
money_digits_max = 12
points_request_max = 1_000_000_000
occurred_at_min = datetime(2000, 1, 1, tzinfo=UTC)
occurred_at_max = datetime(2100, 1, 1, tzinfo=UTC)

ModelT = TypeVar("ModelT", bound=BaseModel)

# Identifiers are printable ASCII without spaces: they become Kafka keys, ClickHouse keys and URL
# path segments, and control or look-alike unicode characters in them have no legitimate use.
Identifier = Annotated[
    str,
    StringConstraints(pattern=r"^[\x21-\x7e]+$", min_length=1, max_length=identifier_length_max),
]
ShortText = Annotated[str, StringConstraints(max_length=1000)]

_money_pattern = re.compile(rf"^[0-9]{{1,{money_digits_max}}}(\.[0-9]{{1,6}})?$")


def _parse_money(value: object) -> Decimal:
    """Money arrives as a decimal string; floats are refused because they cannot hold cents exactly."""
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError("must be a finite, non-negative amount")
        return value
    if not isinstance(value, str):
        raise ValueError(f'must be a decimal string such as "19.99", not {type(value).__name__}')
    if not _money_pattern.match(value):
        raise ValueError(
            f"must be a non-negative decimal string with at most {money_digits_max} integer digits "
            f'and 6 decimals, such as "19.99"; got {value[:40]!r}'
        )
    try:
        return Decimal(value)
    except InvalidOperation as error:  # unreachable given the pattern, kept as a guard
        raise ValueError(f"is not a decimal: {value[:40]!r}") from error


Money = Annotated[
    Decimal,
    BeforeValidator(_parse_money),
    PlainSerializer(lambda amount: format(amount, "f"), return_type=str, when_used="json"),
]


# Decoded times share one pydantic-core TzInfo per UTC offset. pydantic-core makes a new TzInfo for every time it
# parses, and comparing two aware datetimes whose tzinfo are distinct objects calls utcoffset() on both (about 360 ns);
# with the same object CPython compares the fields (about 17 ns), which is the same comparison for a fixed offset.
# The core compares event times several times per event (a customer's last event and activity, lots, ordering).
# Per shared TzInfo: the supported range's bounds at that offset, so that the range check compares that way too.
# Only TzInfo (a fixed offset) is shared: for a zone with daylight saving time, comparing the fields is not the same.
_shared_offsets: dict[TzInfo, tuple[TzInfo, datetime, datetime]] = {}
_shared_offsets_max = 1000  # distinct offsets kept (real ones are a few dozen); beyond, times keep their own TzInfo


def _within_supported_range(moment: datetime) -> datetime:
    zone = moment.tzinfo
    shared = _shared_offsets.get(zone) if type(zone) is TzInfo else None
    if shared is None:
        if not (occurred_at_min <= moment < occurred_at_max):
            raise ValueError("must be between 2000-01-01 and 2100-01-01")
        if type(zone) is TzInfo and len(_shared_offsets) < _shared_offsets_max:
            _shared_offsets[zone] = (zone, occurred_at_min.astimezone(zone), occurred_at_max.astimezone(zone))
        return moment
    shared_zone, earliest, latest = shared
    if zone is not shared_zone:
        moment = moment.replace(tzinfo=shared_zone)
    if not (earliest <= moment < latest):  # the same instants as the bounds above, at this offset
        raise ValueError("must be between 2000-01-01 and 2100-01-01")
    return moment


class _Prechecked:
    """Checks the raw JSON value with a core schema (in pydantic-core, no Python call) before the type's own
    validation, and replaces whatever that check finds with one clear message. Used where pydantic's lax
    parsing accepts more than the contract says, even in strict mode: a Unix timestamp (a number, or a string of
    digits) for a time or a date, `true` or `1.0` for the integer 1. The JSON Schema and the serialization are
    the type's own (the fingerprint of an event does not change)."""

    def __init__(self, check: CoreSchema, error_type: str, message: str, python_type: type | None = None) -> None:
        # From Python (the engine builds derived events from typed values) an instance of the type also passes.
        python_check = (
            check
            if python_type is None
            else core_schema.union_schema([core_schema.is_instance_schema(python_type), check])
        )
        self.check = core_schema.json_or_python_schema(
            json_schema=core_schema.custom_error_schema(
                check, custom_error_type=error_type, custom_error_message=message
            ),
            python_schema=core_schema.custom_error_schema(
                python_check, custom_error_type=error_type, custom_error_message=message
            ),
        )

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        inner = handler(source)
        return core_schema.chain_schema([self.check, inner], serialization=inner.get("serialization"))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        # Called with the outermost schema of the annotated type: an AfterValidator wraps the chain and changes
        # nothing in the JSON Schema.
        while schema["type"] != "chain":
            schema = schema["schema"]  # type: ignore[typeddict-item]
        return handler(schema["steps"][-1])  # type: ignore[typeddict-item]


time_example = "2026-03-01T10:00:00+01:00"
# An ISO 8601 date and time (RFC 3339 also allows a space or a lowercase t as separator); the offset itself is
# required by AwareDatetime ("Input should have timezone info"), the rest of the format by pydantic's parser.
_iso_time_check = _Prechecked(
    core_schema.str_schema(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]", strict=True),
    "iso_datetime",
    f'must be an ISO 8601 date and time with an offset, such as "{time_example}"',
    datetime,
)
_iso_date_check = _Prechecked(
    core_schema.str_schema(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", strict=True),
    "iso_date",
    'must be an ISO 8601 date such as "2026-03-01"',
    date,
)
_integer_one_check = _Prechecked(core_schema.int_schema(strict=True), "integer_one", "Input should be 1")

EventTime = Annotated[AwareDatetime, _iso_time_check, AfterValidator(_within_supported_range)]
Day = Annotated[date, _iso_date_check]
SchemaVersion = Annotated[Literal[1], _integer_one_check]
Quantity = Annotated[int, Field(strict=True, ge=1, le=line_quantity_max)]


_object_setattr = object.__setattr__


def constructed(cls: type[ModelT], values: dict[str, Any], fields_set: set[str]) -> ModelT:
    """The instance of `cls` that validating `values` would give, built without validating them again.

    For hot paths whose values are already exactly what validation returns: every field present, in declaration
    order, of the type validation produces (`fields_set`: the fields the input named). `model_construct` does the same
    in Python with more checks, and is slower than validating (docs/performance.md).
    """
    model = cls.__new__(cls)
    _object_setattr(model, "__dict__", values)
    _object_setattr(model, "__pydantic_fields_set__", fields_set)
    _object_setattr(model, "__pydantic_extra__", None)
    _object_setattr(model, "__pydantic_private__", None)
    return model


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class Envelope(_Frozen):
    """Fields every event carries. `event_id` is the idempotency key of the whole system."""

    event_id: Identifier
    schema_version: SchemaVersion
    occurred_at: EventTime
    customer_id: Identifier
    store_id: Identifier


class PurchaseLine(_Frozen):
    sku: Identifier
    category: Identifier
    quantity: Quantity
    unit_price: Money


class RefundLine(_Frozen):
    sku: Identifier
    quantity: Quantity


class PurchaseCompleted(Envelope):
    event_type: Literal["purchase.completed"]
    order_id: Identifier
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    lines: Annotated[list[PurchaseLine], Field(min_length=1, max_length=purchase_lines_max)]
    discount_total: Money = Decimal(0)
    tax_total: Money = Decimal(0)
    shipping_total: Money = Decimal(0)
    fee_total: Money = Decimal(0)
    paid_with_points: Money = Decimal(0)
    paid_with_store_credit: Money = Decimal(0)
    coupon_codes: Annotated[list[Identifier], Field(max_length=50, default_factory=list)]
    customer_segment: Identifier | None = None


class PurchaseRefunded(Envelope):
    """A refund. Without `lines` it refunds the whole order; with them, exactly those quantities."""

    event_type: Literal["purchase.refunded"]
    order_id: Identifier
    refund_id: Identifier
    lines: Annotated[list[RefundLine], Field(min_length=1, max_length=purchase_lines_max)] | None = None


class PurchaseCancelled(Envelope):
    event_type: Literal["purchase.cancelled"]
    order_id: Identifier


class ReviewApproved(Envelope):
    event_type: Literal["review.approved"]
    review_id: Identifier
    sku: Identifier
    rating: Annotated[int, Field(strict=True, ge=1, le=5)]


class ReferralCompleted(Envelope):
    """A referral. The envelope's customer is the referrer; `referee_id` is the new customer."""

    event_type: Literal["referral.completed"]
    referral_id: Identifier
    referee_id: Identifier
    order_id: Identifier


class ReferralReversed(Envelope):
    """A referral that does not stand, decided on the referee's side; the envelope's customer is the referrer.

    `reason`: `refunded` (the qualifying order was refunded or cancelled inside the return window: the
    referrer's reward is reversed and that referee never pays this referrer again), `no_order` (the referee
    has no recorded order with that id yet: the reward is withdrawn, a later valid referral pays) or
    `already_referred` (another referrer was first: the reward is withdrawn). The engine derives this event on
    the referee's partition and publishes it keyed by the referrer, so that the referrer's side is decided on
    the referrer's own partition; a store may also send it. `referral_event_id` is the referral's event id.
    """

    event_type: Literal["referral.reversed"]
    referee_id: Identifier
    order_id: Identifier
    referral_event_id: Identifier
    # Left out of the JSON when `refunded`, so that an event of the version without `reason` keeps its
    # fingerprint (a re-delivered copy is a duplicate, not a conflict).
    reason: Literal["refunded", "no_order", "already_referred"] = Field(
        "refunded", exclude_if=lambda reason: reason == "refunded"
    )


class CustomerRegistered(Envelope):
    event_type: Literal["customer.registered"]
    customer_segment: Identifier | None = None


class BlogCommented(Envelope):
    event_type: Literal["blog.commented"]
    comment_id: Identifier
    post_id: Identifier


class SocialShared(Envelope):
    event_type: Literal["social.shared"]
    share_id: Identifier
    network: Identifier


class FeedbackSubmitted(Envelope):
    event_type: Literal["feedback.submitted"]
    feedback_id: Identifier


class ClockTick(Envelope):
    event_type: Literal["clock.tick"]


class RedeemRequested(Envelope):
    event_type: Literal["points.redeem_requested"]
    redemption_id: Identifier
    points: Annotated[int, Field(strict=True, ge=1, le=points_request_max)]


Points = Annotated[int, Field(strict=True, ge=0, le=points_request_max)]


class RevaluedOrder(_Frozen):
    """What one order's awards are worth under a new rule set (`loyalty replay --apply`): points and points
    already reversed per line (by line key, `line:<index>`), and per order bonus (by rule id) its points, whether
    it was reversed and its spend threshold."""

    order_id: Identifier
    lines: Annotated[dict[Identifier, tuple[Points, Points]], Field(max_length=1000)]
    bonuses: Annotated[dict[Identifier, tuple[Points, StrictBool, Money | None]], Field(max_length=100)]
    # The refunds the values include (`refund:<id>` tags): an order refunded since, live, is not re-valued.
    refunds: Annotated[
        list[Annotated[str, StringConstraints(max_length=identifier_length_max + 16)]],
        Field(max_length=1000, default_factory=list, json_schema_extra={"default": []}),
    ]
    # Points the new rules hold pending: per line key or bonus rule, when its window ends and the points pending.
    pending: Annotated[
        dict[Identifier, tuple[EventTime, Points]],
        Field(max_length=1100, default_factory=dict, json_schema_extra={"default": {}}),
    ]
    # The order itself, for a worker that has no record of it (the old rules awarded it nothing): per line key
    # [sku, category, quantity, goods amount, quantity refunded], and when it was placed.
    details: Annotated[
        dict[Identifier, tuple[Identifier, Identifier | None, Quantity, Money, Points]],
        Field(max_length=1000, default_factory=dict, json_schema_extra={"default": {}}),
    ]
    placed_at: EventTime | None = None


# The sources a cap can limit (streams/rules/ruleset.py, `PromotionSource`).
CappedSource = Literal["purchase", "review", "referral", "registration", "blog_comment", "social_share", "feedback"]
PointsChange = Annotated[int, Field(strict=True, ge=-points_request_max, le=points_request_max)]


class CapUsageChange(_Frozen):
    """How the points counted against caps for one source on one local day change under a new rule set."""

    source: CappedSource
    day: Day
    points: PointsChange


# A compensation's restated lots: at most this many (older ones are merged into one: streams/replay.py,
# `_restated_fitting`), each within the ledger's limit (schemas/ledger.py, `ledger_points_max`), as the balance.
lots_restated_max = 2000
balance_restated_max = 10**12
LotPoints = Annotated[int, Field(strict=True, ge=1, le=balance_restated_max)]


class RestatedReferral(_Frozen):
    """The customer's own referral (as a referee) under a new rule set: who referred them with which event, the
    qualifying order, the points it earned and whether it was reversed."""

    referred_by: Identifier
    event_id: Identifier
    order_id: Identifier | None = None
    points: Points = 0
    reversed: StrictBool = False


class RestatedCustomer(_Frozen):
    """What a replay's compensation sets besides balances and orders (`loyalty replay --apply`): the change of the
    lifetime earned points (tiers by lifetime points), whether a first qualifying order is behind the customer
    (the first-order bonus), the change of the points counted against caps on the recent days, and what the
    customer's referrals earned under the new rules (what a reversal of them takes back): per referee as a referrer,
    and as a referee; with expiry by lot, the new rules' lots, and with expiry by inactivity, the last activity."""

    lifetime_earned_change: PointsChange = 0
    first_order_done: StrictBool = False
    cap_usage_changes: Annotated[
        list[CapUsageChange], Field(max_length=2000, default_factory=list, json_schema_extra={"default": []})
    ]
    referrer_points: Annotated[
        dict[Identifier, Points], Field(max_length=1000, default_factory=dict, json_schema_extra={"default": {}})
    ]
    referral: RestatedReferral | None = None
    # With a new rule set that expires points by lot: the customer's lots of available points under the new rules
    # ([awarded at, points left], oldest first) and the available balance they belong to (lots can hold more than a
    # balance that went below zero), so that expiry after the apply takes what the new rules' lots hold.
    lots: Annotated[list[tuple[EventTime, LotPoints]], Field(max_length=lots_restated_max)] | None = None
    lots_balance: Annotated[int, Field(strict=True, ge=-balance_restated_max, le=balance_restated_max)] = 0
    # With a new rule set that expires points after inactivity: the customer's last activity under the new rules
    # (null: none; absent: not restated), and the live one before the markers: a worker whose own differs from it
    # moved it with events since the markers, and keeps the later of the two.
    last_activity_at: EventTime | None = None
    live_last_activity_at: EventTime | None = None
    # With a new rule set that expires points: the newest event time of the replayed history (before the markers).
    # The worker's lots and activity after it come from events decided since the markers, and are kept.
    history_until: EventTime | None = None


class PointsAdjusted(Envelope):
    event_type: Literal["points.adjusted"]
    adjustment_id: Identifier
    points: Annotated[int, Field(strict=True, ge=-points_request_max, le=points_request_max)]
    note: ShortText
    actor: Identifier
    allow_negative: StrictBool = False  # an adjustment that would take the balance below zero needs this
    # A replay's compensation also re-values the customer's open orders, so that a later refund or cancellation
    # reverses what the new rules awarded (see docs/replay.md).
    revalued_orders: Annotated[list[RevaluedOrder], Field(max_length=10_000)] | None = None
    restated: RestatedCustomer | None = None


PurchaseEvent = Annotated[PurchaseCompleted | PurchaseRefunded | PurchaseCancelled, Field(discriminator="event_type")]
ReviewEvent = Annotated[ReviewApproved, Field(discriminator="event_type")]
ReferralEvent = Annotated[ReferralCompleted | ReferralReversed, Field(discriminator="event_type")]
EngagementEvent = Annotated[
    CustomerRegistered | BlogCommented | SocialShared | FeedbackSubmitted | ClockTick,
    Field(discriminator="event_type"),
]
RedemptionEvent = Annotated[RedeemRequested | PointsAdjusted, Field(discriminator="event_type")]

Event = (
    PurchaseCompleted
    | PurchaseRefunded
    | PurchaseCancelled
    | ReviewApproved
    | ReferralCompleted
    | ReferralReversed
    | CustomerRegistered
    | BlogCommented
    | SocialShared
    | FeedbackSubmitted
    | ClockTick
    | RedeemRequested
    | PointsAdjusted
)
AnyEvent = Annotated[Event, Field(discriminator="event_type")]
