"""A customer's state, and `evolve`: the fold that rebuilds it from ledger entries alone.

The rules engine never changes state directly: it decides entries, and the drivers fold each entry into
the state with `evolve`. Because of that, a worker that restarts can rebuild every customer's state by
reading its ledger partition, and the state it gets is by construction the one the live run had.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from schemas.ledger import Kind, LedgerEntry, Source

# The id sets of a state start as this one shared empty frozenset and become a set at their first id: most
# customers never review, comment, get adjusted or refund, and an empty set costs 216 bytes. With six of them
# per customer, they were about 30% of a restored state's memory (docs/performance.md).
NOTHING: frozenset[str] = frozenset()


def _with(ids: set[str] | frozenset[str], item: str) -> set[str]:
    if type(ids) is frozenset:
        return {item}
    ids.add(item)  # type: ignore[union-attr]
    return ids  # type: ignore[return-value]


# Cap usage older than this (relative to the customer's latest event) can no longer matter: the longest
# cap period is a calendar month.
cap_history_days_max = 62


@dataclass(slots=True)
class LineAward:
    """What one purchase line earned, and how much of it has been refunded and reversed since."""

    sku: str
    quantity: int
    amount: Decimal  # the line's goods total after its share of the order discount
    points: int
    pending: bool
    quantity_refunded: int = 0
    points_reversed: int = 0
    category: str | None = None  # carried to the line's reversals and confirmations (points by category)


@dataclass(slots=True)
class BonusAward:
    """An order-level bonus (first order, spend threshold, promotion) and whether it was reversed."""

    points: int
    pending: bool
    threshold: Decimal | None = None
    reversed: bool = False


@dataclass(slots=True)
class OrderRecord:
    lines: dict[str, LineAward] = field(default_factory=dict)
    bonuses: dict[str, BonusAward] = field(default_factory=dict)
    refund_ids: set[str] | frozenset[str] = NOTHING
    cancelled: bool = False
    placed_at: datetime | None = None  # when the order was completed (its first entry)
    closed_at: datetime | None = None  # when it became fully refunded or cancelled

    def closed(self) -> bool:
        """Nothing of the order stands any more: cancelled, or every line refunded in full."""
        return self.cancelled or (
            bool(self.lines) and all(line.quantity_refunded >= line.quantity for line in self.lines.values())
        )

    def goods_total(self) -> Decimal:
        return sum((line.amount for line in self.lines.values()), Decimal(0))

    def revaluable(self) -> bool:
        """Whether a replay's compensation may re-value the order: something of it still stands."""
        return not self.closed()

    def awards(self, lots: list[PendingLot] | None = None) -> dict:
        """The order's awards as a re-valuation holds them: per line key [points, points reversed], per bonus rule
        [points, reversed, spend threshold as a decimal string or None], and with points still pending, per line
        key or bonus rule [when the window ends (ISO 8601), points pending] (`lots`: the order's pending lots)."""
        document: dict = {
            "lines": {key: [line.points, line.points_reversed] for key, line in self.lines.items()},
            "bonuses": {
                rule_id: [
                    bonus.points,
                    bonus.reversed,
                    None if bonus.threshold is None else format(bonus.threshold, "f"),
                ]
                for rule_id, bonus in self.bonuses.items()
            },
        }
        if lots:
            document["pending"] = {lot.target: [lot.available_at.isoformat(), lot.points] for lot in lots}
        return document

    @classmethod
    def from_details(
        cls, details: Mapping[str, Sequence], placed_at: datetime | None, refunds: Iterable[str]
    ) -> OrderRecord:
        """The record of an order the worker never held, from its `details()` (a replay's re-valuation of an order
        the old rules awarded nothing): its lines, worth nothing until the re-valuation's values are folded in."""
        order = cls(placed_at=placed_at, refund_ids=frozenset(refunds))
        for key, (sku, category, quantity, amount, refunded) in details.items():
            order.lines[key] = LineAward(sku, quantity, Decimal(amount), 0, False, refunded, category=category)
        return order

    def details(self) -> dict:
        """What a worker without a record of the order needs to hold it: per line key [sku, category, quantity,
        goods amount as a decimal string, quantity refunded]."""
        return {
            key: [line.sku, line.category, line.quantity, format(line.amount, "f"), line.quantity_refunded]
            for key, line in self.lines.items()
        }

    def remaining_goods_total(self) -> Decimal:
        total = Decimal(0)
        for line in self.lines.values():
            if line.quantity:
                total += line.amount * (line.quantity - line.quantity_refunded) / line.quantity
        return total


