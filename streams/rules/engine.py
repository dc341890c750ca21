"""The pure rules core: (customer state, event, rule set) -> ledger entries. No I/O, no clock, no randomness.

`decide` returns the entries an event produces for one customer without touching the state; `apply`
decides and then folds the entries into the state with `evolve`, which is what every driver calls.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Literal

from schemas import events as ev
from schemas.decode import EventRejected
from schemas.ledger import Kind, LedgerEntry, Source, ledger_entry_trusted, ledger_points_max
from streams.rules.ruleset import Cap, PurchaseRules, Rounding, RuleSet, SpendThreshold
from streams.rules.state import (
    COMPENSATION_ACTOR,
    COMPENSATION_PREFIX,
    HELD_PREFIX,
    RESTATE_PREFIX,
    RESTATE_RULE,
    REVALUE_PREFIX,
    REVALUE_RULE,
    CustomerState,
    OrderRecord,
    evolve,
    local_day,
    order_lots,
    referral_record,
    rolling_spend,
)

Side = Literal["customer", "referee"]

_rounding_modes = {Rounding.floor: ROUND_FLOOR, Rounding.nearest: ROUND_HALF_UP, Rounding.ceil: ROUND_CEILING}
_zero = Decimal(0)
_one = Decimal(1)
_micro = Decimal("0.000001")
_cap_kinds = (Kind.earned, Kind.pending)


def event_fingerprint(event: ev.Event) -> str:
    """A hash of the event's content: the same id with another fingerprint is a conflict, not a retry."""
    # The serializer itself: the same bytes as model_dump_json() without its argument handling and decode.
    return hashlib.blake2b(event.__pydantic_serializer__.to_json(event), digest_size=8).hexdigest()


def entry_id_for(event_id: str, customer_id: str, rule_id: str, ruleset_version: str, ordinal: int) -> str:
    """Deterministic entry id: a re-delivered event reproduces the same ids, so sinks de-duplicate it."""
    material = f"{event_id}\x1f{customer_id}\x1f{rule_id}\x1f{ruleset_version}\x1f{ordinal}"
    return hashlib.blake2b(material.encode(), digest_size=16).hexdigest()


_points_max = Decimal(ledger_points_max)
_points_min = -_points_max


def round_points(value: Decimal, rounding: Rounding, rule_id: str = "", field: str | None = None) -> int:
    """`value` rounded to whole points. Beyond the ledger's limit the event is rejected, naming the rule and the
    event's field (a purchase line) that earned it."""
    if not _points_min <= value <= _points_max:
        # Checked before rounding: a value of more than 28 digits cannot even be quantized.
        raise EventRejected(
            f"rule {rule_id} computes {value:,.0f} points for one ledger entry, beyond the ledger's limit of "
            f"{ledger_points_max:,} points (the rule set's rates and multipliers applied to the event's amounts)",
            field,
        )
    return int(value.quantize(_one, rounding=_rounding_modes[rounding]))


_shown_step, _shown_step_small = Decimal("0.0001"), Decimal("1e-12")


def _shown(amount: Decimal) -> str:
    """A decimal for explanations: at most 4 decimals, no exponent; a value that is not 0 is never shown as 0
    (a share of 0.00003 rounded up by `ceil` to 1 point showed "= 0 -> ceil 1")."""
    shown = amount.quantize(_shown_step)
    if not shown and amount:
        shown = amount.quantize(_shown_step_small)
    return format(shown.normalize(), "f")


def customer_of(event: ev.Event, side: Side) -> str:
    if side == "referee":
        assert isinstance(event, ev.ReferralCompleted), "only referrals have a referee side"
        return event.referee_id
    return event.customer_id


# Every field of a ledger entry but `schema_version`, in declaration order, as `ledger_entry_trusted` takes them: an
# entry's values are a copy of this with each key set. A dict display of 24 keys costs twice as much (0.9 us against
# 0.45): CPython builds it key by key, growing the table as it goes, where a copy takes the table as it is.
_entry_fields = dict.fromkeys(name for name in LedgerEntry.model_fields if name != "schema_version")


class _Entries:
    """Builds the entries of one event with correct running balances, sequence numbers and ids."""

    def __init__(self, state: CustomerState, event: ev.Event, ruleset: RuleSet, fingerprint: str) -> None:
        self.state = state
        self.event = event
        self.ruleset = ruleset
        self.fingerprint = fingerprint
        self.balance = state.balance
        self.pending = state.pending
        self.sequence = state.sequence
        self.entries: list[LedgerEntry] = []
        self.folded = 0  # how many of `entries` are already folded into `state` (released confirmations)
        # The fields all of the event's entries share; `add` copies this and sets the entry's own (see `_entry_fields`).
        shared = self.shared = _entry_fields.copy()
        shared["customer_id"] = state.customer_id
        shared["store_id"] = event.store_id
        shared["ruleset_version"] = ruleset.version
        shared["caused_by"] = event.event_id
        shared["event_type"] = event.event_type
        shared["fingerprint"] = fingerprint
        shared["occurred_at"] = event.occurred_at

    def add(
        self,
        kind: Kind,
        source: Source,
        rule_id: str,
        *,
        points: int = 0,
        pending_points: int = 0,
        explanation: str,
        order_id: str | None = None,
        sku: str | None = None,
        category: str | None = None,
        quantity: int | None = None,
        amount: Decimal | None = None,
        reference: str | None = None,
        available_at: datetime | None = None,
    ) -> None:
        self.sequence += 1
        self.balance += points
        self.pending += pending_points
        if not (
            -ledger_points_max <= self.balance <= ledger_points_max
            and -ledger_points_max <= self.pending <= ledger_points_max
            and -ledger_points_max <= points <= ledger_points_max
            and -ledger_points_max <= pending_points <= ledger_points_max
        ):
            self._beyond_limit(rule_id, points, pending_points)
        event = self.event
        customer_id = self.state.customer_id
        version = self.ruleset.version
        # Every value below is already of its field's type, so the entry is built without validating it again
        # (2-3 us per entry): the same entry, field by field (tests/rules/test_engine.py).
        values = self.shared.copy()
        values["entry_id"] = entry_id_for(event.event_id, customer_id, rule_id, version, len(self.entries))
        values["kind"] = kind
        values["sequence"] = self.sequence
        values["points"] = points
        values["balance_after"] = self.balance
        values["pending_points"] = pending_points
        values["pending_after"] = self.pending
        values["source"] = source
        values["rule_id"] = rule_id
        values["order_id"] = order_id
        values["sku"] = sku
        values["category"] = category
        values["quantity"] = quantity
        values["amount"] = None if amount is None else format(amount.quantize(_micro).normalize(), "f")
        values["reference"] = reference
        values["available_at"] = available_at
        values["explanation"] = explanation
        self.entries.append(ledger_entry_trusted(values))

    def _beyond_limit(self, rule_id: str, points: int, pending_points: int) -> None:
        """The event would take an entry or a balance beyond what the ledger holds: it is rejected, whole."""
        if abs(points) > ledger_points_max or abs(pending_points) > ledger_points_max:
            what = f"an entry of {points or pending_points:,} points"
        elif abs(self.pending) > ledger_points_max:
            what = f"the pending balance to {self.pending:,}"
        else:
            what = f"the balance to {self.balance:,}"
        raise EventRejected(
            f"rule {rule_id} would take {what} for customer {self.state.customer_id}, beyond the ledger's limit "
            f"of {ledger_points_max:,} points (a ledger entry or balance holds at most that many)"
        )

    def reverse(
        self,
        points: int,
        *,
        pending: bool,
        explanation: str,
        source: Source = Source.purchase,
        rule_id: str = "purchase.reversal",
        **detail: object,
    ) -> None:
        """Reverse `points` from the bucket they sit in: the pending balance or the available one."""
        self.add(
            Kind.reversed,
            source,
            rule_id,
            points=0 if pending else -points,
            pending_points=-points if pending else 0,
            explanation=explanation,
            **detail,  # type: ignore[arg-type]
        )

    def record(self, source: Source, rule_id: str, explanation: str, **detail: object) -> None:
        """A 0-point entry: the event was applied and earned nothing; the history says why."""
        self.add(Kind.recorded, source, rule_id, explanation=explanation, **detail)  # type: ignore[arg-type]