@dataclass(slots=True)
class PendingLot:
    available_at: datetime
    order_id: str
    target: str  # the line key or bonus rule id inside the order
    points: int


@dataclass(slots=True)
class CustomerState:
    customer_id: str
    sequence: int = 0
    balance: int = 0
    pending: int = 0
    lifetime_earned: int = 0
    lifetime_redeemed: int = 0
    last_event_at: datetime | None = None
    applied: dict[str, str] = field(default_factory=dict)  # event id -> fingerprint
    registered: bool = False
    segment: str | None = None
    first_order_done: bool = False
    reviewed_skus: set[str] | frozenset[str] = NOTHING
    commented_posts: set[str] | frozenset[str] = NOTHING
    redemption_ids: set[str] | frozenset[str] = NOTHING
    adjustment_ids: set[str] | frozenset[str] = NOTHING
    # As a referrer: referee -> points the referral earned (with promotion bonuses); referees whose referral
    # was reversed (their qualifying order was refunded), which can never earn again.
    referees: dict[str, int] = field(default_factory=dict)
    referees_reversed: set[str] | frozenset[str] = NOTHING
    # As a referee: who referred the customer, with which referral event, qualifying order and points.
    referred_by: str | None = None
    referral_event: str | None = None
    referral_order: str | None = None
    referral_points: int = 0
    referral_reversed: bool = False
    # The referral is a replay's restatement of one this customer's own entries never recorded (the worker withdrew
    # it, e.g. the qualifying order was unknown under the old rules): its referrer already received a derived
    # `referral.reversed` for that referral event, so a reversal after the apply needs another derived event id
    # (streams/rules/engine.py, `derived_event_id`).
    referral_restated: bool = False
    orders: dict[str, OrderRecord] = field(default_factory=dict)
    pending_lots: list[PendingLot] = field(default_factory=list)
    cap_usage: dict[tuple[str, date], int] = field(default_factory=dict)  # (source, local day) -> points
    # Refunds and cancellations of orders not recorded yet, per order id, applied if the order arrives
    # (streams/rules/engine.py, `_hold`); None until there is one (most customers never have any).
    held: dict[str, list[dict]] | None = None
    last_activity_at: datetime | None = None  # latest `activity_moment` of its entries, for expiry by inactivity
    lots: list[list] = field(default_factory=list)  # [awarded_at, points left], oldest first (expiry by lot)
    tier: str | None = None
    spend_log: list[tuple[datetime, Decimal]] = field(default_factory=list)  # qualifying spend, for tiers


_positive_sources_kinds = (Kind.earned, Kind.pending)
_earning_kinds = (Kind.earned, Kind.confirmed)
_activity_kinds = (Kind.earned, Kind.confirmed, Kind.redeemed)
_spend_kinds = (Kind.earned, Kind.pending, Kind.recorded)
# The members the fold compares for every entry, as module globals. On Python 3.11 `Kind.pending` is no plain class
# attribute read: EnumType defines __getattr__, which sends every attribute read of an enum class through a slow hook
# (about 70 ns, against 8 for a global), and `evolve` read about a dozen per entry (docs/performance.md, 2026-11-28).
_ADJUSTED = Kind.adjusted
_CONFIRMED = Kind.confirmed
_PENDING = Kind.pending
_REDEEMED = Kind.redeemed
_REDEMPTION_REJECTED = Kind.redemption_rejected
_REVERSED = Kind.reversed
_TIER_CHANGED = Kind.tier_changed
_ADJUSTMENT = Source.adjustment
_BLOG_COMMENT = Source.blog_comment
_PURCHASE = Source.purchase
_REDEMPTION = Source.redemption
_REFERRAL = Source.referral
_REGISTRATION = Source.registration
_REVIEW = Source.review
_no_spend = Decimal(0)
# The last day asked for: an event's entries (and its cap checks) ask for the same moment, one datetime object, again
# and again, and a time zone conversion costs about a microsecond.
_last_local_day: tuple[datetime | None, ZoneInfo | None, date | None] = (None, None, None)


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    global _last_local_day
    last_moment, last_zone, day = _last_local_day
    if moment is last_moment and zone is last_zone:
        return day  # type: ignore[return-value]
    day = moment.astimezone(zone).date()
    _last_local_day = (moment, zone, day)
    return day


def evolve(state: CustomerState, entry: LedgerEntry, zone: ZoneInfo) -> None:
    """Fold one ledger entry into the customer's state (the only place state changes)."""
    assert entry.customer_id == state.customer_id, "entry folded into another customer's state"
    assert entry.sequence == state.sequence + 1, f"entry {entry.entry_id} out of sequence"
    state.sequence = entry.sequence
    state.balance += entry.points
    state.pending += entry.pending_points
    assert state.balance == entry.balance_after and state.pending == entry.pending_after, "running sums broken"
    state.applied[entry.caused_by] = entry.fingerprint
    if state.last_event_at is None or entry.occurred_at > state.last_event_at:
        state.last_event_at = entry.occurred_at
    kind, source, reference = entry.kind, entry.source, entry.reference or ""

    if kind in _earning_kinds and entry.points > 0:
        state.lifetime_earned += entry.points
    evolve_expiry(state, entry, kind)
    if kind is _TIER_CHANGED:
        state.tier = reference or None
    spent = spend_change(entry)
    if spent:
        state.spend_log.append((spend_moment(state, entry), spent))
    if kind is _REDEEMED:
        state.lifetime_redeemed -= entry.points
        state.redemption_ids = _with(state.redemption_ids, reference)
    if kind in _positive_sources_kinds and (entry.points > 0 or entry.pending_points > 0):
        key = (source._value_, local_day(entry.occurred_at, zone))  # _value_: the value without enum's property
        state.cap_usage[key] = state.cap_usage.get(key, 0) + entry.points + entry.pending_points
        _forget_old_cap_usage(state, zone)

    if entry.rule_id == RESTATE_RULE:
        _restate(state, reference, entry.occurred_at)
    elif source is _PURCHASE:
        _evolve_purchase(state, entry, kind, reference, spent)
    elif source is _REVIEW:
        if entry.sku:
            state.reviewed_skus = _with(state.reviewed_skus, entry.sku)
    elif source is _BLOG_COMMENT:
        state.commented_posts = _with(state.commented_posts, reference)
    elif source is _REGISTRATION:
        state.registered = True
        if reference.startswith("segment:"):
            state.segment = reference.removeprefix("segment:")
    elif source is _REDEMPTION and kind is _REDEMPTION_REJECTED:
        state.redemption_ids = _with(state.redemption_ids, reference)
    elif source is _ADJUSTMENT and kind is _ADJUSTED:
        # Only an applied adjustment uses up its id: a refused one (recorded, 0 points) must stay retryable
        # with allow_negative under the same adjustment id, instead of being reported as "already applied".
        state.adjustment_ids = _with(state.adjustment_ids, reference)
    elif source is _REFERRAL:
        # Only the decision itself marks a referral; guard records (no order yet, already referred) do not,
        # so a referral that arrives before the referee's order does not block a later, valid one.
        _evolve_referral(state, entry, reference)


def evolve_expiry(state: CustomerState, entry: LedgerEntry, kind: Kind) -> None:
    """What expiry decides by after one entry: the last activity (expiry by inactivity) and the lots of available
    points (expiry by lot). Part of `evolve`; also folded alone over the live ledger by an apply
    (streams/replay.py, `_live_expiry`), with `restate_expiry` for a replay's restatement entries."""
    active = activity_moment(entry)
    if active is not None and (state.last_activity_at is None or active > state.last_activity_at):
        state.last_activity_at = active
    _evolve_lots(state, entry, kind)