# --- caps and promotions -------------------------------------------------------------------------


def _period_days(cap: Cap, moment: datetime, ruleset: RuleSet) -> list:
    day = local_day(moment, ruleset.zone)
    if cap.period == "day":
        return [day]
    if cap.period == "week":
        start = day - timedelta(days=day.weekday())
        return [start + timedelta(days=offset) for offset in range(7)]
    start = day.replace(day=1)
    days = []
    current = start
    while current.month == start.month:
        days.append(current)
        current += timedelta(days=1)
    return days


def _cap_room(state: CustomerState, entries: _Entries, source: Source, ruleset: RuleSet) -> tuple[int | None, str]:
    """Points the customer may still earn from `source` now, under the tightest cap (None: no cap)."""
    room: int | None = None
    description = ""
    moment = entries.event.occurred_at
    value = source._value_  # the value without enum's `value` property (a Python call per access)
    for cap in ruleset.caps_by_source.get(value, ()):
        days = set(_period_days(cap, moment, ruleset))
        used = sum(
            points for (used_source, day), points in state.cap_usage.items() if used_source == value and day in days
        )
        used += sum(
            entry.points + entry.pending_points
            for entry in entries.entries
            if entry.source is source and entry.kind in _cap_kinds
        )
        left = max(0, cap.points_max - used)
        if room is None or left < room:
            room = left
            description = f"cap {cap.points_max}/{cap.period}, {used} used"
    return room, description


def _capped(state: CustomerState, entries: _Entries, source: Source, points: int) -> tuple[int, str]:
    room, description = _cap_room(state, entries, source, entries.ruleset)
    if room is None or points <= room:
        return points, "" if room is None else f"; {description}"
    return room, f"; capped from {points} to {room} ({description})"


def _promotions(ruleset: RuleSet, source: Source, moment: datetime) -> list:
    if not ruleset.promotions:
        return []
    value = source._value_
    return [p for p in ruleset.promotions if value in p.sources and p.active_at(moment)]


def _eligible(state: CustomerState, event: ev.Event, ruleset: RuleSet) -> tuple[bool, str]:
    # The event's own segment (purchases and registrations carry one) from its fields: `getattr` with a default on a
    # model without the field goes through pydantic's `__getattr__`, which raises and catches: about 4 us per event.
    segment = event.__dict__.get("customer_segment") or state.segment
    if segment is not None and segment in ruleset.eligibility.excluded_segments:
        return False, f"segment {segment!r} does not earn points"
    return True, ""


def _fixed_award(entries: _Entries, source: Source, rule_id: str, base: int, what: str, **detail: object) -> None:
    """A fixed award with promotions and caps, or a 0-point record explaining why there was none."""
    state, event, ruleset = entries.state, entries.event, entries.ruleset
    eligible, why = _eligible(state, event, ruleset)
    if not eligible:
        entries.record(source, "eligibility", f"{what}: {why}", **detail)
        return
    if base == 0:
        entries.record(source, rule_id, f"{what}: this rule set awards no points for it", **detail)
        return
    points = Decimal(base)
    arithmetic = f"{what}: {base}"
    for promotion in _promotions(ruleset, source, event.occurred_at):
        if promotion.multiplier != 1:
            points *= promotion.multiplier
            arithmetic += f" x {promotion.multiplier} ({promotion.id})"
    rounded = round_points(points, ruleset.rounding, rule_id)
    if points != base:
        arithmetic += f" = {_shown(points)} -> {ruleset.rounding._value_} {rounded}"
    awarded, cap_note = _capped(state, entries, source, rounded)
    if awarded > 0:
        entries.add(Kind.earned, source, rule_id, points=awarded, explanation=arithmetic + cap_note, **detail)  # type: ignore[arg-type]
    else:
        entries.record(source, rule_id, arithmetic + cap_note, **detail)
    for promotion in _promotions(ruleset, source, event.occurred_at):
        if promotion.bonus:
            bonus, bonus_cap = _capped(state, entries, source, promotion.bonus)
            if bonus > 0:
                entries.add(
                    Kind.earned,
                    source,
                    f"promotion:{promotion.id}",
                    points=bonus,
                    explanation=f"promotion {promotion.id} bonus {promotion.bonus}{bonus_cap}",
                    **detail,  # type: ignore[arg-type]
                )


# --- purchases -----------------------------------------------------------------------------------


def _purchase_completed(entries: _Entries, event: ev.PurchaseCompleted) -> None:
    state, ruleset = entries.state, entries.ruleset
    rules = ruleset.purchase
    order_detail = {"order_id": event.order_id}
    if event.order_id in state.orders:
        entries.record(
            Source.purchase,
            "purchase.duplicate_order",
            "order already recorded by an earlier event",
            **order_detail,
        )
        return
    line_totals = [line.unit_price * line.quantity for line in event.lines]
    subtotal = sum(line_totals, _zero)
    discount = min(event.discount_total, subtotal)
    order_total = subtotal - discount
    eligible, why = _eligible(state, event, ruleset)
    if not eligible:
        entries.record(Source.purchase, "purchase.not_qualifying", why, **order_detail)
        return
    if order_total < rules.minimum_order_total:
        entries.record(
            Source.purchase,
            "purchase.not_qualifying",
            f"order total {order_total} is below the minimum of {rules.minimum_order_total}",
            **order_detail,
        )
        return

    basis = rules.basis
    earning_total = subtotal - discount if basis.after_discounts else subtotal
    if basis.include_tax:
        earning_total += event.tax_total
    if basis.include_shipping:
        earning_total += event.shipping_total
    if basis.include_fees:
        earning_total += event.fee_total
    earning_total = max(_zero, earning_total - event.paid_with_points - event.paid_with_store_credit)
    # Each line's share of the earning total is computed as line_total * earning_total / subtotal, multiplying
    # first: Decimal division is correctly rounded at 28 digits, so rounding the result to whole points is
    # exact for any realistic order (no 54.99999... where 55 is meant).
    full_share = earning_total == subtotal

    promotions = _promotions(ruleset, Source.purchase, event.occurred_at)
    tier = _current_tier(state, ruleset, event.occurred_at)
    tier_multiplier = tier.multiplier if tier is not None else _one
    promotion_multiplier = _one
    for promotion in promotions:
        promotion_multiplier *= promotion.multiplier
    pending = rules.pending_days > 0
    available_at = event.occurred_at + timedelta(days=rules.pending_days) if pending else None
    room = rules.maximum_points_per_order
    cap_room, cap_description = _cap_room(state, entries, Source.purchase, ruleset)
    cap_room_first = cap_room

    shown_default_rate = f"x rate {rules.points_per_unit.normalize():f}"  # for lines at the default rate, once
    for index, line in enumerate(event.lines):
        line_total = line_totals[index]
        line_base = line_total * earning_total / subtotal if subtotal and not full_share else line_total
        product = rules.products.get(line.sku)
        category = rules.categories.get(line.category)
        if product is not None and product.excluded:
            rule_id, raw, arithmetic = (
                f"purchase.product:{line.sku}",
                _zero,
                f"product {line.sku} is excluded",
            )
        elif product is not None and product.fixed_points is not None:
            raw = Decimal(product.fixed_points * line.quantity) * promotion_multiplier
            rule_id = f"purchase.product:{line.sku}"
            arithmetic = f"{line.quantity} x {product.fixed_points} fixed points"
        elif category is not None and category.excluded:
            rule_id, raw, arithmetic = (
                f"purchase.category:{line.category}",
                _zero,
                f"category {line.category} is excluded",
            )
        else:
            rate = rules.points_per_unit
            rule_id = "purchase.rate"
            # `!s`: a Decimal's str(), which is its format() with no spec, in a third of the time (no spec to parse).
            arithmetic = f"{line.quantity} x {line.unit_price!s} = {line_total!s}"
            if not full_share:
                arithmetic += f"; share of earning total {earning_total!s}/{subtotal!s} -> {_shown(line_base)}"
            shown_rate = shown_default_rate
            if category is not None:
                rule_id = f"purchase.category:{line.category}"
                if category.rate is not None:
                    rate = category.rate
                    shown_rate = f"x rate {rate.normalize():f} ({line.category})"
                if category.multiplier != 1:
                    shown_rate += f" x {category.multiplier.normalize():f} ({line.category} multiplier)"
                rate *= category.multiplier
            raw = line_base * rate * promotion_multiplier * tier_multiplier
            arithmetic += f"; {shown_rate}"
            if tier_multiplier != 1:
                arithmetic += f" x tier {tier.name} {tier_multiplier.normalize():f}"  # type: ignore[union-attr]
        if promotion_multiplier != 1 and raw:
            arithmetic += f" x promotions {promotion_multiplier.normalize():f} ({', '.join(p.id for p in promotions)})"
        points = round_points(raw, ruleset.rounding, rule_id, f"lines.{index}")
        arithmetic += f" = {_shown(raw)} -> {ruleset.rounding._value_} {points}"
        if room is not None and points > room:
            arithmetic += f"; order maximum leaves {room}"
            points = room
        if cap_room is not None and points > cap_room:
            # The cap's use so far counts this order's earlier lines too.
            used_here = f" + {cap_room_first - cap_room} by this order" if cap_room_first != cap_room else ""  # type: ignore[operator]
            arithmetic += f"; capped to {cap_room} ({cap_description}{used_here})"
            points = cap_room
        if room is not None:
            room -= points
        if cap_room is not None:
            cap_room -= points
        kind = Kind.recorded if points == 0 else Kind.pending if pending else Kind.earned
        entries.add(
            kind,
            Source.purchase,
            rule_id,
            points=0 if pending else points,
            pending_points=points if pending else 0,
            available_at=available_at,
            explanation=arithmetic,
            order_id=event.order_id,
            sku=line.sku,
            category=line.category,
            quantity=line.quantity,
            amount=line_total * order_total / subtotal if subtotal else _zero,
            reference=f"line:{index}",
        )

    bonuses: list[tuple[str, int, Decimal | None, str]] = []
    if rules.first_order_bonus and not state.first_order_done:
        bonuses.append(("purchase.first_order_bonus", rules.first_order_bonus, None, "first qualifying order"))
    best = _threshold_reached(rules, order_total)
    if best is not None:
        bonuses.append(
            (
                "purchase.threshold_bonus",
                best.bonus,
                best.minimum_total,
                f"order total {order_total!s} reaches the {best.minimum_total!s} threshold",
            )
        )
    for promotion in promotions:
        if promotion.bonus:
            bonuses.append((f"promotion:{promotion.id}", promotion.bonus, None, f"promotion {promotion.id} bonus"))
    for rule_id, bonus, threshold, why in bonuses:
        awarded, cap_note = _capped(state, entries, Source.purchase, bonus)
        entries.add(
            Kind.recorded if awarded == 0 else Kind.pending if pending else Kind.earned,
            Source.purchase,
            rule_id,
            points=0 if pending else awarded,
            pending_points=awarded if pending else 0,
            available_at=available_at,
            explanation=f"{why}: {bonus}{cap_note}",
            order_id=event.order_id,
            amount=threshold,
        )


def _reverse_order(entries: _Entries, order_id: str, order: OrderRecord, refund_tag: str, why: str) -> int:
    """Reverse everything the order still holds; returns how many entries were posted."""
    posted = 0
    for key, line in order.lines.items():
        left = line.points - line.points_reversed
        quantity_left = line.quantity - line.quantity_refunded
        if left == 0 and quantity_left == 0:
            continue
        entries.reverse(
            left,
            pending=line.pending,
            explanation=f"{why}: reverses the remaining {left} points of {line.sku}",
            order_id=order_id,
            sku=line.sku,
            category=line.category,
            quantity=quantity_left,
            amount=line.amount * quantity_left / line.quantity if line.quantity else _zero,
            reference=f"{key};{refund_tag}",
        )
        posted += 1
    for rule_id, bonus in order.bonuses.items():
        if bonus.reversed:
            continue
        entries.reverse(
            bonus.points,
            pending=bonus.pending,
            explanation=f"{why}: reverses {rule_id} ({bonus.points} points)",
            order_id=order_id,
            reference=f"{rule_id};{refund_tag}",
        )
        posted += 1
    return posted