def evolve_orders(state: CustomerState, entry: LedgerEntry) -> None:
    """What a purchase entry (source purchase) makes of the customer's order records and pending lots: the part of
    `evolve` an apply folds alone over the live ledger (streams/replay.py, `_live_orders`) to compare the live awards
    of open orders with the new rules'."""
    _evolve_purchase(state, entry, entry.kind, entry.reference or "", spend_change(entry))


def _evolve_referral(state: CustomerState, entry: LedgerEntry, reference: str) -> None:
    rule_id = entry.rule_id
    if rule_id == "referral.referrer":
        state.referees[reference] = state.referees.get(reference, 0) + entry.points
    elif rule_id == "referral.referee":
        state.referred_by = reference
        state.referral_event = entry.caused_by
        state.referral_restated = False
        state.referral_order = entry.order_id
        state.referral_points = entry.points
    elif rule_id.startswith("promotion:"):
        # A promotion bonus on a referral: the referee's if it came with the customer's own referral award.
        if entry.caused_by == state.referral_event and reference == state.referred_by:
            state.referral_points += entry.points
        elif reference in state.referees:
            state.referees[reference] += entry.points
    elif rule_id == "referral.referrer.withdrawn":
        state.referees.pop(reference, None)  # not rewarded any more: a later valid referral of them pays
    elif rule_id == "referral.referrer.reversal":
        state.referees_reversed = _with(state.referees_reversed, reference)
        if reference in state.referees:
            state.referees[reference] += entry.points
    elif rule_id == "referral.referee.reversal":
        state.referral_reversed = True
        state.referral_points += entry.points


def activity_moment(entry: LedgerEntry) -> datetime | None:
    """When an entry shows the customer active, for expiry by inactivity (docs/lifecycle.md), or None.

    Earning and redeeming count at their event time. A purchase that earns pending points counts until its return
    window ends (`available_at`): the customer bought, and the points must not expire before they are usable.
    A confirmation counts at the end of its window (`available_at`), never at the later event that happened
    to release it, so that how often a store sends ticks does not move the customer's last activity.
    """
    kind = entry.kind
    if kind is _PENDING:
        return (entry.available_at or entry.occurred_at) if entry.pending_points > 0 else None
    if kind in _activity_kinds and entry.points != 0:
        if kind is _CONFIRMED and entry.available_at is not None:
            return entry.available_at
        return entry.occurred_at
    return None


def spend_change(entry: LedgerEntry) -> Decimal:
    """How an entry changes the customer's qualifying spend (for tiers by rolling spend).

    Purchase line entries carry their goods amount; reversals of a line carry the refunded share.
    """
    if entry.source is not _PURCHASE or not entry.amount or not entry.sku:
        return _no_spend
    if entry.kind in _spend_kinds and entry.event_type == "purchase.completed":
        return Decimal(entry.amount)
    if entry.kind is _REVERSED:
        return -Decimal(entry.amount)
    return _no_spend


def spend_moment(state: CustomerState, entry: LedgerEntry) -> datetime:
    """When an entry's spend change counts, for tiers by rolling spend: a purchase at its time, a refund or
    cancellation at the time the order was placed. A refund takes back the spend from the window the purchase
    counted in: inside that window the spend drops at once, after it the refund changes nothing (dated at the
    refund, it made the spend of a later window negative: -150 where the purchase had already aged out)."""
    if entry.kind is _REVERSED:
        order = state.orders.get(entry.order_id or "")
        if order is not None and order.placed_at is not None:
            return order.placed_at
    return entry.occurred_at


def rolling_spend(
    state: CustomerState, moment: datetime, window_days: int, fresh: Iterable[LedgerEntry] = ()
) -> Decimal:
    """The customer's qualifying spend in the `window_days` before `moment` (counted after moment - window_days),
    with the spend changes of `fresh` entries not folded into `state` yet."""
    since = moment - timedelta(days=window_days)
    total = sum((amount for at, amount in state.spend_log if at > since), _no_spend)
    for entry in fresh:
        amount = spend_change(entry)
        if amount and spend_moment(state, entry) > since:
            total += amount
    return total