def _purchase_refunded(entries: _Entries, event: ev.PurchaseRefunded) -> None:
    state = entries.state
    order = state.orders.get(event.order_id)
    tag = f"refund:{event.refund_id}"
    if order is None:
        _hold(entries, event.order_id, {"refund_id": event.refund_id, "lines": _refund_lines(event)})
        return
    if tag in order.refund_ids:
        entries.record(
            Source.purchase,
            "purchase.refund_repeated",
            f"refund {event.refund_id} was already applied",
            order_id=event.order_id,
            reference=f";{tag}",
        )
        return
    if event.lines is None:
        if not _reverse_order(entries, event.order_id, order, tag, f"full refund {event.refund_id}"):
            entries.record(
                Source.purchase,
                "purchase.reversal",
                "nothing left to reverse",
                order_id=event.order_id,
                reference=f";{tag}",
            )
        _reverse_referral(entries, event.order_id, order, closed=True)
        return
    posted = 0
    wanted = {}
    for refund_line in event.lines:
        wanted[refund_line.sku] = wanted.get(refund_line.sku, 0) + refund_line.quantity
    remaining_total = order.remaining_goods_total()
    refunded_now: dict[str, int] = {}
    for key, line in order.lines.items():
        quantity = min(wanted.get(line.sku, 0), line.quantity - line.quantity_refunded)
        if quantity <= 0:
            continue
        wanted[line.sku] -= quantity
        refunded_now[key] = quantity
        refunded_after = line.quantity_refunded + quantity
        # Reverse the cumulative proportional share, so that successive partial refunds add up to
        # exactly the line's points when the whole quantity has been refunded.
        target = line.points if refunded_after == line.quantity else line.points * refunded_after // line.quantity
        delta = target - line.points_reversed
        remaining_total -= line.amount * quantity / line.quantity
        entries.reverse(
            delta,
            pending=line.pending,
            explanation=(
                f"refund {event.refund_id}: {quantity} of {line.quantity} x {line.sku}; "
                f"{line.points} x {refunded_after}/{line.quantity} = {target}, {line.points_reversed} already reversed"
            ),
            order_id=event.order_id,
            sku=line.sku,
            category=line.category,
            quantity=quantity,
            amount=line.amount * quantity / line.quantity,
            reference=f"{key};{tag}",
        )
        posted += 1
    fully_refunded = all(
        line.quantity_refunded + refunded_now.get(key, 0) >= line.quantity for key, line in order.lines.items()
    )
    for rule_id, bonus in order.bonuses.items():
        if bonus.reversed:
            continue
        lost = fully_refunded or (bonus.threshold is not None and remaining_total < bonus.threshold)
        if not lost:
            continue
        lower = None
        if not fully_refunded and bonus.threshold is not None:
            lower = _threshold_reached(entries.ruleset.purchase, remaining_total)
        kept = 0 if lower is None else min(lower.bonus, bonus.points)
        if lower is not None and kept == bonus.points:
            continue  # a bonus capped at or below the lower threshold's keeps its value (until a full refund)
        if lower is not None and kept > 0:
            # The order still reaches a lower threshold: the bonus drops to that one's, as if the order had been
            # this size from the start (before, it was reversed whole).
            entries.reverse(
                bonus.points - kept,
                pending=bonus.pending,
                explanation=(
                    f"refund {event.refund_id}: {rule_id} {bonus.points} -> {kept}: order total "
                    f"{remaining_total:.2f} is now below {bonus.threshold} and reaches {lower.minimum_total}"
                ),
                order_id=event.order_id,
                amount=lower.minimum_total,
                reference=f"{rule_id};{tag}",
            )
            posted += 1
            continue
        reason = (
            "the order is fully refunded"
            if fully_refunded
            else f"order total {remaining_total:.2f} is now below {bonus.threshold}"
        )
        entries.reverse(
            bonus.points,
            pending=bonus.pending,
            explanation=f"refund {event.refund_id}: reverses {rule_id} because {reason}",
            order_id=event.order_id,
            reference=f"{rule_id};{tag}",
        )
        posted += 1
    # Quantities the order does not have (an unknown sku, more units than are left): said, not silently dropped.
    unmatched = ", ".join(f"{quantity} x {sku}" for sku, quantity in wanted.items() if quantity > 0)
    unmatched_note = f"; not in the order or more than is left of it: {unmatched}" if unmatched else ""
    if not posted:
        entries.record(
            Source.purchase,
            "purchase.reversal",
            f"nothing left to reverse for these lines{unmatched_note}",
            order_id=event.order_id,
            reference=f";{tag}",
        )
    elif unmatched:
        entries.record(
            Source.purchase,
            "purchase.refund_unmatched",
            f"refund {event.refund_id}{unmatched_note}",
            order_id=event.order_id,
            reference=f";{tag}",
        )
    _reverse_referral(entries, event.order_id, order, closed=fully_refunded)


def _threshold_reached(rules: PurchaseRules, total: Decimal) -> SpendThreshold | None:
    """The highest spend threshold `total` reaches (None: none); the rule set keeps them sorted by minimum total."""
    for threshold in reversed(rules.spend_thresholds):  # the last one reached, sorted or not
        if total >= threshold.minimum_total:
            return threshold
    return None


def _purchase_completed_and_held(entries: _Entries, event: ev.PurchaseCompleted) -> None:
    held = (entries.state.held or {}).get(event.order_id)
    _purchase_completed(entries, event)
    if held:
        _apply_held(entries, event, held)


def _refund_lines(event: ev.PurchaseRefunded) -> list[list] | None:
    return None if event.lines is None else [[line.sku, line.quantity] for line in event.lines]


def _hold(entries: _Entries, order_id: str, held: dict) -> None:
    """A refund or cancellation of an order the customer has no record of: the order may not have arrived yet
    (another system's clock, or a refund listed before its purchase at the same instant), or it earned nothing.
    It is recorded with what it asks (`held:` and JSON in the reference), folded into the state, and applied by the
    purchase if it arrives (`_apply_held`): before, the customer kept the points of a refunded order for good."""
    cancel = held.get("cancel", False)
    known = (entries.state.held or {}).get(order_id, ())
    what = "cancellation" if cancel else f"refund {held['refund_id']}"
    if held in known or (not cancel and any(item.get("refund_id") == held["refund_id"] for item in known)):
        entries.record(
            Source.purchase,
            "purchase.cancel_repeated" if cancel else "purchase.refund_repeated",
            f"{what} is already held until the order arrives",
            order_id=order_id,
        )
        return
    orders_held = len(entries.state.held or ())
    if len(known) >= held_per_order_max or (not known and orders_held >= held_orders_max):
        explanation = f"no points were awarded for this order; {what} not held (the customer's limit is reached)"
        reference = None
    else:
        explanation = f"no points were awarded for this order; {what} is held and applied if the order arrives"
        reference = HELD_PREFIX + json.dumps(held, separators=(",", ":"))
    entries.record(
        Source.purchase,
        "purchase.cancel_unknown_order" if cancel else "purchase.refund_unknown_order",
        explanation,
        order_id=order_id,
        reference=reference,
    )


# State memory stays bounded: refunds and cancellations held for one unknown order, and unknown orders held per
# customer (refunds of orders that earned nothing, below a minimum order total say, stay held).
held_per_order_max = 20
held_orders_max = 200


def _apply_held(entries: _Entries, event: ev.PurchaseCompleted, held: list[dict]) -> None:
    """The order's refunds and cancellation that arrived before it, applied now in the order they arrived, on a
    state with the purchase's own entries folded in (they made the order's record)."""
    base = {"event_id": event.event_id, "occurred_at": event.occurred_at, "customer_id": event.customer_id,
            "store_id": event.store_id, "schema_version": event.schema_version, "order_id": event.order_id}  # fmt: skip
    for item in held:
        # Each on the state with everything before it folded in: a second refund of a line sees the first.
        preview = _clone_for_preview(entries.state, entries.entries[entries.folded :], entries.ruleset)
        if event.order_id not in preview.orders:
            return  # the order earned nothing and has no record: they stay held
        entries.state, entries.folded = preview, len(entries.entries)
        if item.get("cancel"):
            _purchase_cancelled(entries, ev.PurchaseCancelled.model_construct(event_type="purchase.cancelled", **base))
            continue
        lines = item["lines"]
        refund = ev.PurchaseRefunded.model_construct(
            event_type="purchase.refunded",
            refund_id=item["refund_id"],
            lines=None if lines is None else [ev.RefundLine.model_construct(sku=s, quantity=q) for s, q in lines],
            **base,
        )
        _purchase_refunded(entries, refund)


def _purchase_cancelled(entries: _Entries, event: ev.PurchaseCancelled) -> None:
    order = entries.state.orders.get(event.order_id)
    tag = "cancel"
    if order is None:
        _hold(entries, event.order_id, {"cancel": True})
        return
    if order.cancelled:
        entries.record(
            Source.purchase,
            "purchase.cancel_repeated",
            "the order was already cancelled: nothing left to reverse",
            order_id=event.order_id,
            reference=f";{tag}",
        )
    elif not _reverse_order(entries, event.order_id, order, tag, "order cancelled"):
        entries.record(
            Source.purchase,
            "purchase.reversal",
            "order cancelled: nothing left to reverse (refunded in full before)",
            order_id=event.order_id,
            reference=f";{tag}",
        )
    _reverse_referral(entries, event.order_id, order, closed=True)


# --- other sources -------------------------------------------------------------------------------


def _review(entries: _Entries, event: ev.ReviewApproved) -> None:
    detail = {"sku": event.sku, "reference": event.review_id}
    if event.sku in entries.state.reviewed_skus:
        entries.record(
            Source.review,
            "review.first_per_product",
            f"already reviewed {event.sku}; only the first review earns",
            **detail,
        )
        return
    _fixed_award(
        entries,
        Source.review,
        "review.first_per_product",
        entries.ruleset.fixed.review,
        f"approved review of {event.sku}",
        **detail,
    )


def _referral(entries: _Entries, event: ev.ReferralCompleted, side: Side) -> None:
    state, rules = entries.state, entries.ruleset.referral
    if event.referee_id == event.customer_id:
        entries.record(
            Source.referral,
            "referral.self",
            "self-referral earns nothing",
            order_id=event.order_id,
            reference=event.referee_id,
        )
        return
    if side == "referee":
        if state.referred_by is not None:
            entries.record(
                Source.referral,
                "referral.referee.already_referred",
                f"already referred by {state.referred_by}",
                order_id=event.order_id,
                reference=event.customer_id,
            )
            return
        # Referral guard (issue 5, intended): the referee's qualifying order must exist in the referee's own
        # state, so the referee is only rewarded after a recorded purchase with that order id.
        if event.order_id not in state.orders:
            entries.record(
                Source.referral,
                "referral.referee.no_order",
                f"qualifying order {event.order_id} not found for {state.customer_id}",
                order_id=event.order_id,
                reference=event.customer_id,
            )
            return
        order = state.orders[event.order_id]
        if _refunded_inside_window(order, entries.ruleset):
            # The referrer's reward is reversed on the referrer's partition: this record makes the drivers
            # publish a derived referral.reversed event (see `derived_events`).
            entries.record(
                Source.referral,
                "referral.referee.order_refunded",
                f"qualifying order {event.order_id} was refunded or cancelled within "
                f"{entries.ruleset.referral_return_window_days} days; the referral earns nothing for either side",
                order_id=event.order_id,
                reference=event.customer_id,
            )
            return
        eligible, why = _eligible(state, event, entries.ruleset)
        if not eligible:
            # The referral stands and earns the referee nothing: recorded under the referee rule, it marks the
            # customer as referred (`state._evolve_referral`), so a second referrer's reward is withdrawn (it
            # was kept before, by every referrer of an excluded customer) and a refund reverses the referrer's.
            entries.record(
                Source.referral,
                "referral.referee",
                f"referred by {event.customer_id}: {why}",
                order_id=event.order_id,
                reference=event.customer_id,
            )
            return
        _fixed_award(
            entries,
            Source.referral,
            "referral.referee",
            rules.referee_points,
            f"referred by {event.customer_id}",
            order_id=event.order_id,
            reference=event.customer_id,
        )
        return
    if event.referee_id in state.referees_reversed:
        entries.record(
            Source.referral,
            "referral.referrer.reversed",
            f"the referral of {event.referee_id} was reversed (its qualifying order was refunded)",
            order_id=event.order_id,
            reference=event.referee_id,
        )
        return
    if event.referee_id in state.referees:
        entries.record(
            Source.referral,
            "referral.referrer",
            f"{event.referee_id} was already rewarded",
            order_id=event.order_id,
            reference=event.referee_id,
        )
        return
    _fixed_award(
        entries,
        Source.referral,
        "referral.referrer",
        rules.referrer_points,
        f"referred {event.referee_id}",
        order_id=event.order_id,
        reference=event.referee_id,
    )


def _inside_referral_window(order: OrderRecord, moment: datetime | None, ruleset: RuleSet) -> bool:
    """`moment` is within the referral return window of the order (never, when the window is 0)."""
    window = ruleset.referral_return_window_days
    if not window or moment is None or order.placed_at is None:
        return False
    return moment <= order.placed_at + timedelta(days=window)


def _refunded_inside_window(order: OrderRecord, ruleset: RuleSet) -> bool:
    """The order no longer stands, and it stopped standing inside the referral return window."""
    return _inside_referral_window(order, order.closed_at, ruleset)


def _reverse_referral(entries: _Entries, order_id: str, order: OrderRecord, closed: bool) -> None:
    """Referee side: the qualifying order of the customer's referral was just fully refunded or cancelled."""
    state, event = entries.state, entries.event
    if not closed or state.referral_order != order_id or state.referral_reversed or state.referred_by is None:
        return
    if not _inside_referral_window(order, event.occurred_at, entries.ruleset):
        return
    window = entries.ruleset.referral_return_window_days
    explanation = f"referral by {state.referred_by} reversed: qualifying order {order_id} refunded within {window} days"
    detail = {"order_id": order_id, "reference": state.referred_by}
    if state.referral_points:
        entries.reverse(
            state.referral_points,
            pending=False,
            explanation=explanation,
            source=Source.referral,
            rule_id="referral.referee.reversal",
            **detail,
        )
    else:
        entries.record(Source.referral, "referral.referee.reversal", explanation, **detail)


def _referral_reversed(entries: _Entries, event: ev.ReferralReversed) -> None:
    """Referrer side: the referral does not stand on the referee's side; take back what it earned."""
    state, referee = entries.state, event.referee_id
    detail = {"order_id": event.order_id, "reference": referee}
    if event.reason != "refunded":
        why = (
            f"{referee} has no recorded order {event.order_id} yet"
            if event.reason == "no_order"
            else f"{referee} was already referred by another customer"
        )
        awarded = state.referees.get(referee, 0) if referee not in state.referees_reversed else 0
        if awarded:
            entries.add(
                Kind.reversed,
                Source.referral,
                "referral.referrer.withdrawn",
                points=-awarded,
                explanation=f"referral of {referee} withdrawn: {why}",
                **detail,  # type: ignore[arg-type]
            )
        else:
            entries.record(Source.referral, "referral.referrer.withdrawn", f"nothing to withdraw: {why}", **detail)
        return
    if referee in state.referees_reversed:
        entries.record(
            Source.referral, "referral.referrer.reversal", f"the referral of {referee} was already reversed", **detail
        )
        return
    awarded = state.referees.get(referee)
    if not awarded:
        entries.record(
            Source.referral,
            "referral.referrer.reversal",
            f"qualifying order {event.order_id} of {referee} was refunded; nothing was earned for referring "
            f"{referee}, and a later referral of {referee} earns nothing",
            **detail,
        )
        return
    entries.reverse(
        awarded,
        pending=False,
        explanation=f"referral of {referee} reversed: their qualifying order {event.order_id} was refunded",
        source=Source.referral,
        rule_id="referral.referrer.reversal",
        **detail,
    )


# Referee-side decisions that the referrer's side must follow, and the reason the derived event carries.
_derived_reasons = {
    "referral.referee.reversal": "refunded",
    "referral.referee.order_refunded": "refunded",
    "referral.referee.no_order": "no_order",
    "referral.referee.already_referred": "already_referred",
}