def _evolve_purchase(state: CustomerState, entry: LedgerEntry, kind: Kind, reference: str, spent: Decimal) -> None:
    """`spent`: the entry's `spend_change`, which for a purchase line's own entry is its amount (or 0)."""
    order_id = entry.order_id or ""
    # A purchase.completed event can also release earlier pending lots: those `confirmed` entries carry the
    # event type of the new purchase but refer to another order, so they take the confirmation path below
    # (folding them as new order lines confirmed the same lot twice and invented a bonus to reverse).
    # So do the entries of the refunds and cancellation held until the purchase arrived (engine `_apply_held`):
    # reversals, and records tagged `;refund:<id>` or `;cancel`, which the purchase's own entries never are.
    if (
        entry.event_type == "purchase.completed"
        and kind is not _CONFIRMED
        and kind is not _REVERSED
        and ";" not in reference
    ):
        if entry.rule_id in ("purchase.duplicate_order", "purchase.not_qualifying"):
            return
        state.first_order_done = True
        order = state.orders.get(order_id)
        if order is None:
            order = state.orders[order_id] = OrderRecord(placed_at=entry.occurred_at)
            if state.held:
                state.held.pop(order_id, None)  # the purchase's event applies them (after its own entries)
        pending = kind is _PENDING
        points = entry.pending_points if pending else entry.points
        if reference.startswith("line:"):
            order.lines[reference] = LineAward(
                sku=entry.sku or "",
                quantity=entry.quantity or 0,
                amount=spent or Decimal(entry.amount or "0"),  # the amount parsed once, but for a 0 spend
                points=points,
                pending=pending,
                category=entry.category,
            )
        else:
            threshold = Decimal(entry.amount) if entry.amount else None
            order.bonuses[entry.rule_id] = BonusAward(points=points, pending=pending, threshold=threshold)
        if pending and entry.available_at is not None and points > 0:
            state.pending_lots.append(PendingLot(entry.available_at, order_id, reference or entry.rule_id, points))
        return
    order = state.orders.get(order_id)
    if entry.rule_id == REVALUE_RULE:
        _revalue(state, order_id, order, reference, entry.occurred_at)
        return
    if order is None:
        if reference.startswith(HELD_PREFIX):
            if state.held is None:
                state.held = {}
            state.held.setdefault(order_id, []).append(json.loads(reference.removeprefix(HELD_PREFIX)))
        return
    target, _, refund_id = reference.partition(";")
    if refund_id:
        order.refund_ids = _with(order.refund_ids, refund_id)
    if entry.event_type == "purchase.cancelled" or refund_id == "cancel":  # a held cancellation: the purchase's
        order.cancelled = True
        if order.closed_at is None:
            order.closed_at = entry.occurred_at
    if kind is _REVERSED:
        reversed_points = -(entry.points + entry.pending_points)
        if target in order.lines:
            line = order.lines[target]
            line.points_reversed += reversed_points
            line.quantity_refunded += entry.quantity or 0
            if order.closed_at is None and order.closed():
                order.closed_at = entry.occurred_at
        elif target in order.bonuses:
            bonus = order.bonuses[target]
            if entry.amount and reversed_points < bonus.points:  # dropped to a lower threshold (its amount)
                bonus.points -= reversed_points
                bonus.threshold = Decimal(entry.amount)
            else:
                bonus.reversed = True
        if entry.pending_points:
            _reduce_lot(state, order_id, target, -entry.pending_points)
    elif kind is _CONFIRMED:
        if target in order.lines:
            order.lines[target].pending = False
        elif target in order.bonuses:
            order.bonuses[target].pending = False
        state.pending_lots = [
            lot for lot in state.pending_lots if not (lot.order_id == order_id and lot.target == target)
        ]


def _reduce_lot(state: CustomerState, order_id: str, target: str, reversed_points: int) -> None:
    """A reversal of pending points: the lot keeps what is left of it, to be confirmed when its window ends (a
    partial refund of a pending line used to drop the whole lot, and the rest of the line stayed pending for ever)."""
    kept = []
    for lot in state.pending_lots:
        if lot.order_id == order_id and lot.target == target:
            left = lot.points - reversed_points
            if left <= 0:
                continue
            lot = PendingLot(lot.available_at, lot.order_id, lot.target, left)
        kept.append(lot)
    state.pending_lots = kept