def derived_event_id(referral_event_id: str, restated: bool = False) -> str:
    """The id of the `referral.reversed` event derived for a referral event: `<referral event>:reversed`.

    A referral decided once on the referee's side derives at most one such event (withdrawn when it arrives, or
    reversed by a later refund), so the referral's event id names it. A referral a replay's apply restated on a
    referee whose own entries never recorded it (`CustomerState.referral_restated`: the worker withdrew it, and the
    new rules reward it) can derive a second one, its reversal by a refund after the apply, named
    `<referral event>:reversed:restated` so that the referrer does not refuse it as a conflicting repeat of the
    withdrawal. Every other id is unchanged (ledgers already written keep their entry ids).
    """
    candidate = f"{referral_event_id}:reversed:restated" if restated else f"{referral_event_id}:reversed"
    if len(candidate) <= ev.identifier_length_max:
        return candidate
    prefix = "reversed-restated:" if restated else "reversed:"
    return prefix + hashlib.blake2b(referral_event_id.encode(), digest_size=16).hexdigest()


def derived_events(state: CustomerState, event: ev.Event, entries: list[LedgerEntry]) -> list[ev.ReferralReversed]:
    """Events the drivers must publish for other customers after applying `event` (state already evolved).

    When a referee's qualifying order is refunded inside the return window (or was, before the referral
    arrived), the referrer's reward is reversed on the referrer's own partition: this returns the
    `referral.reversed` event for it. Pure, and the same in every driver.
    """
    derived = []
    for entry in entries:
        reason = _derived_reasons.get(entry.rule_id)
        if reason is None:
            continue
        if reason == "already_referred" and entry.reference == state.referred_by:
            continue  # the same referrer again: its own side already says the referee was rewarded
        arriving = isinstance(event, ev.ReferralCompleted)  # else a refund reversing the customer's own referral
        referral_event = event.event_id if arriving else state.referral_event
        assert referral_event is not None and entry.reference and entry.order_id
        derived.append(
            ev.ReferralReversed(
                event_id=derived_event_id(referral_event, restated=not arriving and state.referral_restated),
                event_type="referral.reversed",
                schema_version=1,
                occurred_at=event.occurred_at,
                customer_id=entry.reference,
                store_id=event.store_id,
                referee_id=state.customer_id,
                order_id=entry.order_id,
                referral_event_id=referral_event,
                reason=reason,
            )
        )
    return derived


def _registration(entries: _Entries, event: ev.CustomerRegistered) -> None:
    reference = f"segment:{event.customer_segment}" if event.customer_segment else None
    if entries.state.registered:
        entries.record(Source.registration, "registration", "already registered", reference=reference)
        return
    _fixed_award(
        entries,
        Source.registration,
        "registration",
        entries.ruleset.fixed.registration,
        "registration",
        reference=reference,
    )


def _blog_comment(entries: _Entries, event: ev.BlogCommented) -> None:
    if event.post_id in entries.state.commented_posts:
        entries.record(
            Source.blog_comment,
            "blog_comment.first_per_post",
            f"already commented on {event.post_id}",
            reference=event.post_id,
        )
        return
    _fixed_award(
        entries,
        Source.blog_comment,
        "blog_comment.first_per_post",
        entries.ruleset.fixed.blog_comment,
        f"comment on {event.post_id}",
        reference=event.post_id,
    )


def _social_share(entries: _Entries, event: ev.SocialShared) -> None:
    _fixed_award(
        entries,
        Source.social_share,
        "social_share",
        entries.ruleset.fixed.social_share,
        f"share on {event.network}",
        reference=event.share_id,
    )


def _feedback(entries: _Entries, event: ev.FeedbackSubmitted) -> None:
    _fixed_award(
        entries,
        Source.feedback,
        "feedback",
        entries.ruleset.fixed.feedback,
        "feedback",
        reference=event.feedback_id,
    )


def _redeem(entries: _Entries, event: ev.RedeemRequested) -> None:
    state, rules = entries.state, entries.ruleset.redemption
    reference = event.redemption_id

    def reject(reason: str) -> None:
        entries.add(
            Kind.redemption_rejected,
            Source.redemption,
            "redemption",
            explanation=f"rejected: {reason}",
            reference=reference,
        )

    if reference in state.redemption_ids:
        entries.record(
            Source.redemption,
            "redemption",
            f"redemption {reference} was already decided",
            reference=reference,
        )
    elif event.points < rules.minimum_points:
        reject(f"{event.points} points is below the minimum of {rules.minimum_points}")
    elif rules.maximum_points is not None and event.points > rules.maximum_points:
        reject(f"{event.points} points is above the maximum of {rules.maximum_points}")
    elif entries.balance < event.points:
        waiting = f" ({entries.pending} pending points cannot be redeemed yet)" if entries.pending > 0 else ""
        reject(f"available balance {entries.balance} does not cover {event.points}{waiting}")
    else:
        value = rules.point_value * event.points
        entries.add(
            Kind.redeemed,
            Source.redemption,
            "redemption",
            points=-event.points,
            amount=value,
            reference=reference,
            explanation=f"{event.points} points x {rules.point_value} = {value} of store currency",
        )


def _adjust(entries: _Entries, event: ev.PointsAdjusted) -> None:
    reference = event.adjustment_id
    note = f"by {event.actor}: {event.note}"[:300]
    if reference in entries.state.adjustment_ids:
        entries.record(
            Source.adjustment,
            "adjustment",
            f"adjustment {reference} was already applied",
            reference=reference,
        )
    elif entries.balance + event.points < 0 and not event.allow_negative:
        entries.record(
            Source.adjustment,
            "adjustment.refused",
            f"refused: would take the balance {entries.balance} below zero ({note})",
            reference=reference,
        )
    else:
        entries.add(
            Kind.adjusted,
            Source.adjustment,
            "adjustment",
            points=event.points,
            reference=reference,
            explanation=note,
        )
        for revalued in event.revalued_orders or ():
            _revalue_order(entries, revalued)
        if event.restated is not None:
            _restate(entries, event.restated)


def _restate(entries: _Entries, restated: ev.RestatedCustomer) -> None:
    """A replay's compensation carries the change of lifetime earned points under the new rules (before the cut-over
    markers, so events decided since are kept) and whether they count a first qualifying order: a 0-point entry
    that folding applies (`state._restate`), so that tiers by lifetime points and the first-order bonus decide later
    events as under the new rules, and the change of the points counted against caps on the days a cap can still
    look at, so that a capped source earns after the apply what it earns under the new rules, and what the customer's
    referrals earned under the new rules, so that a referral reversed after the apply takes back the new rules'
    points, with expiry by lot the new rules' lots, so that expiry after the apply takes what they hold, and with
    expiry by inactivity the last activity. The tier itself is reviewed at the customer's next event."""
    state = entries.state
    change = restated.lifetime_earned_change
    first = restated.first_order_done if restated.first_order_done != state.first_order_done else None
    caps = [[usage.source, usage.day.isoformat(), usage.points] for usage in restated.cap_usage_changes if usage.points]
    # What referring each customer earned under the new rules (not reversed): what a reversal after the apply takes
    # back, and a referral of them already rewarded. The worker's own reversals stand.
    referrers = {
        referee: points
        for referee, points in restated.referrer_points.items()
        if referee not in state.referees_reversed and state.referees.get(referee) != points
    }
    referral = restated.referral
    if state.referral_reversed:
        referral = None  # the worker reversed it (a refund between the markers and the compensation): it stays so
    if referral is not None and referral.model_dump() == referral_record(state):
        referral = None
    lots = restated.lots
    # The last activity under the new rules, null when they see none: restated when it differs from the worker's.
    activity = "last_activity_at" in restated.model_fields_set and restated.last_activity_at != state.last_activity_at
    if not change and first is None and not caps and not referrers and referral is None and lots is None:
        if not activity:
            return
    shown = []
    if change:
        shown.append(f"lifetime earned points {state.lifetime_earned} -> {state.lifetime_earned + change}")
    if first is not None:
        shown.append(
            "a first qualifying order is behind the customer"
            if first
            else "no qualifying order yet: the next earns the first-order bonus"
        )
    if caps:
        moved = sum(points for _, _, points in caps)
        shown.append(f"points counted against caps {moved:+d} over {len({day for _, day, _ in caps})} days")
    shown += [
        f"referring {name} earned {state.referees.get(name, 0)} -> {points}" for name, points in referrers.items()
    ]
    if referral is not None:
        shown.append(
            f"referred by {referral.referred_by} (order {referral.order_id}): {referral.points} points"
            + (", reversed" if referral.reversed else "")
        )
    if lots is not None:
        held = sum(points for _, points in lots)
        shown.append(
            f"expiry lots: {len(lots)} lots of {held} points"
            + (f", the oldest awarded {lots[0][0].isoformat()}" if lots else "")
            + (f" (for an available balance of {restated.lots_balance})" if held != restated.lots_balance else "")
        )
    if activity:
        was, active = state.last_activity_at, restated.last_activity_at
        shown.append(
            f"last activity {was.isoformat() if was else 'none'} -> {active.isoformat() if active else 'none'}"
        )
    restatement: dict = {"first_order": first, "lifetime_earned_change": change}
    if caps:
        restatement["cap_usage_changes"] = caps
    if referrers:
        restatement["referrer_points"] = referrers
    if referral is not None:
        restatement["referral"] = referral.model_dump(mode="json")
    if lots is not None:
        restatement["lots"] = [[awarded_at.isoformat(), points] for awarded_at, points in lots]
        restatement["lots_balance"] = restated.lots_balance
    if activity:
        active, before = restated.last_activity_at, restated.live_last_activity_at
        restatement["last_activity_at"] = active.isoformat() if active else None
        if "live_last_activity_at" in restated.model_fields_set:
            restatement["live_last_activity_at"] = before.isoformat() if before else None
    if (lots is not None or activity) and restated.history_until is not None:
        restatement["history_until"] = restated.history_until.isoformat()
    document = json.dumps(restatement, separators=(",", ":"))
    entries.record(
        Source.adjustment,
        RESTATE_RULE,
        f"restated under rule set {entries.ruleset.version}: {'; '.join(shown)}",
        reference=RESTATE_PREFIX + document,
    )


def _revalue_order(entries: _Entries, revalued: ev.RevaluedOrder) -> None:
    """A replay's compensation re-values an open order: an entry whose reference holds the order's awards under the
    new rules (every line key and bonus the live order has; a line or bonus the new rules do not give is worth 0),
    and their pending points with the end of each window. Folding it replaces the awards and the pending lots
    (`state.evolve`), so a later refund or cancellation reverses the new values and the window's end confirms the
    new pending points. The compensation put the change of the customer's available and pending points together on
    the available balance; the entry moves this order's change of pending points between the two (0 points, a
    `recorded` entry, when it has none). An order closed already, or refunded since the values were taken (another
    set of refunds), stays as it is, and so does the split of its points."""
    state = entries.state
    order = state.orders.get(revalued.order_id)
    created = order is None
    if order is None:
        if not revalued.details:
            return
        # The old rules awarded the order nothing, so the worker has no record of it: it is made from the details.
        order = OrderRecord.from_details(revalued.details, revalued.placed_at, revalued.refunds)
    elif not order.revaluable():
        return
    if set(order.refund_ids) != set(revalued.refunds):
        return  # refunded live after the cut-over, before this compensation: the values do not include it
    lines = {key: list(revalued.lines.get(key, (0, 0))) for key in sorted(order.lines)}
    bonuses = {
        rule_id: [points, reversed_, None if threshold is None else format(threshold, "f")]
        for rule_id, (points, reversed_, threshold) in sorted(revalued.bonuses.items())
    }
    pending = {
        target: [available_at.isoformat(), points]
        for target, (available_at, points) in sorted(revalued.pending.items())
        if points > 0 and (target in lines or target in bonuses)
    }
    lots = order_lots(state, revalued.order_id)
    live = order.awards(lots)
    live_lines, live_bonuses = live["lines"], live["bonuses"]
    if lines == live_lines and bonuses == live_bonuses and pending == live.get("pending", {}):
        return
    shown = ", ".join(
        [f"{key} {live_lines[key][0]} -> {value[0]}" for key, value in lines.items() if value != live_lines[key]]
        + [
            f"{rule_id} {live_bonuses.get(rule_id, [0])[0]} -> {value[0]}"
            for rule_id, value in bonuses.items()
            if value != live_bonuses.get(rule_id)
        ]
        + [f"{rule_id} {value[0]} -> 0" for rule_id, value in live_bonuses.items() if rule_id not in bonuses]
    )
    moved = sum(points for _, points in pending.values()) - sum(lot.points for lot in lots)
    if moved:
        shown = "; ".join(part for part in (shown, f"{moved} points {'to' if moved > 0 else 'from'} pending") if part)
    document: dict = {"lines": lines, "bonuses": bonuses}
    if pending:
        document["pending"] = pending
    if created:
        document["details"] = order.details()
        document["refunds"] = sorted(revalued.refunds)
        if revalued.placed_at is not None:
            document["placed_at"] = revalued.placed_at.isoformat()
        shown = f"order recorded and valued under rule set {entries.ruleset.version}: {shown}"
    else:
        shown = f"order re-valued under rule set {entries.ruleset.version}: {shown}"
    entries.add(
        Kind.adjusted if moved else Kind.recorded,
        Source.purchase,
        REVALUE_RULE,
        points=-moved,
        pending_points=moved,
        explanation=shown[:300],
        order_id=revalued.order_id,
        reference=REVALUE_PREFIX + json.dumps(document, separators=(",", ":"), sort_keys=True),
    )


def _release_pending(entries: _Entries) -> None:
    """Confirm pending lots whose return window ended at or before this event's time."""
    moment = entries.event.occurred_at
    state = entries.state
    for lot in sorted(state.pending_lots, key=lambda lot: (lot.available_at, lot.order_id, lot.target)):
        if lot.available_at > moment:
            continue
        order = state.orders[lot.order_id]
        line = order.lines.get(lot.target)
        entries.add(
            Kind.confirmed,
            Source.purchase,
            "purchase.confirmation",
            points=lot.points,
            pending_points=-lot.points,
            explanation=f"return window ended {lot.available_at.isoformat()}",
            available_at=lot.available_at,  # when the points became available: the customer's activity (expiry)
            order_id=lot.order_id,
            sku=line.sku if line is not None else None,
            category=line.category if line is not None else None,
            reference=lot.target,
        )


_handlers: dict[type, Callable[..., None]] = {
    ev.PurchaseCompleted: _purchase_completed_and_held,
    ev.PurchaseRefunded: _purchase_refunded,
    ev.PurchaseCancelled: _purchase_cancelled,
    ev.ReviewApproved: _review,
    ev.CustomerRegistered: _registration,
    ev.BlogCommented: _blog_comment,
    ev.SocialShared: _social_share,
    ev.FeedbackSubmitted: _feedback,
    ev.RedeemRequested: _redeem,
    ev.PointsAdjusted: _adjust,
    ev.ReferralReversed: _referral_reversed,
    ev.ClockTick: lambda entries, event: None,
}