# A `loyalty replay --apply` compensation: the actor and the prefix of its event and adjustment ids
# (streams/replay.py writes them, streams/rules/engine.py recognises them).
COMPENSATION_ACTOR = "replay"
COMPENSATION_PREFIX = "replay:"
REVALUE_RULE = "replay.revalue"
REVALUE_PREFIX = "revalue:"
RESTATE_RULE = "replay.restate"
RESTATE_PREFIX = "restate:"
HELD_PREFIX = "held:"  # a refund or cancellation of an order not recorded yet (streams/rules/engine.py, `_hold`)


def referral_record(state: CustomerState) -> dict | None:
    """The customer's own referral as a referee, as a replay's restatement carries it (`ev.RestatedReferral`)."""
    if state.referred_by is None or state.referral_event is None:
        return None
    return {
        "referred_by": state.referred_by,
        "event_id": state.referral_event,
        "order_id": state.referral_order,
        "points": state.referral_points,
        "reversed": state.referral_reversed,
    }


def _restate(state: CustomerState, reference: str, moment: datetime) -> None:
    """A replay's compensation restates what the new rules would have made of the customer's history besides balances
    and orders (streams/rules/engine.py, `_restate`): lifetime earned points, the first-order mark and the points
    counted against caps per (source, local day), the points of the customer's referrals (as a referrer per referee,
    and as a referee), the lots of available points and the last activity."""
    document = json.loads(reference.removeprefix(RESTATE_PREFIX))
    _restate_expiry(state, document, moment)
    state.lifetime_earned += document["lifetime_earned_change"]
    changes = document.get("cap_usage_changes")
    if changes:
        usage = dict(state.cap_usage)
        for source, day, points in changes:
            key = (source, date.fromisoformat(day))
            usage[key] = usage.get(key, 0) + points
        # Oldest day first, as folding inserts them (`_forget_old_cap_usage` relies on it); none below zero.
        state.cap_usage = {key: usage[key] for key in sorted(usage, key=lambda key: key[1]) if usage[key] > 0}
    for referee, points in document.get("referrer_points", {}).items():
        state.referees[referee] = points
    referral = document.get("referral")
    if referral is not None:
        if referral["event_id"] != state.referral_event:
            state.referral_restated = True  # kept by a later restatement of the same referral event
        state.referred_by, state.referral_event = referral["referred_by"], referral["event_id"]
        state.referral_order, state.referral_points = referral["order_id"], referral["points"]
        state.referral_reversed = referral["reversed"]
    if document.get("first_order") is not None:  # the value under the new rules, set either way
        state.first_order_done = document["first_order"]
    elif document.get("first_order_done"):  # the first form of the entry (fcda4d0): set only
        state.first_order_done = True


def restate_expiry(state: CustomerState, reference: str, moment: datetime) -> None:
    """The lots and last activity a restatement entry (its `reference`, at `moment`) sets; the rest of `_restate`."""
    _restate_expiry(state, json.loads(reference.removeprefix(RESTATE_PREFIX)), moment)


def _restate_expiry(state: CustomerState, document: dict, moment: datetime) -> None:
    # What lies after the replayed history's newest event (the compensation's own entries aside) comes from events
    # decided since the markers: the worker keeps it.
    until = document.get("history_until")
    until = datetime.fromisoformat(until) if until is not None else moment
    if document.get("lots") is not None:
        _restate_lots(state, document["lots"], document.get("lots_balance", 0), until, moment)
    if "last_activity_at" in document:
        active, live = _moment_or_none(document["last_activity_at"]), state.last_activity_at
        if "live_last_activity_at" in document:
            # Events since the markers moved the worker's from the live one before them: it is kept if later.
            moved = live is not None and live != _moment_or_none(document["live_last_activity_at"])
        else:  # the first form of the entry: what lies after the history is taken for activity since the markers
            moved = live is not None and live > until
        if moved:
            active = live if active is None or live > active else active
        state.last_activity_at = active