def _repeated(state: CustomerState, event: ev.Event, fingerprint: str) -> bool:
    """Whether the event was already applied to `state` (a re-delivery: it produces nothing); the same id with other
    content raises EventRejected, so that the conflicting event is dead-lettered instead of applied."""
    seen = state.applied.get(event.event_id)
    if seen is not None and seen != fingerprint:
        raise EventRejected(
            f"conflict: event id {event.event_id} was already applied with different content", "event_id"
        )
    return seen is not None


def decide(
    state: CustomerState,
    event: ev.Event,
    ruleset: RuleSet,
    *,
    side: Side = "customer",
    fingerprint: str | None = None,
) -> list[LedgerEntry]:
    """The entries `event` produces for `state`'s customer. Pure: `state` is not changed.

    An event already applied (same id, same content) produces nothing; the same id with different content
    raises EventRejected, so that the conflicting event is dead-lettered instead of applied.
    """
    assert customer_of(event, side) == state.customer_id, "event decided against another customer's state"
    fingerprint = fingerprint or event_fingerprint(event)
    if _repeated(state, event, fingerprint):
        return []
    compensation = is_compensation(event)
    if not compensation and event.event_id.startswith(COMPENSATION_PREFIX):
        # Reserved: the worker and replay tell an apply's compensations by it, so another event under such an id
        # would be decided ahead of the events held for them, and left out of the history a replay decides.
        raise EventRejected(
            f"{event.event_id} starts with {COMPENSATION_PREFIX!r}, which is reserved for the compensations "
            "of `loyalty replay --apply`",
            "event_id",
        )
    entries = _Entries(state, event, ruleset, fingerprint)
    # A replay's compensation is no event of the customer's: it releases, expires and reviews nothing. Its amounts
    # were computed from the live balances before it, and expiring the old rules' lots at it took the points a
    # second time (a history older than the new rules' expiry ended in debt: -675 where 50 is due).
    if state.pending_lots and not compensation:
        _release_pending(entries)
    # Confirmations are folded first so that expiry and the event's own rules see the released points, and the
    # activity they fold in (a confirmation is activity: expiring at the same event the points it releases was
    # deciding on a state that `evolve` never has).
    if entries.entries:
        released = list(entries.entries)
        preview = _clone_for_preview(state, released, ruleset)
        entries.state = preview
        entries.folded = len(released)
    if ruleset.expiry.mode != "none" and not compensation:
        _expire(entries)
    if isinstance(event, ev.ReferralCompleted):
        _referral(entries, event, side)
    else:
        _handlers[type(event)](entries, event)
    if ruleset.tiers.levels and not compensation:
        _review_tier(entries)  # the compensation's restated lifetime points are reviewed at the next event
    return entries.entries


def is_compensation(event: ev.Event) -> bool:
    """A `loyalty replay --apply` compensation (streams/replay.py, `compensations`)."""
    if not isinstance(event, ev.PointsAdjusted):
        return False
    return event.actor == COMPENSATION_ACTOR and event.adjustment_id.startswith(COMPENSATION_PREFIX)


def _expire(entries: _Entries) -> None:
    """Expire points whose time has come at this event's time (before the event itself is applied)."""
    state, rules, moment = entries.state, entries.ruleset.expiry, entries.event.occurred_at
    lifetime = timedelta(days=rules.days)
    if rules.mode == "inactivity":
        if state.last_activity_at is None or entries.balance <= 0 or moment < state.last_activity_at + lifetime:
            return
        entries.add(
            Kind.expired,
            Source.expiry,
            "expiry.inactivity",
            points=-entries.balance,
            explanation=f"no activity since {state.last_activity_at.isoformat()} ({rules.days} days)",
        )
        return
    for awarded_at, left in list(state.lots):
        if moment < awarded_at + lifetime or entries.balance <= 0:
            break
        points = min(left, entries.balance)
        entries.add(
            Kind.expired,
            Source.expiry,
            "expiry.lot",
            points=-points,
            reference=awarded_at.isoformat(),
            explanation=f"{points} points awarded {awarded_at.isoformat()} expired after {rules.days} days",
        )


def _current_tier(state: CustomerState, ruleset: RuleSet, moment: datetime):
    """The customer's tier when an event at `moment` is decided, before the event's own entries: by lifetime points,
    or by the spend in the window before `moment` (not the tier of the last review, whose window may have lapsed
    since: an order two months after the last one got the old tier's multiplier)."""
    tiers = ruleset.tiers
    if not tiers.levels:
        return None
    if tiers.basis == "lifetime_points":
        return tiers.tier_for(Decimal(state.lifetime_earned))
    return tiers.tier_for(rolling_spend(state, moment, tiers.window_days))


def _review_tier(entries: _Entries) -> None:
    """Record a tier change caused by this event's entries (tiers come from lifetime points or spend)."""
    state, ruleset = entries.state, entries.ruleset
    tiers = ruleset.tiers
    if tiers.basis == "lifetime_points":
        fresh = entries.entries[entries.folded :]  # released confirmations are already in the state
        earned = sum(
            entry.points for entry in fresh if entry.kind in (Kind.earned, Kind.confirmed) and entry.points > 0
        )
        metric = Decimal(state.lifetime_earned + earned)
        described = f"lifetime earned points {metric}"
    else:
        fresh = entries.entries[entries.folded :]
        metric = rolling_spend(state, entries.event.occurred_at, tiers.window_days, fresh)
        described = f"spend in the last {tiers.window_days} days {_shown(metric)}"
    level = tiers.tier_for(metric)
    name = level.name if level is not None else None
    if name != state.tier:
        entries.add(
            Kind.tier_changed,
            Source.tier,
            "tier",
            reference=name or "",
            explanation=f"{state.tier or 'no tier'} -> {name or 'no tier'}: {described}",
        )


def _clone_for_preview(state: CustomerState, released: list[LedgerEntry], ruleset: RuleSet) -> CustomerState:
    """A copy of the state with the confirmation entries folded in (decide must not change `state`)."""
    preview = copy.deepcopy(state)
    for entry in released:
        evolve(preview, entry, ruleset.zone)
    return preview


def apply(
    state: CustomerState,
    event: ev.Event,
    ruleset: RuleSet,
    *,
    side: Side = "customer",
    fingerprint: str | None = None,
) -> list[LedgerEntry]:
    """Decide the event's entries and fold them into `state`; what every driver calls."""
    entries = decide(state, event, ruleset, side=side, fingerprint=fingerprint)
    for entry in entries:
        evolve(state, entry, ruleset.zone)
    return entries


COVERED_RULE = "referral.referrer.covered"


def apply_covered(state: CustomerState, event: ev.ReferralReversed, ruleset: RuleSet, why: str) -> list[LedgerEntry]:
    """Decide a derived `referral.reversed` whose effect an apply's compensation already holds (streams/applier.py,
    `_decide_derived`): one 0-point `recorded` entry that marks the event applied (a copy read again is a repeat) and
    changes nothing else of the state (no pending points released, no activity, no referral bookkeeping). An event
    already applied gives nothing, as in `decide`; the same id with other content raises EventRejected."""
    assert event.customer_id == state.customer_id, "event decided against another customer's state"
    fingerprint = event_fingerprint(event)
    if _repeated(state, event, fingerprint):
        return []
    entries = _Entries(state, event, ruleset, fingerprint)
    entries.record(Source.referral, COVERED_RULE, why, order_id=event.order_id, reference=event.referee_id)
    for entry in entries.entries:
        evolve(state, entry, ruleset.zone)
    return entries.entries