def _moment_or_none(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _restate_lots(state: CustomerState, lots: list, lots_balance: int, until: datetime, moment: datetime) -> None:
    """The compensation's lots (the new rules', before the cut-over markers) replace the worker's, with the lots of
    points awarded after `until` (the newest event of the replayed history: events decided since the markers) kept
    after them, but for the lot of the compensation's own entries (at its time, `moment`). The lots then
    hold the available balance as the new rules' lots held theirs (more when the balance went below zero once):
    what events since the markers took is taken from the oldest lots, and what is missing (the pending points the
    compensation's own entries released, say) is a lot at the compensation's time."""
    restated = [[datetime.fromisoformat(awarded_at), points] for awarded_at, points in lots]
    held = state.balance + sum(points for _, points in restated) - lots_balance
    later = [list(lot) for lot in state.lots if lot[0] > until and lot[0] != moment]
    merged = sorted(restated + later, key=lambda lot: lot[0])
    excess = sum(points for _, points in merged) - held
    while excess > 0 and merged:
        used = min(excess, merged[0][1])
        merged[0][1] -= used
        excess -= used
        if merged[0][1] == 0:
            merged.pop(0)
    if excess < 0:
        same = [lot for lot in merged if lot[0] == moment]
        if same:
            same[0][1] -= excess
        else:
            merged.append([moment, -excess])
            merged.sort(key=lambda lot: lot[0])
    state.lots = merged


def order_lots(state: CustomerState, order_id: str) -> list[PendingLot]:
    return [lot for lot in state.pending_lots if lot.order_id == order_id]


def _revalue(state: CustomerState, order_id: str, order: OrderRecord | None, reference: str, moment: datetime) -> None:
    """A replay's re-valuation of an order (streams/rules/engine.py, `_revalue_order`): its awards become the new
    rules' values, held in the entry's reference, and so do its pending lots (the entry's points moved the
    difference between the available and the pending balance). An order the worker had no record of comes with its
    lines (`details`), its placement time and its refunds."""
    document = json.loads(reference.removeprefix(REVALUE_PREFIX))
    if order is None:
        details = document.get("details")
        if not details:
            return
        placed = document.get("placed_at")
        order = state.orders[order_id] = OrderRecord.from_details(
            details, datetime.fromisoformat(placed) if placed else moment, document.get("refunds", ())
        )
        state.first_order_done = True
    pending = document.get("pending", {})
    for key, (points, points_reversed) in document["lines"].items():
        line = order.lines.get(key)
        if line is not None:
            line.points, line.points_reversed = points, points_reversed
            line.pending = key in pending
    order.bonuses = {
        rule_id: BonusAward(points, rule_id in pending, None if threshold is None else Decimal(threshold), reversed_)
        for rule_id, (points, reversed_, threshold) in document["bonuses"].items()
    }
    state.pending_lots = [lot for lot in state.pending_lots if lot.order_id != order_id] + [
        PendingLot(datetime.fromisoformat(at), order_id, target, points) for target, (at, points) in pending.items()
    ]


def _evolve_lots(state: CustomerState, entry: LedgerEntry, kind: Kind) -> None:
    """Lots of available points, oldest first: awards add one, every decrease uses the oldest first."""
    if entry.points > 0:
        if state.lots and state.lots[-1][0] == entry.occurred_at:
            state.lots[-1][1] += entry.points
        else:
            state.lots.append([entry.occurred_at, entry.points])
        return
    taken = -entry.points
    while taken > 0 and state.lots:
        oldest = state.lots[0]
        used = min(taken, oldest[1])
        oldest[1] -= used
        taken -= used
        if oldest[1] == 0:
            state.lots.pop(0)


def _forget_old_cap_usage(state: CustomerState, zone: ZoneInfo) -> None:
    """Drop cap usage too old to matter, to bound memory; decisions never read it (caps span a month at most).

    Keys are inserted in event-time order, so the first key is the oldest: while it is recent enough there is
    nothing to forget, and the dictionary is not rebuilt (rebuilding it at every entry of a customer with 64
    recent keys was 5% of a replay).
    """
    if len(state.cap_usage) < 64 or state.last_event_at is None:
        return
    oldest = local_day(state.last_event_at, zone) - timedelta(days=cap_history_days_max)
    if next(iter(state.cap_usage))[1] >= oldest:
        return
    state.cap_usage = {key: points for key, points in state.cap_usage.items() if key[1] >= oldest}
