"""Replay: the archived history through the pure core under a new rule set, compared with the live ledger.

`--dry-run` computes a shadow ledger per customer (in event-time and offset order, the worker's order)
and reports what the new rules would change; `--apply` posts, through the worker, one compensating
`points.adjusted` event per customer whose balance changes, so that live balances equal the new rules'
result. Nothing in the ledger is edited or deleted. Memory is bounded by the number of customers: the
archive is streamed from ClickHouse sorted by customer, and a customer's state is dropped once done.

Customers are independent, so the first pass runs in several processes (`processes`): the archive is cut into
chunks of whole customers, each chunk is decided in a process of a pool, and the chunks' figures are merged in
the order they were cut, which gives the same report as one process. The customers who receive derived events
are decided again in the calling process (a small share of the history).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from schemas import events as ev
from schemas.decode import EventRejected, decode_event
from schemas.ledger import Kind, Source
from schemas.topics import REDEMPTIONS, REFERRALS
from streams.batch import order_key
from streams.rules.engine import apply, derived_events, event_fingerprint
from streams.rules.ruleset import RuleSet, load_ruleset
from streams.rules.state import (
    COMPENSATION_ACTOR,
    COMPENSATION_PREFIX,
    RESTATE_PREFIX,
    RESTATE_RULE,
    CustomerState,
    cap_history_days_max,
    evolve_expiry,
    evolve_orders,
    local_day,
    order_lots,
    referral_record,
    restate_expiry,
)
from streams.settings import replay_processes_max

progress_every_events = 5_000
compensation_prefix = COMPENSATION_PREFIX
# An apply refuses while the worker lags by more input messages than this (`--lag-max`): the cut-over waits for
# the worker to pass its markers. Events keep arriving meanwhile: the comparison covers what lies before them.
lag_bound_messages = 10_000
# A preview through the running system waits this long at most for the projector to store what the worker decided.
preview_settle_s = 10.0
# A task of a replay process: at least this many archived messages, cut between two customers. Deciding them takes
# about half a second, next to which sending them costs little; the pool's queue holds a few megabytes.
chunk_messages = 5_000
chunks_in_flight_per_process = 2
# An apply into rules that expire points reads the live ledger in slices of whole customers of about this many
# entries (`_live_expiry`); ClickHouse holds one slice for the read.
live_expiry_slice_entries = 100_000
# The live figures of a dry run or apply (`live_figures`) are read in slices of whole customers of about this many.
live_figures_slice_entries = 100_000
processes_max = replay_processes_max
orphan_check_interval_s = 1.0
gc_thresholds = (50_000, 20, 100)  # the worker's (streams/worker.py), for the same reason: see _fewer_collections


# Stands for an event's fingerprint in replay until another event of the same id needs the real one: the core stores
# fingerprints (state.applied) only to tell a re-delivered copy (same content) from a conflicting one, and replay
# keeps no ledger entry, so computing them for every event (a serialisation and a hash, 5-10 us) bought nothing.
_lazy_fingerprint = "<replay: not computed>"


_issuing_kinds = (Kind.earned, Kind.confirmed)
# A ledger row's kind as the member itself: calling Kind(value) for each of millions of live entries was a tenth of
# `_live_expiry`'s time (Kind(value) still raises for a value that is none).
_kinds_by_value = {kind.value: kind for kind in Kind}


class ReplayRefused(RuntimeError):
    """The replay cannot run (safely) on this archive or now; the message says why."""


@dataclass(frozen=True)
class Restatement:
    """What the replayed rules make of a customer's history besides balances and orders, for an apply's compensation
    (`restated`): lifetime earned points, the first-order mark, the points counted against caps per (source, local
    day), what the customer's referrals earned that no reversal took back (as a referrer per referee, and as a
    referee), the lots of available points with the balance they belong to (for expiry by lot), and the last
    activity (for expiry by inactivity)."""

    lifetime_earned: int
    first_order_done: bool
    cap_usage: dict[tuple[str, date], int]
    referrer_points: dict[str, int]
    referral: dict | None  # the customer's own, as a referee (`ev.RestatedReferral`)
    lots: tuple[tuple[datetime, int], ...] = ()
    balance: int = 0
    last_activity_at: datetime | None = None
    last_event_at: datetime | None = None  # the newest event of the history: the lots and activity cover it

    @classmethod
    def of(cls, state: CustomerState, newest: datetime | None = None) -> Restatement:
        referrer_points = {
            referee: points for referee, points in state.referees.items() if referee not in state.referees_reversed
        }
        caps = dict(state.cap_usage)
        lots = tuple((awarded_at, points) for awarded_at, points in state.lots)
        return cls(
            state.lifetime_earned,
            state.first_order_done,
            caps,
            referrer_points,
            referral_record(state),
            lots,
            state.balance,
            state.last_activity_at,
            newest or state.last_event_at,
        )

    def restated(
        self,
        live_lifetime: int,
        live_caps: Mapping[tuple[str, date], int],
        since: date | None,
        ruleset: RuleSet,
        live_activity: datetime | None = None,
        live_until: datetime | None = None,
    ) -> dict:
        """The compensation's `restated` against the live figures before the markers (`live_activity`: the live last
        activity, `_live_expiry`'s, when the new rules expire after inactivity; `live_until`: the customer's newest live
        entry before the markers, `_live_expiry`'s, which an earlier apply's compensation can date after the
        history)."""
        restated = {
            "lifetime_earned_change": self.lifetime_earned - live_lifetime,
            "first_order_done": self.first_order_done,
            "cap_usage_changes": cap_usage_changes(live_caps, self.cap_usage, since, ruleset),
            # The event holds at most 1,000; a reversal of an older referral takes back the live value.
            "referrer_points": dict(list(self.referrer_points.items())[-1000:]),
            "referral": self.referral,
        }
        if ruleset.expiry.mode == "lot":
            restated |= self.restated_lots()
        elif ruleset.expiry.mode == "inactivity":  # null: no activity under the new rules (the worker's is cleared)
            restated["last_activity_at"] = _iso(self.last_activity_at)
            # The worker keeps its own when events since the markers moved it from this one.
            restated["live_last_activity_at"] = _iso(live_activity)
        if ruleset.expiry.mode != "none":
            # What the worker holds up to here lies before the markers, which the new rules' lots replace: the
            # history's newest event, or an earlier apply's compensation dated at its cut-over, after it (whose lot
            # the worker kept as one of events since the markers, and cut the oldest lots to make room).
            known = [moment for moment in (self.last_event_at, live_until) if moment is not None]
            restated["history_until"] = _iso(max(known) if known else None)
        return restated

    def restated_lots(self) -> dict:
        """The new rules' lots (at most `lots_restated_max`: the oldest merged into one) and the available balance they
        belong to, which the worker's fold sets in place of its own lots of that history (`state._restate_lots`)."""
        return {
            "lots": _merged_oldest([[at.isoformat(), points] for at, points in self.lots], ev.lots_restated_max),
            "lots_balance": self.balance,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _merged_oldest(lots: list[list], keep: int) -> list[list]:
    """`lots` ([awarded at, points], oldest first) in at most `keep` lots: the oldest ones merged into one, dated at the
    newest of them (their points expire with it, later rather than earlier than under the new rules)."""
    if len(lots) <= keep:
        return lots
    merged = lots[: len(lots) - keep + 1]
    return [[merged[-1][0], sum(points for _, points in merged)], *lots[len(lots) - keep + 1 :]]


@dataclass
class ShadowResult:
    balances: dict[str, int] = field(default_factory=dict)
    points_by_rule: dict[str, int] = field(default_factory=dict)
    issued: int = 0
    events: int = 0
    rejected: int = 0
    entries: int = 0
    derived_skipped: int = 0
    # With `keep_orders`: per customer, the open orders' awards under the replayed rules (see `_open_orders`), and
    # the pending balance (customers with points pending only).
    orders: dict[str, list[dict]] | None = None
    pending: dict[str, int] | None = None
    # With `keep_orders`, per customer kept: what the compensation restates under the new rules.
    restate: dict[str, Restatement] | None = None
    # The events the replay derived (referral reversals), per customer receiving them: (order key, event).
    derived: dict[str, list[tuple[tuple, ev.Event]]] = field(default_factory=dict)


def replay_messages(
    messages: Iterable[Any],
    ruleset: RuleSet,
    *,
    progress: Callable[[int], None] | None = None,
    refetch: Callable[[set[str]], Iterable[Any]] | None = None,
    processes: int = 1,
    keep_orders: bool | Mapping[str, tuple] = False,
) -> ShadowResult:
    """Run the core over archived messages sorted by (routing key, occurred_at, topic rank, offset).

    Events the engine derives (a referral reversed on the referrer's side) are not read from the archive but
    derived again under `ruleset`, as the batch driver does: after the pass over every customer, the customers
    who receive derived events are decided again with them (`refetch(keys)` gives those customers' archived
    messages again; without it, the derived events are left out and counted in `result.derived_skipped`).

    With `processes` > 1 the first pass runs in that many processes once the archive holds more than one chunk
    (`chunk_messages`); the result is the same as with one. Chunks are cut where the routing key changes, which
    is where the customer changes, since producers key every event by its customer (`streams/routing.py`).
    """
    if not 1 <= processes <= processes_max:
        raise ValueError(f"processes must be in 1..{processes_max}, got {processes}")
    global _orders_unless_balance
    _orders_unless_balance = keep_orders if isinstance(keep_orders, Mapping) else None
    try:
        with _fewer_collections():
            return _replay(messages, ruleset, progress, refetch, processes, keep_orders)
    finally:
        _orders_unless_balance = None


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The collector's thresholds of the worker while replay runs (in the calling process; a replay process keeps them).

    Replay allocates many short-lived objects per event, and with the default thresholds (700, 10, 10) the collector
    ran so often, scanning every object the caller holds (in the bench: the whole archive in memory), that it took
    12% of a replay's CPU time. Only how often it runs changes, not what it frees.
    """
    previous = gc.get_threshold()
    gc.set_threshold(*gc_thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _replay(
    messages: Iterable[Any],
    ruleset: RuleSet,
    progress: Callable[[int], None] | None,
    refetch: Callable[[set[str]], Iterable[Any]] | None,
    processes: int,
    keep_orders: bool | Mapping[str, tuple],
) -> ShadowResult:
    kept = keep_orders is not False
    result = ShadowResult(orders={} if kept else None, pending={} if kept else None, restate={} if kept else None)
    derived: dict[str, list[tuple[tuple, ev.Event]]] = {}
    if processes == 1:
        _first_pass(_fields(messages), ruleset, result, derived, progress)
    else:
        _first_pass_in_processes(messages, ruleset, result, derived, progress, processes, keep_orders)
    if not derived:
        return result
    result.derived = {customer_id: list(events) for customer_id, events in derived.items()}
    if refetch is None:
        result.derived_skipped = sum(len(events) for events in derived.values())
        return result
    ignored = ShadowResult()
    for customer_id, items in _customers(_fields(refetch(set(derived))), ignored, None):
        if customer_id not in derived:
            continue
        _run_customer(customer_id, items, ruleset, result, -1, None)  # take back the first pass's figures
        extra = [(key, event, "customer") for key, event in derived.pop(customer_id)]
        merged = sorted(items + extra, key=lambda item: item[0])
        unawarded = _unawarded_if(result)
        state = _run_customer(customer_id, merged, ruleset, result, +1, None, unawarded)
        result.balances[customer_id] = state.balance
        _keep_orders(result, state, unawarded, merged)
    for customer_id, events in derived.items():  # a referrer with no archived event of their own
        unawarded = _unawarded_if(result)
        items = [(k, e, "customer") for k, e in events]
        state = _run_customer(customer_id, items, ruleset, result, +1, None, unawarded)
        result.balances[customer_id] = state.balance
        _keep_orders(result, state, unawarded, items)
    return result


# With `keep_orders` given as the live (balance, pending, lifetime earned points[, (expiry mode, what expiry decides
# by)]) per customer (`_live_balances`): the orders of a customer whose replayed figures equal the live ones are not
# kept (no compensation will carry them), so memory follows the customers an apply compensates. One replay at a time
# per process uses it: `loyalty up` runs replays under its client lock.
_orders_unless_balance: Mapping[str, tuple] | None = None


def expiry_key(state: CustomerState, mode: str) -> Any:
    """What expiry by `mode` decides by, comparable between the live ledger's fold and a replay: the lots of available
    points (by lot), the last activity (by inactivity)."""
    if mode == "lot":
        return tuple((awarded_at, points) for awarded_at, points in state.lots)
    return state.last_activity_at if mode == "inactivity" else None


# The tag of the element of a customer's live figures (`_live_balances`) that holds the digest of their open orders'
# awards (`orders_digest`); the other optional element is (expiry mode, what expiry decides by).
ORDERS = "orders"


def orders_digest(state: CustomerState) -> bytes | None:
    """A digest of the awards of the customer's open orders as the state holds them (per line points, points reversed
    and whether pending, per bonus points, reversed and spend threshold, the pending lots), None with none: equal for
    the live ledger's fold (`_live_orders`) and a replay when a refund or cancellation after the apply would reverse
    the same points. Orders that hold no award (no line, no bonus) are left out: a replay keeps no record of an order
    the new rules award nothing, and its compensation re-values such an order only when the live one holds awards."""
    orders = []
    for order_id, order in state.orders.items():
        if not order.revaluable() or not (order.lines or order.bonuses):
            continue
        lines = sorted((key, line.points, line.points_reversed, line.pending) for key, line in order.lines.items())
        bonuses = sorted(
            (
                rule_id,
                bonus.points,
                bonus.reversed,
                None if bonus.threshold is None else format(bonus.threshold.normalize(), "f"),
            )
            for rule_id, bonus in order.bonuses.items()
        )
        lots = sorted(
            (lot.target, round(lot.available_at.timestamp() * 1_000_000), lot.points)
            for lot in order_lots(state, order_id)
        )
        orders.append((order_id, lines, bonuses, lots))
    if not orders:
        return None
    orders.sort()
    return hashlib.blake2b(repr(orders).encode(), digest_size=8).digest()


def _unchanged(live: Mapping[str, tuple], state: CustomerState) -> bool:
    figures = live.get(state.customer_id, (0, 0, 0))
    if figures[:3] != (state.balance, state.pending, state.lifetime_earned):
        return False
    for tag, value in figures[3:]:
        if tag == ORDERS:
            # Equal totals can hide re-valued orders (one line a point more, a review a point less): a refund after
            # the apply would reverse the old awards.
            if value != orders_digest(state):
                return False
        elif value != expiry_key(state, tag):
            return False
    return True


def _keep_orders(result: ShadowResult, state: CustomerState, unawarded: _Unawarded | None, items: list) -> None:
    if result.orders is None or result.pending is None or result.restate is None:
        return
    if state.pending:
        result.pending[state.customer_id] = state.pending
    else:
        result.pending.pop(state.customer_id, None)
    live = _orders_unless_balance
    if live is not None and _unchanged(live, state):
        orders = []
        result.restate.pop(state.customer_id, None)
    else:
        orders = _open_orders(state, unawarded or {})
        # The newest event of the customer's history, entries or not (an idle tick leaves none): what the worker's
        # lots and activity hold beyond it comes from events decided since the markers.
        newest = max((event.occurred_at for _, event, _ in items), default=None)
        result.restate[state.customer_id] = Restatement.of(state, newest)
    if orders:
        result.orders[state.customer_id] = orders
    else:
        result.orders.pop(state.customer_id, None)


# Orders the replayed rules awarded nothing (below a new minimum order total, say): order id -> (when it was placed,
# the `refund:<id>` tags of its refunds, whether it was cancelled). The core keeps no record of them, but the live
# worker may hold their old awards; a compensation re-values them to nothing, so that a later refund takes back
# nothing, as under the new rules.
_Unawarded = dict[str, tuple[datetime, set[str], list[bool]]]


_epoch = datetime(1970, 1, 1, tzinfo=UTC)


def _unawarded_if(result: ShadowResult) -> _Unawarded | None:
    return {} if result.orders is not None else None


def _note_unawarded(unawarded: _Unawarded, state: CustomerState, event: ev.Event) -> None:
    if isinstance(event, ev.PurchaseCompleted):
        if event.order_id not in state.orders and event.order_id not in unawarded:
            # Refunds and a cancellation that came before the order are held in the state (engine `_hold`).
            held = (state.held or {}).get(event.order_id, ())
            refunds = {f"refund:{item['refund_id']}" for item in held if "refund_id" in item}
            unawarded[event.order_id] = (event.occurred_at, refunds, [any(item.get("cancel") for item in held)])
    elif isinstance(event, ev.PurchaseRefunded | ev.PurchaseCancelled):
        known = unawarded.get(event.order_id)
        if known is None or event.order_id in state.orders:
            return
        if isinstance(event, ev.PurchaseRefunded):
            known[1].add(f"refund:{event.refund_id}")
        else:
            known[2][0] = True


def _open_orders(state: CustomerState, unawarded: _Unawarded) -> list[dict]:
    """The awards of the customer's orders a compensation may re-value, as its `revalued_orders`, in the order they
    were placed: the open orders of the replayed state, and the orders it awarded nothing (no lines, no bonuses)."""
    orders = [
        (
            order.placed_at,
            {
                "order_id": order_id,
                "refunds": sorted(order.refund_ids),
                **order.awards(order_lots(state, order_id)),
                # For a worker the old rules left without a record of the order.
                "details": order.details(),
                "placed_at": None if order.placed_at is None else order.placed_at.isoformat(),
            },
        )
        for order_id, order in state.orders.items()
        if order.revaluable()
    ]
    orders += [
        (placed_at, {"order_id": order_id, "refunds": sorted(refunds), "lines": {}, "bonuses": {}})
        for order_id, (placed_at, refunds, cancelled) in unawarded.items()
        if order_id not in state.orders and not cancelled[0]
    ]
    if unawarded:
        orders.sort(key=lambda item: item[0] or _epoch)
    return [document for _, document in orders]


def _first_pass(
    messages: Iterable[_Fields],
    ruleset: RuleSet,
    result: ShadowResult,
    derived: dict[str, list[tuple[tuple, ev.Event]]],
    progress: Callable[[int], None] | None,
) -> None:
    for customer_id, items in _customers(messages, result, progress):
        _check_once(customer_id, result.balances)
        unawarded = _unawarded_if(result)
        state = _run_customer(customer_id, items, ruleset, result, +1, derived, unawarded)
        result.balances[customer_id] = state.balance
        if result.orders is not None:
            _keep_orders(result, state, unawarded, items)


def _check_once(customer_id: str, balances: dict[str, int]) -> None:
    """A customer's events must come as one run (the archive is sorted by routing key): two runs would be decided
    from two fresh states, and the second would silently replace the first one's balance."""
    if customer_id in balances:
        raise ReplayRefused(
            f"customer {customer_id!r} has archived events under more than one routing key; replay decides a "
            "customer's events together, so every event must be keyed by its customer (the referee's copy of a "
            "referral by the referee), as `loyalty produce` does"
        )


# What the core needs of an archived message: (topic, offset, referee side, event id, value).
_Fields = tuple[str, int, int, str, bytes]


def _fields(messages: Iterable[Any]) -> Iterator[_Fields]:
    for message in messages:
        yield message.topic, message.offset, message.referee_side, message.event_id, message.value


class _Chunk(NamedTuple):
    """Whole customers' messages for a replay process, as five columns: lists of plain values pickle at about a
    quarter of the cost of a tuple per message (2.3 vs 8.2 us per message, measured on the bench's log), and the
    calling process, which shares the CPUs with the pool, does that for every message."""

    topics: list[str]
    offsets: list[int]
    referee_sides: list[int]
    event_ids: list[str]
    values: list[bytes]

    def fields(self) -> Iterator[_Fields]:
        return zip(self.topics, self.offsets, self.referee_sides, self.event_ids, self.values, strict=True)


def _chunks(messages: Iterable[Any], size: int) -> Iterator[_Chunk]:
    """Chunks of at least `size` messages (but the last), each ending where the routing key changes."""
    chunk = _Chunk([], [], [], [], [])
    key = None
    for message in messages:
        if len(chunk.values) >= size and message.routing_key != key:
            yield chunk
            chunk = _Chunk([], [], [], [], [])
        key = message.routing_key
        chunk.topics.append(message.topic)
        chunk.offsets.append(message.offset)
        chunk.referee_sides.append(message.referee_side)
        chunk.event_ids.append(message.event_id)
        chunk.values.append(message.value)
    if chunk.values:
        yield chunk


_process_ruleset: RuleSet | None = None
_process_keeps_orders = False


def _start_process(ruleset: RuleSet, caller: int, keep_orders: bool | Mapping[str, tuple] = False) -> None:
    global _process_ruleset, _process_keeps_orders, _orders_unless_balance
    _process_ruleset = ruleset
    _process_keeps_orders = keep_orders is not False
    _orders_unless_balance = keep_orders if isinstance(keep_orders, Mapping) else None
    gc.set_threshold(*gc_thresholds)

    # A pool process waits for work on a pipe its parent also holds open; if the parent is killed (SIGKILL, the
    # OOM killer) the wait never ends. Exit when the parent is gone instead of staying behind. The caller's pid
    # comes from the caller: a parent killed while this process was still starting is gone already here.
    def exit_when_orphaned() -> None:
        while os.getppid() == caller:
            time.sleep(orphan_check_interval_s)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="replay-orphan-check", daemon=True).start()


def _replay_chunk(chunk: _Chunk) -> tuple[ShadowResult, dict[str, list[tuple[tuple, ev.Event]]]]:
    """In a replay process: the first pass over one chunk of whole customers."""
    assert _process_ruleset is not None, "replay process started without its rule set"
    kept = _process_keeps_orders
    result = ShadowResult(orders={} if kept else None, pending={} if kept else None, restate={} if kept else None)
    derived: dict[str, list[tuple[tuple, ev.Event]]] = {}
    _first_pass(chunk.fields(), _process_ruleset, result, derived, None)
    return result, derived


def _merge(
    result: ShadowResult,
    derived: dict[str, list[tuple[tuple, ev.Event]]],
    part: ShadowResult,
    part_derived: dict[str, list[tuple[tuple, ev.Event]]],
) -> None:
    for customer_id in part.balances:  # chunks hold whole customers, merged in the order they were cut
        _check_once(customer_id, result.balances)
    result.balances.update(part.balances)
    for rule_id, points in part.points_by_rule.items():
        result.points_by_rule[rule_id] = result.points_by_rule.get(rule_id, 0) + points
    result.issued += part.issued
    result.events += part.events
    result.rejected += part.rejected
    result.entries += part.entries
    if result.orders is not None and part.orders:
        result.orders.update(part.orders)
    if result.pending is not None and part.pending:
        result.pending.update(part.pending)
    if result.restate is not None and part.restate:
        result.restate.update(part.restate)
    for customer_id, events in part_derived.items():
        derived.setdefault(customer_id, []).extend(events)


def _first_pass_in_processes(
    messages: Iterable[Any],
    ruleset: RuleSet,
    result: ShadowResult,
    derived: dict[str, list[tuple[tuple, ev.Event]]],
    progress: Callable[[int], None] | None,
    processes: int,
    keep_orders: bool | Mapping[str, tuple] = False,
) -> None:
    chunks = _chunks(messages, chunk_messages)
    first = next(chunks, None)
    second = next(chunks, None) if first is not None else None
    if second is None:  # one chunk at most: starting processes would cost more than it saves
        _first_pass(first.fields() if first else iter(()), ruleset, result, derived, progress)
        return
    # spawn, not fork: replay runs inside `loyalty up`, whose threads (chDB, the event loop's executor) a
    # forked child would inherit in whatever state they were.
    context = multiprocessing.get_context("spawn")
    setup = {"initializer": _start_process, "initargs": (ruleset, os.getpid(), keep_orders)}
    with ProcessPoolExecutor(processes, mp_context=context, **setup) as pool:
        in_flight: deque = deque()

        def merge_oldest() -> None:
            _merge(result, derived, *in_flight.popleft().result())
            if progress is not None:
                progress(result.events)

        for chunk in itertools.chain((first, second), chunks):
            in_flight.append(pool.submit(_replay_chunk, chunk))
            if len(in_flight) >= processes * chunks_in_flight_per_process:
                merge_oldest()
        while in_flight:
            merge_oldest()


def _customers(messages: Iterable[_Fields], result: ShadowResult, progress: Callable[[int], None] | None):
    """(customer id, [(order key, event, side)]) per customer, from messages sorted by routing key."""
    current: str | None = None
    items: list[tuple[tuple, ev.Event, str]] = []
    for topic, offset, referee_side, event_id, value in messages:
        if not _is_history(referee_side, event_id):
            continue
        result.events += 1
        if progress is not None and result.events % progress_every_events == 0:
            progress(result.events)
        try:
            event = decode_event(value, topic)
        except EventRejected:
            result.rejected += 1
            continue
        side = "referee" if referee_side == 1 and isinstance(event, ev.ReferralCompleted) else "customer"
        customer_id = event.referee_id if side == "referee" else event.customer_id  # type: ignore[union-attr]
        if customer_id != current:
            if current is not None:
                items.sort(key=lambda item: item[0])  # already in order but for the rank of referral.reversed
                yield current, items
            current, items = customer_id, []
        items.append((order_key(event, offset), event, side))
    if current is not None:
        items.sort(key=lambda item: item[0])
        yield current, items


def _is_history(referee_side: int, event_id: str) -> bool:
    """Whether an archived message is part of the history a replay decides again."""
    if referee_side in (2, 4, 5):
        return False  # a cut-over marker, an apply's end marker or its plan, not an event
    if referee_side == 3:
        return False  # an event the live engine derived: derived again under the replayed rules
    # A compensation posted by an earlier apply is part of the live ledger, not of the history.
    return not event_id.startswith(compensation_prefix)


def _run_customer(
    customer_id: str,
    items: list[tuple[tuple, ev.Event, str]],
    ruleset: RuleSet,
    result: ShadowResult,
    sign: int,
    derived: dict[str, list[tuple[tuple, ev.Event]]] | None,
    unawarded: _Unawarded | None = None,
) -> CustomerState:
    """Apply one customer's events, adding (sign +1) or taking back (-1) their figures in `result`.

    Fingerprints are computed only for an event id seen before (`_lazy_fingerprint`): replay keeps no entry, and
    the core compares fingerprints only between events of the same id, so the figures are the same.
    """
    state = CustomerState(customer_id)
    points_by_rule = result.points_by_rule
    first_of_id: dict[str, ev.Event] = {}  # event id -> the event whose entries recorded it in state.applied
    for _, event, side in items:
        event_id = event.event_id
        fingerprint = _lazy_fingerprint
        if event_id in state.applied:  # a repeated id: compare the real fingerprints, as the drivers do
            if state.applied[event_id] == _lazy_fingerprint:
                state.applied[event_id] = event_fingerprint(first_of_id[event_id])
            fingerprint = event_fingerprint(event)
        try:
            entries = apply(state, event, ruleset, side=side, fingerprint=fingerprint)  # type: ignore[arg-type]
        except EventRejected:
            if event.event_type == "referral.reversed":
                continue
            result.rejected += sign
            continue
        if entries and event_id not in first_of_id:
            first_of_id[event_id] = event
        result.entries += sign * len(entries)
        for entry in entries:
            points = entry.points
            points_by_rule[entry.rule_id] = points_by_rule.get(entry.rule_id, 0) + sign * points
            if points > 0 and entry.kind in _issuing_kinds:
                result.issued += sign * points
        if unawarded is not None:
            _note_unawarded(unawarded, state, event)
        if derived is not None:
            for extra in derived_events(state, event, entries):
                # Position: after the referrer's own events of the same instant (as in the drivers).
                derived.setdefault(extra.customer_id, []).append((order_key(extra, 0), extra))
    return state


@dataclass
class LiveFigures:
    balances: dict[str, int]
    points_by_rule: dict[str, int]
    issued: int
    versions: list[str]
    pending: dict[str, int] = field(default_factory=dict)  # with markers: pending balances (customers with some)
    lifetime: dict[str, int] = field(default_factory=dict)  # with markers: lifetime earned points per customer


def live_figures(client, markers: Mapping[tuple[str, int], int] | None = None, version: str = "") -> LiveFigures:
    """The live ledger's figures (de-duplicated by entry id), for the comparison.

    With an apply's cut-over `markers` (and its rule set's `version`): the figures of the entries decided before
    them, while events after the markers go on being decided by `version`. An entry of another version is from
    before the markers; an entry of `version` is, when its cause (event id and customer) is archived below them (a
    compensation of an earlier apply of the same version, the events decided after that apply). The balance is
    then the sum of those entries' points: the worker orders a customer's events by time across the input topics,
    so entries from after the markers can lie between them.

    Both read the ledger in slices of whole customers of about `live_figures_slice_entries` entries
    (`_customer_slices`) and add the slices' figures up: one query over the whole ledger held memory in proportion to
    it, in ClickHouse's read with FINAL, its grouping and the rows' transfer (docs/performance.md, "The live figures
    of a dry run or apply"). What is kept is per customer.
    """
    if markers is not None:
        return _live_figures_before(client, markers, version)
    balances: dict[str, int] = {}
    by_rule: dict[str, int] = {}
    issued = 0
    for customers in _customer_slices(client, live_figures_slice_entries):
        bounds, parameters = _customer_bounds(customers)
        where = f"WHERE {bounds.removesuffix('AND ')}" if bounds else ""
        balances.update(
            (row[0], int(row[1]))
            for row in client.query(
                "SELECT customer_id, argMax(balance_after, sequence) "
                f"FROM ledger_entries FINAL {where} GROUP BY customer_id",
                parameters=parameters,
            ).result_rows
        )
        for rule_id, points, earned in client.query(
            "SELECT rule_id, sum(points), sumIf(points, kind IN ('earned', 'confirmed') AND points > 0) "
            f"FROM ledger_entries FINAL {where} GROUP BY rule_id",
            parameters=parameters,
        ).result_rows:
            by_rule[rule_id] = by_rule.get(rule_id, 0) + int(points)
            issued += int(earned or 0)
    versions = [row[0] for row in client.query("SELECT DISTINCT ruleset_version FROM ledger_entries").result_rows]
    return LiveFigures(balances, by_rule, issued, sorted(versions))


def _before_markers(
    markers: Mapping[tuple[str, int], int], version: str, customers: tuple[str | None, str | None] = (None, None)
) -> tuple[str, dict]:
    """A condition on ledger_entries: the entry was decided before the cut-over markers (every entry of another
    rule-set version, and those of `version` caused by an event archived below the markers), with its parameters.

    With `customers` (low, high): only the entries of the customers above `low` and up to `high` (None: no bound), a
    range of both tables' keys that the subquery keeps to as well, so that a read in slices of customers
    (`_live_expiry`, `_live_figures_before`) reads the archive and the entries of `version` once in all, a slice's
    share each time."""
    from projections.archive import below_markers

    condition, parameters = below_markers(markers)
    parameters["version"] = version
    low, high = customers
    parameters.update(_customer_bounds(customers)[1])
    before = (
        f"{_customer_range('customer_id', low, high)}(ruleset_version != {{version:String}} OR "
        "(caused_by, customer_id) IN ("
        f"SELECT event_id, routing_key FROM raw_events WHERE {_customer_range('routing_key', low, high)}{condition} "
        "AND event_id IN (SELECT caused_by FROM ledger_entries "
        f"WHERE {_customer_range('customer_id', low, high)}ruleset_version = {{version:String}})))"
    )
    return before, parameters


def _customer_range(column: str, low: str | None, high: str | None) -> str:
    """The start of a condition: `column` above `{customers_low}` and up to `{customers_high}` (each when given)."""
    bounds = "" if low is None else f"{column} > {{customers_low:String}} AND "
    return bounds + ("" if high is None else f"{column} <= {{customers_high:String}} AND ")


def _customer_bounds(customers: tuple[str | None, str | None]) -> tuple[str, dict]:
    """A range of customers (low, high) as the start of a condition on ledger_entries (`_customer_range`), with its
    parameters."""
    low, high = customers
    parameters = {} if low is None else {"customers_low": low}
    if high is not None:
        parameters["customers_high"] = high
    return _customer_range("customer_id", low, high), parameters


def _live_figures_before(client, markers: Mapping[tuple[str, int], int], version: str) -> LiveFigures:
    """`live_figures` with markers, slice by slice: each slice's range is one that the condition's subquery keeps to as
    well (`_before_markers`), so the archive and the entries of `version` are read once in all."""
    balances: dict[str, int] = {}
    pending: dict[str, int] = {}
    lifetime: dict[str, int] = {}
    by_rule: dict[str, int] = {}
    issued = 0
    versions: set[str] = set()
    for customers in _customer_slices(client, live_figures_slice_entries):
        before, parameters = _before_markers(markers, version, customers)
        parameters["restate_prefix"], parameters["restate_rule"] = RESTATE_PREFIX, RESTATE_RULE
        issued += _live_figures_slice(client, before, parameters, balances, pending, lifetime, by_rule)
        versions.update(
            row[0]
            for row in client.query(
                f"SELECT DISTINCT ruleset_version FROM ledger_entries WHERE {before}", parameters=parameters
            ).result_rows
        )
    pending = {customer_id: points for customer_id, points in pending.items() if points}
    return LiveFigures(balances, by_rule, issued, sorted(versions), pending, lifetime)


def _live_figures_slice(
    client,
    before: str,
    parameters: dict,
    balances: dict[str, int],
    pending: dict[str, int],
    lifetime: dict[str, int],
    by_rule: dict[str, int],
) -> int:
    """Adds one slice's entries before the markers (`before`) to the figures; returns the points they issued."""
    rows = client.query(
        "SELECT customer_id, rule_id, sum(points), "
        "sumIf(points, kind IN ('earned', 'confirmed') AND points > 0), sum(pending_points), "
        # An earlier apply's restatement is part of the live lifetime points (state._restate).
        "sumIf(JSONExtractInt(replaceOne(ifNull(reference, ''), {restate_prefix:String}, ''), "
        "'lifetime_earned_change'), rule_id = {restate_rule:String}) "
        f"FROM ledger_entries FINAL WHERE {before} GROUP BY customer_id, rule_id",
        parameters=parameters,
    ).result_rows
    issued = 0
    for customer_id, rule_id, points, earned, pending_points, restated in rows:
        balances[customer_id] = balances.get(customer_id, 0) + int(points)
        by_rule[rule_id] = by_rule.get(rule_id, 0) + int(points)
        issued += int(earned or 0)
        if earned or restated:
            lifetime[customer_id] = lifetime.get(customer_id, 0) + int(earned or 0) + int(restated or 0)
        if pending_points:
            pending[customer_id] = pending.get(customer_id, 0) + int(pending_points)
    return issued


def compare(live: LiveFigures, shadow: ShadowResult, ruleset: RuleSet, current_point_value: Decimal) -> dict:
    """The dry-run report: per customer before/after/delta, totals, losers, change per rule."""
    customers = sorted(set(live.balances) | set(shadow.balances))
    rows = []
    for customer_id in customers:
        before = live.balances.get(customer_id, 0)
        after = shadow.balances.get(customer_id, 0)
        rows.append(
            {"customer_id": customer_id, "balance_before": before, "balance_after": after, "delta": after - before}
        )
    outstanding_before = sum(live.balances.values())
    outstanding_after = sum(shadow.balances.values())
    return {
        "ruleset_versions_live": live.versions,
        "ruleset_version_new": ruleset.version,
        "events_replayed": shadow.events,
        "events_rejected": shadow.rejected,
        "customers": rows,
        "customers_changed": sum(1 for row in rows if row["delta"] != 0),
        "customers_losing_points": [row["customer_id"] for row in rows if row["delta"] < 0],
        "totals": {
            "before": {
                "issued": live.issued,
                "outstanding": outstanding_before,
                "liability": format(outstanding_before * current_point_value, "f"),
            },
            "after": {
                "issued": shadow.issued,
                "outstanding": outstanding_after,
                "liability": format(outstanding_after * ruleset.redemption.point_value, "f"),
            },
        },
        "per_rule": _per_rule_rows(live.points_by_rule, shadow.points_by_rule),
    }


def note_undecided(report: dict, customers: set[str], *, stored: bool) -> None:
    """A preview through the running system under traffic: `customers` have archived messages at or after the worker's
    committed offsets, which it had not decided (or not committed) when the replay ran, so their live balances lack
    what the replay counts; `stored`: whether everything below those offsets was projected by then. Adds
    `undecided` to the report and a warning, so that lag is not read as the rule change."""
    changed = sum(1 for row in report["customers"] if row["delta"] != 0 and row["customer_id"] in customers)
    report["undecided"] = {"customers": len(customers), "customers_changed": changed, "ledger_stored": stored}
    if customers:
        report.setdefault("warnings", []).append(
            f"{len(customers)} customers had archived events the worker had not decided yet ({changed} of them among "
            "the customers changed): their differences include that lag, not only the rule change; preview again "
            "once `loyalty status` shows no lag"
        )
    if not stored:
        report.setdefault("warnings", []).append(
            f"the projector had not stored every entry the worker had decided within {preview_settle_s:g} s: "
            "customers with recent events can show differences that are only that lag"
        )


def _per_rule_rows(before: dict[str, int], after: dict[str, int]) -> list[dict]:
    """Points per rule before and after, with the change, for every rule of either side (sorted by rule id)."""
    return [
        {
            "rule_id": rule_id,
            "points_before": before.get(rule_id, 0),
            "points_after": after.get(rule_id, 0),
            "delta": after.get(rule_id, 0) - before.get(rule_id, 0),
        }
        for rule_id in sorted(set(before) | set(after))
    ]


@dataclass
class Prepared:
    """An apply's replay of the history below `horizon` (an offset per input partition), made before its cut-over
    markers are written (`prepare`), so that the worker, which holds the events after the markers until the
    compensations are applied, waits only for the replay of what arrived between the two (`dry_run(prepared=)`)."""

    ruleset: RuleSet
    horizon: dict[tuple[str, int], int]
    shadow: ShadowResult
    seconds: float
    # The live figures its kept orders and restatements were decided against (`keep_orders`), per customer.
    live: Mapping[str, tuple] = field(default_factory=dict)


def prepare(
    client,
    ruleset: RuleSet,
    *,
    horizon: Mapping[tuple[str, int], int],
    processes: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Prepared:
    """Replay the archived history below `horizon` for an apply, comparing with the live entries of that history
    (`horizon` must be a point the worker has passed, with everything below it archived and projected)."""
    from projections.archive import RawArchive

    live = live_figures(client, horizon, ruleset.version)
    keep = _live_balances(live, _live_expiry(client, horizon, ruleset), _live_orders(client, horizon, ruleset.version))
    started = time.monotonic()
    shadow = _replay_below(RawArchive(client), horizon, ruleset, progress, processes, keep)
    return Prepared(ruleset, dict(horizon), shadow, time.monotonic() - started, keep)


def _replay_below(
    archive,
    bound: Mapping[tuple[str, int], int] | None,
    ruleset: RuleSet,
    progress: Callable[[int], None] | None,
    processes: int,
    keep_orders: bool | Mapping[str, tuple],
) -> ShadowResult:
    """`replay_messages` over the archive, below `bound` (an offset per input partition) when given."""
    return replay_messages(
        archive.stream_for_replay(before=bound),
        ruleset,
        progress=progress,
        refetch=lambda keys: archive.stream_for_replay(keys=keys, before=bound),
        processes=processes,
        keep_orders=keep_orders,
    )


def _advance(
    prepared: Prepared, archive, markers: Mapping[tuple[str, int], int], keep: Mapping[str, tuple]
) -> ShadowResult:
    """The prepared replay brought to the markers (`prepared` is spent): the customers with archived messages
    between its horizon and the markers are taken out (their history below the horizon decided again, its figures
    subtracted) and decided again over their history below the markers; so are the customers whose derived events
    (referral reversals) those histories change. `keep` as `replay_messages`' `keep_orders`."""
    ruleset, result = prepared.ruleset, prepared.shadow
    changed = archive.keys_between(prepared.horizon, markers)
    # Customers whose live figures moved with no message of theirs in between (a referral reversal the worker
    # derived in place, its copy after the markers): what is kept for them is decided against the live ones again.
    moved = {c for c in {*keep, *prepared.live} if keep.get(c) != prepared.live.get(c)} - changed
    if not changed and not moved:
        return result

    def decide(stream, sign: int, read: ShadowResult, received: Mapping[str, list], covering: set[str]) -> dict:
        """Each customer's history as the replay decides it: its figures into `result` with `sign` (with the derived
        events it `received`; with +1 also its balance and kept orders), the messages read and rejected into `read`;
        returns what the histories derive for others (decided without what they received, as in the first pass).
        A customer of `covering` with no history in `stream` but derived events received is decided from those
        alone, as `_replay` decides a referrer with no archived event of their own."""
        derives: dict[str, list[tuple[tuple, ev.Event]]] = {}

        def settle(customer_id: str, items: list, derived: dict | None) -> None:
            unawarded = _unawarded_if(result) if sign > 0 else None
            state = _run_customer(customer_id, items, ruleset, result, sign, derived, unawarded)
            if sign > 0:
                result.balances[customer_id] = state.balance
                _keep_orders(result, state, unawarded, items)

        seen: set[str] = set()
        for customer_id, items in _customers(_fields(stream), read, None):
            seen.add(customer_id)
            if sign > 0:
                # As a whole replay refuses (`_check_once`): the figures of the customers decided again were taken
                # out, so one still here was decided under another routing key, or comes twice in this stream.
                _check_once(customer_id, result.balances)
            extra = [(key, event, "customer") for key, event in received.get(customer_id, ())]
            if extra:
                _run_customer(customer_id, items, ruleset, ShadowResult(), +1, derives)
                items = sorted(items + extra, key=lambda item: item[0])
            settle(customer_id, items, None if extra else derives)
        for customer_id in sorted(covering - seen):
            items = [(key, event, "customer") for key, event in received.get(customer_id, ())]
            if items:
                settle(customer_id, items, None)
        return derives

    received = result.derived
    taken = ShadowResult()  # what the taken-out histories added to the events read and rejected
    derived_before = decide(
        archive.stream_for_replay(keys=changed, before=prepared.horizon), -1, taken, received, changed
    )
    derived_after: dict[str, list[tuple[tuple, ev.Event]]] = {}
    for customer_id, items in _customers(
        _fields(archive.stream_for_replay(keys=changed, before=markers)), ShadowResult(), None
    ):
        _run_customer(customer_id, items, ruleset, ShadowResult(), +1, derived_after)
    received_now = _derived_again(received, derived_before, derived_after)
    others = {c for c in {*received, *received_now} if _alike(received.get(c)) != _alike(received_now.get(c))}
    others = (others | moved) - changed
    if others:  # their history is the same, what they received is not
        decide(archive.stream_for_replay(keys=others, before=markers), -1, taken, received, others)
    for figures in (result.balances, result.orders or {}, result.pending or {}, result.restate or {}):
        for customer_id in changed | others:
            figures.pop(customer_id, None)
    result.events -= taken.events
    result.rejected -= taken.rejected
    global _orders_unless_balance
    _orders_unless_balance = keep
    try:
        with _fewer_collections():
            decide(
                archive.stream_for_replay(keys=changed | others, before=markers),
                +1,
                result,
                received_now,
                changed | others,
            )
    finally:
        _orders_unless_balance = None
    result.derived = received_now
    return result


def _alike(events: list[tuple[tuple, ev.Event]] | None) -> list:
    return sorted((key, event.model_dump_json()) for key, event in events or ())


def _derived_again(
    received: Mapping[str, list[tuple[tuple, ev.Event]]],
    before: Mapping[str, list[tuple[tuple, ev.Event]]],
    after: Mapping[str, list[tuple[tuple, ev.Event]]],
) -> dict[str, list[tuple[tuple, ev.Event]]]:
    """What each customer receives once the derived events of some histories go from `before` to `after`."""
    again = {customer_id: list(events) for customer_id, events in received.items()}
    for customer_id, events in before.items():
        gone = {(key, event.event_id) for key, event in events}
        again[customer_id] = [item for item in again.get(customer_id, []) if (item[0], item[1].event_id) not in gone]
    for customer_id, events in after.items():
        again.setdefault(customer_id, []).extend(events)
    return {customer_id: events for customer_id, events in again.items() if events}


def dry_run(
    client,
    ruleset: RuleSet,
    *,
    current_point_value: Decimal,
    since: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    processes: int = 1,
    markers: Mapping[tuple[str, int], int] | None = None,
    prepared: Prepared | None = None,
    configured: RuleSet | None = None,
) -> dict:
    """`markers`: an apply's cut-over markers; both sides then cover what lies before them (see `live_figures`).
    `prepared`: the apply's replay of the history below a point before the markers (`prepare`), which only the
    customers with messages since then are decided again for (or all, when derived events are involved).
    `configured`: the rule set the worker was started with (LOYALTY_RULES; None: the packaged default), by whose time
    zone it counts the cap usage of entries of a rule set it does not know (`_decided_zones`)."""
    from projections.archive import RawArchive

    archive = RawArchive(client)
    live = live_figures(client, markers, ruleset.version)
    expiry = _live_expiry(client, markers, ruleset) if markers is not None else None
    orders = _live_orders(client, markers, ruleset.version) if markers is not None else None
    started = time.monotonic()
    advanced = prepared is not None and markers is not None and prepared.ruleset is ruleset
    if advanced:
        shadow = _advance(prepared, archive, markers, _live_balances(live, expiry, orders))
    else:
        # An apply's compensations re-value the open orders of the customers whose balance changes.
        keep = _live_balances(live, expiry, orders) if markers is not None else False
        shadow = _replay_below(archive, markers, ruleset, progress, processes, keep)
    elapsed = time.monotonic() - started
    report = compare(live, shadow, ruleset, current_point_value)
    if advanced:
        report["replay_after_markers_s"] = round(elapsed, 3)  # what the worker waited for
        elapsed += prepared.seconds
    if since is not None:  # the customers listed and counted; the totals and per-rule figures stay the whole history's
        active = _customers_active_since(client, since)
        report["customers"] = [row for row in report["customers"] if row["customer_id"] in active]
        report["customers_changed"] = sum(1 for row in report["customers"] if row["delta"] != 0)
        report["customers_losing_points"] = [row["customer_id"] for row in report["customers"] if row["delta"] < 0]
        report["since"] = since.isoformat()
    report["archive_gaps"] = sorted(list(gap) for gap in archive.gaps())  # the query gives no order
    report["processes"] = processes
    report["elapsed_s"] = round(elapsed, 3)
    report["events_per_s"] = round(shadow.events / elapsed) if elapsed > 0 else None
    if shadow.orders is not None:
        report[REVALUED_ORDERS] = shadow.orders  # for `compensations`; taken out of the report shown
    if shadow.pending is not None:
        report[PENDING_CHANGES] = _pending_changes(live.pending, shadow.pending)  # the same
    if shadow.restate is not None and markers is not None:
        zones = _decided_zones(client, ruleset, configured or load_ruleset()) if ruleset.caps else None
        since, live_caps = _live_cap_usage(client, markers, ruleset, set(shadow.restate), zones)
        report[RESTATED] = {  # the same
            customer_id: restatement.restated(
                live.lifetime.get(customer_id, 0),
                live_caps.get(customer_id, {}),
                since,
                ruleset,
                expiry[1].get(customer_id) if expiry is not None and expiry[0] == "inactivity" else None,
                expiry[2].get(customer_id) if expiry is not None else None,
            )
            for customer_id, restatement in shadow.restate.items()
        }
    return report


def cap_usage_changes(
    live: Mapping[tuple[str, date], int], new: Mapping[tuple[str, date], int], since: date | None, ruleset: RuleSet
) -> list[dict]:
    """The change of the points counted against caps, per (source `ruleset` caps, local day) from `since` on: what
    a compensation restates (the usage of a source no cap of the new rules limits is never looked at)."""
    capped = {cap.source for cap in ruleset.caps}
    keys = sorted(
        (key for key in {*live, *new} if key[0] in capped and (since is None or key[1] >= since)),
        key=lambda key: (key[1], key[0]),
    )
    changes = ((source, day, new.get((source, day), 0) - live.get((source, day), 0)) for source, day in keys)
    return [{"source": source, "day": day.isoformat(), "points": points} for source, day, points in changes if points]


def _decided_zones(client, ruleset: RuleSet, configured: RuleSet) -> tuple[dict[str, str], str]:
    """The time zone the worker counts an entry's cap usage in, per rule-set version, and for the versions it does not
    know: that of the rule set that decided the entry (`evolve` with the deciding rule set's zone), which the worker
    knows when it is the configured one (`configured`) or one an apply recorded (the `rulesets` table, as
    loyalty.rulesets); a restarted worker folds the entries of any other version in the configured rule set's zone
    (streams/applier.py, `restore`), and so does this."""
    from streams.rules.ruleset import RuleSetInvalid, parse_ruleset

    zones = {configured.version: configured.timezone}
    for version, text in known_rulesets(client).items():
        try:
            zones[version] = parse_ruleset(text, f"version {version}").timezone
        except RuleSetInvalid:
            continue  # the worker could not load it either
    zones[ruleset.version] = ruleset.timezone
    return zones, configured.timezone


def _live_cap_usage(
    client,
    markers: Mapping[tuple[str, int], int],
    ruleset: RuleSet,
    customers: set[str],
    zones: tuple[Mapping[str, str], str] | None = None,
) -> tuple[date | None, dict[str, dict[tuple[str, date], int]]]:
    """The points counted against caps live before the markers, per customer of `customers`, on the local days a cap
    can still look at: from `cap_history_days_max` days before the last event before the markers (as the worker
    folds them, `state.evolve`: earned and pending entries that add points, and earlier apply's restatements), each
    entry on its day in the time zone the worker counts it in (`zones`: per version, and for other versions,
    `_decided_zones`; None: `ruleset`'s for all), so that the change restated cancels what the worker holds when the
    time zone changed between the rule sets. Returns the first of those days in `ruleset`'s zone (None when nothing
    lies before the markers)."""
    if not ruleset.caps:
        return None, {}  # no usage to restate: the ledger is not read
    before, parameters = _before_markers(markers, ruleset.version)
    latest = client.query(
        f"SELECT max(occurred_at), count() FROM ledger_entries WHERE {before}", parameters=parameters
    ).result_rows[0]
    if not latest[1]:
        return None, {}
    zone = ruleset.zone
    since = local_day(latest[0].replace(tzinfo=UTC), zone) - timedelta(days=cap_history_days_max)
    parameters |= {
        # A day earlier: an entry counted in another zone can fall on `since` there and before it in `ruleset`'s.
        "since": datetime.combine(since - timedelta(days=1), datetime.min.time(), zone).astimezone(UTC),
        "sources": sorted({cap.source for cap in ruleset.caps}),
        "restate_rule": RESTATE_RULE,
    }
    by_version, other = zones if zones is not None else ({}, ruleset.timezone)
    # One query per time zone (ClickHouse takes a constant one): the versions of that zone, and for the zone of the
    # versions not named, every version of no other zone.
    named: dict[str, list[str]] = {}
    for version, name in by_version.items():
        named.setdefault(name, []).append(version)
    usage: dict[str, dict[tuple[str, date], int]] = {}
    for name in sorted({*named, other}):
        if name == other:
            versions = sorted(version for version, zone_name in by_version.items() if zone_name != name)
            which = "NOT IN"
        else:
            versions, which = sorted(named[name]), "IN"
        with client.query_row_block_stream(
            "SELECT customer_id, source, toDate(occurred_at, {zone:String}) AS day, sum(points + pending_points) "
            f"FROM ledger_entries FINAL WHERE {before} AND kind IN ('earned', 'pending') "
            "AND (points > 0 OR pending_points > 0) AND source IN {sources:Array(String)} "
            "AND occurred_at >= {since:DateTime64(6, 'UTC')} "
            f"AND ruleset_version {which} {{versions:Array(String)}} GROUP BY customer_id, source, day",
            parameters=parameters | {"zone": name, "versions": versions},
        ) as stream:
            for block in stream:
                for customer_id, source, day, points in block:
                    if customer_id in customers:
                        customer = usage.setdefault(customer_id, {})
                        customer[(source, day)] = customer.get((source, day), 0) + int(points)
    restated = client.query(
        f"SELECT customer_id, reference FROM ledger_entries FINAL WHERE {before} AND rule_id = {{restate_rule:String}}",
        parameters=parameters,
    ).result_rows
    for customer_id, reference in restated:  # an earlier apply's restatement is part of the live usage
        if customer_id not in customers or not reference:
            continue
        for source, day, points in json.loads(reference.removeprefix(RESTATE_PREFIX)).get("cap_usage_changes", ()):
            key = (source, date.fromisoformat(day))
            customer = usage.setdefault(customer_id, {})
            customer[key] = customer.get(key, 0) + points
    return since, usage


def _live_balances(
    live: LiveFigures,
    expiry: tuple[str, dict[str, Any]] | None = None,
    orders: Mapping[str, bytes] | None = None,
) -> dict[str, tuple]:
    """Per customer (balance, pending balance, lifetime earned points) live, with `expiry` (the new rules' expiry mode
    and per customer what it decides by, `_live_expiry`) also (mode, that), with `orders` (per customer the digest of
    their open orders' live awards, `_live_orders`) also (ORDERS, that): the replay keeps the orders and the
    restatement of the customers where one differs."""
    customers = set(live.balances) | set(live.pending) | set(live.lifetime) | set(orders or ())
    figures: dict[str, tuple] = {
        customer_id: (
            live.balances.get(customer_id, 0),
            live.pending.get(customer_id, 0),
            live.lifetime.get(customer_id, 0),
        )
        for customer_id in customers
    }
    if expiry is not None:
        mode, keys = expiry[0], expiry[1]
        figures = {customer_id: (*row, (mode, keys.get(customer_id))) for customer_id, row in figures.items()}
    if orders is not None:
        figures = {customer_id: (*row, (ORDERS, orders.get(customer_id))) for customer_id, row in figures.items()}
    return figures


class _LivePurchaseEntry(NamedTuple):
    """What `state.evolve_orders` reads of a ledger entry."""

    kind: Kind
    source: Source
    rule_id: str
    event_type: str
    reference: str | None
    order_id: str | None
    sku: str | None
    category: str | None
    quantity: int | None
    amount: str | None
    points: int
    pending_points: int
    occurred_at: datetime
    available_at: datetime | None


def _live_orders(client, markers: Mapping[tuple[str, int], int], version: str) -> dict[str, bytes]:
    """Per customer with open orders holding awards, the digest of those awards in the live ledger before the markers
    (`orders_digest`), folded as the worker folds them (`state.evolve_orders`: the purchase entries, re-valuations
    of earlier applies included). A customer whose totals are the same under the new rules but whose orders are
    valued otherwise is compensated too, with 0 points and the re-valued orders.

    Reads the purchase entries before the markers once, ordered by customer and sequence, in the slices of
    `_live_expiry` (`_ledger_slices`); what is kept is one digest per customer."""
    digests: dict[str, bytes] = {}
    for customers in _customer_slices(client, live_expiry_slice_entries):
        digests.update(_live_orders_slice(client, markers, version, customers))
    return digests


def _live_orders_slice(
    client, markers: Mapping[tuple[str, int], int], version: str, customers: tuple[str | None, str | None]
) -> dict[str, bytes]:
    before, parameters = _before_markers(markers, version, customers)
    parameters["purchase"] = Source.purchase.value
    digests: dict[str, bytes] = {}
    state: CustomerState | None = None

    def done(state: CustomerState) -> None:
        digest = orders_digest(state)
        if digest is not None:
            digests[state.customer_id] = digest

    with client.query_row_block_stream(
        "SELECT customer_id, kind, rule_id, event_type, reference, order_id, sku, category, quantity, amount, points, "
        "pending_points, occurred_at, available_at "
        f"FROM ledger_entries FINAL WHERE source = {{purchase:String}} AND {before} ORDER BY customer_id, sequence",
        parameters=parameters,
    ) as stream:
        for block in stream:
            for row in block:
                customer_id = row[0]
                if state is None or state.customer_id != customer_id:
                    if state is not None:
                        done(state)
                    state = CustomerState(customer_id)
                kind = row[1]
                entry = _LivePurchaseEntry(
                    _kinds_by_value.get(kind) or Kind(kind),
                    Source.purchase,
                    row[2],
                    row[3],
                    row[4],
                    row[5],
                    row[6],
                    row[7],
                    None if row[8] is None else int(row[8]),
                    row[9],
                    int(row[10]),
                    int(row[11]),
                    _utc(row[12]),
                    _utc(row[13]),
                )
                evolve_orders(state, entry)  # type: ignore[arg-type]
    if state is not None:
        done(state)
    return digests


class _LiveEntry(NamedTuple):
    """What `state.evolve_expiry` reads of a ledger entry."""

    kind: Kind
    points: int
    pending_points: int
    occurred_at: datetime
    available_at: datetime | None


def _live_expiry(
    client, markers: Mapping[tuple[str, int], int], ruleset: RuleSet
) -> tuple[str, dict[str, Any], dict[str, datetime]] | None:
    """When the new rules expire points: per customer what expiry decides by (`expiry_key`) in the live ledger before
    the markers, folded as the worker folds it (`state.evolve_expiry`, and earlier applies' restatements). A customer
    whose balances are the same under the new rules but whose lots or last activity are not (a change of the return
    window alone dates them otherwise) is compensated too, with 0 points and the restatement. Also per customer the
    newest of those entries' times (an earlier apply's compensation is dated at its cut-over, after the history:
    `Restatement.restated`'s `live_until`).

    Reads every entry before the markers once, ordered by customer and sequence, in slices of whole customers of about
    `live_expiry_slice_entries` entries (`_ledger_slices`), each a range of the table's key that the condition's
    subquery keeps to as well (`_before_markers`): one query over the whole ledger held memory in proportion to the
    entries it returned, most of it in ClickHouse's read with FINAL (docs/performance.md, "The live ledger read of an
    expiring apply"). What is kept is one key and one time per customer; by lot the key is the customer's lots, which
    grow with the points the customer earned and no redemption or expiry took yet."""
    mode = ruleset.expiry.mode
    if mode == "none":
        return None
    keys: dict[str, Any] = {}
    newest: dict[str, datetime] = {}
    for customers in _customer_slices(client, live_expiry_slice_entries):
        slice_keys, slice_newest = _live_expiry_keys(client, markers, ruleset, mode, customers)
        keys.update(slice_keys)
        newest.update(slice_newest)
    return mode, keys, newest


def _customer_slices(client, entries: int) -> list[tuple[str | None, str | None]]:
    """Contiguous ranges (low, high) over every customer of the ledger, the first and last open, of about `entries`
    entries each (`_ledger_slices`), as `_before_markers` takes them."""
    highs = _ledger_slices(client, entries) or [None]
    return [
        (highs[number - 1] if number > 0 else None, high if number < len(highs) - 1 else None)
        for number, high in enumerate(highs)
    ]


def _ledger_slices(client, entries: int | None = None) -> list[str]:
    """The last customer of each of consecutive slices of the ledger, about `entries` (by default
    `live_expiry_slice_entries`) entries each (every entry counted: copies not merged yet and entries after the markers
    too) and never splitting a customer: one row per slice, computed in ClickHouse, as `RawArchive._slices` cuts the
    archive."""
    rows = client.query(
        "SELECT max(customer_id) FROM ("
        "SELECT customer_id, intDiv(sum(entries) OVER (ORDER BY customer_id ROWS UNBOUNDED PRECEDING) - 1, "
        "{slice_entries:UInt64}) AS slice FROM ("
        "SELECT customer_id, count() AS entries FROM ledger_entries GROUP BY customer_id)) "
        "GROUP BY slice ORDER BY slice",
        parameters={"slice_entries": entries or live_expiry_slice_entries},
    ).result_rows
    return [row[0] for row in rows]


def _live_expiry_keys(
    client,
    markers: Mapping[tuple[str, int], int],
    ruleset: RuleSet,
    mode: str,
    customers: tuple[str | None, str | None],
) -> tuple[dict[str, Any], dict[str, datetime]]:
    """`_live_expiry`'s keys and newest times of the customers of one slice (`customers`: low, high, as
    `_before_markers` takes them)."""
    before, parameters = _before_markers(markers, ruleset.version, customers)
    parameters["restate_rule"] = RESTATE_RULE
    keys: dict[str, Any] = {}
    newest: dict[str, datetime] = {}
    state: CustomerState | None = None
    with client.query_row_block_stream(
        "SELECT customer_id, kind, points, pending_points, occurred_at, available_at, "
        "if(rule_id = {restate_rule:String}, ifNull(reference, ''), '') "
        f"FROM ledger_entries FINAL WHERE {before} ORDER BY customer_id, sequence",
        parameters=parameters,
    ) as stream:
        for block in stream:
            for customer_id, kind, points, pending_points, occurred_at, available_at, restated in block:
                if state is None or state.customer_id != customer_id:
                    if state is not None:
                        keys[state.customer_id] = expiry_key(state, mode)
                    state = CustomerState(customer_id)
                moment = _utc(occurred_at)
                if customer_id not in newest or moment > newest[customer_id]:
                    newest[customer_id] = moment
                entry = _LiveEntry(
                    _kinds_by_value.get(kind) or Kind(kind),
                    int(points),
                    int(pending_points),
                    moment,
                    _utc(available_at),
                )
                state.balance += entry.points
                evolve_expiry(state, entry, entry.kind)  # type: ignore[arg-type]
                if restated:
                    restate_expiry(state, restated, moment)
    if state is not None:
        keys[state.customer_id] = expiry_key(state, mode)
    return keys, newest


def _utc(moment: datetime | None) -> datetime | None:
    """ClickHouse's DateTime64(6, 'UTC') as an aware datetime (the client may return it naive)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _pending_changes(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    changes = {customer_id: after.get(customer_id, 0) - before.get(customer_id, 0) for customer_id in {*before, *after}}
    return {customer_id: change for customer_id, change in changes.items() if change}


def preview_customer(client, ruleset: RuleSet, customer_id: str) -> dict:
    """One customer's history under `ruleset`, entry by entry and event by event, beside their live ledger.

    The customer's archived events are decided by the batch driver (`loyalty process`) together with those of the
    customers they referred: a referee's refund derives the `referral.reversed` that takes the referrer's award
    back, and that depends on the referee's own events alone. The entries are then exactly the customer's entries
    in a replay of the whole archive, and the balance is the dry-run report's `balance_after`.
    """
    from projections import queries
    from projections.archive import RawArchive
    from streams.batch import process_lines

    archive = RawArchive(client)
    own = [m for m in archive.stream_for_replay(keys=[customer_id]) if _is_history(m.referee_side, m.event_id)]
    referees = sorted(_referees_of(customer_id, own))
    theirs = [m for m in archive.stream_for_replay(keys=referees) if _is_history(m.referee_side, m.event_id)]
    lines: list[bytes] = []
    seen: set[bytes] = set()

    def add(messages: list) -> None:
        for message in messages:
            if message.value not in seen:  # a referral archived on both sides, a re-sent message: one line
                seen.add(message.value)
                lines.append(message.value)

    add(own)
    own_lines = len(lines)
    add(theirs)
    shadow = process_lines(lines, ruleset)
    after = [entry for entry in shadow.ledger if entry.customer_id == customer_id]
    before = []
    while True:  # the live ledger, de-duplicated by entry id, in sequence order
        page = queries.history(client, customer_id, limit=queries.HISTORY_LIMIT_MAX, offset=len(before))
        before.extend(page)
        if len(page) < queries.HISTORY_LIMIT_MAX:
            break
    balance_before = before[-1].balance_after if before else 0
    balance_after = after[-1].balance_after if after else 0
    return {
        "customer_id": customer_id,
        "ruleset_versions_live": sorted({entry.ruleset_version for entry in before}),
        "ruleset_version_new": ruleset.version,
        "events_replayed": own_lines,
        "referees_decided": len(referees),
        "balance_before": balance_before,
        "balance_after": balance_after,
        "delta": balance_after - balance_before,
        "events": _events_side_by_side(before, after),
        "per_rule": _per_rule_rows(_points_by_rule(before), _points_by_rule(after)),
        "entries_before": [entry.model_dump(mode="json") for entry in before],
        "entries_after": [entry.model_dump(mode="json") for entry in after],
    }


def _referees_of(customer_id: str, messages: list) -> set[str]:
    """The customers `customer_id` referred, from the referrals archived under their key (the referrer's side)."""
    referees = set()
    for message in messages:
        if message.referee_side != 0 or message.topic != REFERRALS:
            continue
        try:
            event = decode_event(message.value, message.topic)
        except EventRejected:
            continue
        if isinstance(event, ev.ReferralCompleted) and event.customer_id == customer_id:
            referees.add(event.referee_id)
    return referees - {customer_id}


def _events_side_by_side(before: list, after: list) -> list[dict]:
    """Per causing event: the points (available, and pending) it added live and under the new rules, and the rules
    of its new entries. A pending award shows as pending on its purchase and as points on the event that confirmed
    it."""
    events: dict[str, dict] = {}
    for side, entries in (("before", before), ("after", after)):
        for entry in entries:
            row = events.setdefault(
                entry.caused_by,
                {
                    "event_id": entry.caused_by,
                    "event_type": entry.event_type,
                    "occurred_at": entry.occurred_at.isoformat(),
                    "points_before": 0,
                    "points_after": 0,
                    "pending_points_before": 0,
                    "pending_points_after": 0,
                    "rules_after": [],
                },
            )
            row[f"points_{side}"] += entry.points
            row[f"pending_points_{side}"] += entry.pending_points
            if side == "after" and entry.rule_id not in row["rules_after"]:
                row["rules_after"].append(entry.rule_id)
    rows = sorted(events.values(), key=lambda row: (row["occurred_at"], row["event_id"]))
    for row in rows:
        row["delta"] = row["points_after"] - row["points_before"]
    return rows


def _points_by_rule(entries: list) -> dict[str, int]:
    points: dict[str, int] = {}
    for entry in entries:
        points[entry.rule_id] = points.get(entry.rule_id, 0) + entry.points
    return points


def _customers_active_since(client, since: datetime) -> set[str]:
    """Customers with a ledger entry dated `since` or later, a replay's own compensations aside (they are dated at
    their cut-over, and would make every compensated customer active)."""
    result = client.query(
        "SELECT DISTINCT customer_id FROM ledger_entries WHERE occurred_at >= {since:DateTime64(6, 'UTC')} "
        "AND NOT startsWith(caused_by, {prefix:String})",
        parameters={"since": since, "prefix": compensation_prefix},
    )
    return {row[0] for row in result.result_rows}


def parse_since(text: str) -> datetime:
    """`--since`: a date or a date and time in ISO 8601; one without a UTC offset is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since: not a date or time: {text!r} (ISO 8601, e.g. 2026-05-16 or 2026-05-16T12:00:00+02:00)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def known_rulesets(client) -> dict[str, str]:
    """The rule-set documents an apply put in force (the `rulesets` table): version -> text."""
    rows = client.query("SELECT version, argMax(text, recorded_at) FROM rulesets GROUP BY version").result_rows
    return {version: text for version, text in rows}


def activated_versions(client) -> list[str]:
    """The versions of the archived cut-over markers, in the order they were first archived (the applies' order, as
    `streams.restore` writes their activations back): the last one is the rule set in force."""
    from projections.archive import RawArchive

    versions: list[str] = []
    for _, _, _, version in RawArchive(client).cutover_markers():
        if not versions or versions[-1] != version:
            versions.append(version)
    return versions


def version_conflict(
    new: RuleSet, known: Mapping[str, str], in_force: RuleSet, activated: Iterable[str] = ()
) -> str | None:
    """Why `new` cannot be applied under its version: another rule set was applied, or is in force, with that version;
    or it was applied before and another one since (`activated`: the versions of the applies, `activated_versions`).

    Compensation ids, the worker's rule sets and the ledger's `ruleset_version` all name a rule set by its version,
    so a second rule set under one version would be taken for the first: its compensations refused as conflicts,
    and the entries of the two indistinguishable. The same holds for the same rules applied again after another rule
    set (A -> B -> A -> B): the second apply's compensations have the first one's ids."""
    from streams.rules.ruleset import RuleSetInvalid, parse_ruleset

    others = []
    if in_force.version == new.version:
        others.append(in_force)
    if new.version in known:
        try:
            others.append(parse_ruleset(known[new.version], f"version {new.version}"))
        except RuleSetInvalid:
            return f"version {new.version} was applied before with a document that no longer parses"
    if any(other != new for other in others):
        return (
            f"rule set version {new.version} is already in use with other rules: give the new rule set a version of "
            "its own (its `version` key)"
        )
    if new.version != in_force.version and new.version in set(activated):
        return (
            f"rule set version {new.version} was applied before and replaced since by {in_force.version}: its "
            "compensations would have the ids of the first apply's, which the worker refuses as conflicting repeats; "
            "give the rule set a version of its own (its `version` key)"
        )
    return None


REVALUED_ORDERS = "revalued_orders"
PENDING_CHANGES = "pending_changes"  # per customer, the change of the pending balance (an apply's; not shown)
RESTATED = "restated"  # per customer kept, the lifetime change and first-order mark (an apply's; not shown)
# A compensation stays under this size with its re-valued orders (the worker refuses events over 64 KiB, and a
# refused compensation would lose its balance correction too): the newest orders go in first, the rest stay as they
# are live.
compensation_bytes_max = 48 * 1024


def compensations(report: dict, *, cut_over: datetime, store_id: str = "replay") -> list[tuple[str, bytes]]:
    """One `points.adjusted` event per customer whose balance or pending balance changes (customer id, JSON bytes),
    followed by 0-point continuations when the customer's re-valued open orders do not fit in one event.

    Ids are derived from the new rule-set version and the customer, so a repeated apply publishes the very
    same events, which the worker recognises and applies once. With the report's open orders under the new rules
    (an apply's), each event carries the customer's, which the worker re-values (`engine._revalue_order`). The
    event's points are the change of available and pending points together: the re-valuation of an order moves its
    own change of pending points between the two, so an order that cannot be re-valued leaves its share on the
    available balance instead of in a pending balance that no lot would ever confirm or reverse.
    """
    version = report["ruleset_version_new"]
    orders = report.get(REVALUED_ORDERS) or {}
    pending = report.get(PENDING_CHANGES) or {}
    restated = report.get(RESTATED) or {}
    published = []
    for row in report["customers"]:
        pending_change = pending.get(row["customer_id"], 0)
        restate = restated.get(row["customer_id"])
        # An apply's replay keeps a restatement only for a customer whose figures differ (`_keep_orders`): balances,
        # lifetime earned points, or what the new rules' expiry decides by.
        if row["delta"] == 0 and pending_change == 0 and not restate:
            continue
        note = f"was {row['balance_before']}, now {row['balance_after']}"
        if pending_change:
            note += f"; pending {pending_change:+d}"
        event = {
            "event_id": f"{compensation_prefix}{version}:{row['customer_id']}"[:128],
            "event_type": "points.adjusted",
            "schema_version": 1,
            "occurred_at": cut_over.astimezone(UTC).isoformat(),
            "customer_id": row["customer_id"],
            "store_id": store_id,
            "adjustment_id": f"{compensation_prefix}{version}"[:128],
            "points": row["delta"] + pending_change,
            "note": f"replay: balances recomputed under rule set {version} ({note})",
            "actor": COMPENSATION_ACTOR,
            "allow_negative": True,
        }
        customer_orders = orders.get(row["customer_id"]) or []
        whole = _whole_if_fitting(event, restate, customer_orders) if len(customer_orders) <= 200 else None
        if whole is not None:  # what the steps below give when everything fits, serialised once instead of thrice
            published.append((row["customer_id"], whole))
            continue
        if restate:
            event[RESTATED] = _restated_fitting(event, dict(restate))
        if customer_orders:
            event[REVALUED_ORDERS] = _fitting(event, customer_orders)
        rest = customer_orders[: len(customer_orders) - len(event.get(REVALUED_ORDERS, ()))]
        restatement = None
        if rest and restate and restate.get("lots") is not None:
            # Restated lots go last, after every part's orders have moved their points between pending and
            # available: the lots hold the available balance as it is then (folding the first part's lots and then
            # a continuation's moves dated the moved points at the cut-over, from the oldest lot). The rest of a
            # restatement does not depend on the balance, and stays in the first part.
            restatement = event.pop(RESTATED)
            event[REVALUED_ORDERS] = _fitting(event, customer_orders)
            rest = customer_orders[: len(customer_orders) - len(event[REVALUED_ORDERS])]
        published.append((row["customer_id"], json.dumps(event, separators=(",", ":")).encode()))
        parts = _continuations(event, rest, version)
        if restatement is not None:
            parts.append(_restatement_part(event, restate, version, len(parts) + 2))
        published += [(row["customer_id"], value) for value in parts]
    return published


def _whole_if_fitting(event: dict, restate: dict | None, orders: list[dict]) -> bytes | None:
    """The compensation with its whole restatement and every order, if `_fitting` would keep every order (then
    `_restated_fitting` keeps the whole restatement too): its JSON is 3 bytes shorter than `_fitting`'s bound. Tried
    only up to 200 orders: more hardly fit in `compensation_bytes_max`, and a try that fails is work done twice."""
    whole = dict(event)
    if restate:
        whole[RESTATED] = dict(restate)
    if orders:
        whole[REVALUED_ORDERS] = orders
    value = json.dumps(whole, separators=(",", ":")).encode()
    return value if len(value) + 3 <= compensation_bytes_max else None


def _restatement_part(first: dict, restate: dict, version: str, part: int) -> bytes:
    """The last, 0-point part of a compensation with continuations: the customer's restatement alone."""
    event = _part(first, version, part, f"replay: restated under rule set {version} (part {part})")
    event[RESTATED] = _restated_fitting(event, dict(restate))
    return json.dumps(event, separators=(",", ":")).encode()


def _part(first: dict, version: str, part: int, note: str) -> dict:
    """A 0-point part after a customer's first compensation, without its restatement and orders:
    `replay:<version>#<part>:<customer>`, adjustment id `replay:<version>#<part>`."""
    event = {key: value for key, value in first.items() if key not in (RESTATED, REVALUED_ORDERS)}
    return event | {
        "event_id": f"{compensation_prefix}{version}#{part}:{first['customer_id']}"[:128],
        "adjustment_id": f"{compensation_prefix}{version}#{part}"[:128],
        "points": 0,
        "note": note,
    }


def _restated_fitting(event: dict, restated: dict) -> dict:
    """`restated` cut until the compensation is under `compensation_bytes_max` without orders: the oldest referees'
    points first, then the oldest days of cap usage (what is cut stays as it is live), then the oldest lots merged
    into one. A compensation over the worker's limit would be refused whole, its balance change with it."""
    while len(json.dumps({**event, RESTATED: restated}, separators=(",", ":")).encode()) > compensation_bytes_max:
        referees = list((restated.get("referrer_points") or {}).items())
        caps = restated.get("cap_usage_changes") or []
        lots = restated.get("lots") or []
        if referees:
            restated["referrer_points"] = dict(referees[len(referees) // 4 + 1 :])
        elif caps:
            restated["cap_usage_changes"] = caps[len(caps) // 4 + 1 :]
        elif len(lots) > 1:
            restated["lots"] = _merged_oldest(lots, len(lots) - len(lots) // 4 - 1)
        else:
            break
    return restated


def _continuations(first: dict, rest: list[dict], version: str) -> list[bytes]:
    """0-point compensations that carry the open orders the customer's first one had no room for, the newer first,
    each under the size limit: `replay:<version>#<part>:<customer>`, adjustment id `replay:<version>#<part>`."""
    events = []
    part = 2
    while rest:
        event = _part(first, version, part, f"replay: open orders re-valued under rule set {version} (part {part})")
        fitting = _fitting(event, rest)
        if not fitting:
            break  # an order alone over the size limit stays as it is live, and so do the older ones
        event[REVALUED_ORDERS] = fitting
        events.append(json.dumps(event, separators=(",", ":")).encode())
        rest = rest[: len(rest) - len(fitting)]
        part += 1
    return events


def _fitting(event: dict, orders: list[dict]) -> list[dict]:
    """The newest of `orders` (in the order they were placed) that keep the event under `compensation_bytes_max`."""
    room = compensation_bytes_max - len(json.dumps(event, separators=(",", ":")).encode()) - len(REVALUED_ORDERS) - 8
    fitting: list[dict] = []
    for order in reversed(orders):
        size = len(json.dumps(order, separators=(",", ":")).encode()) + 1
        if size > room:
            break
        room -= size
        fitting.append(order)
    fitting.reverse()
    return fitting


def publish(
    bootstrap: str,
    events: list[tuple[str, bytes]],
    version: str | None = None,
    markers: Mapping[tuple[str, int], int] | None = None,
    moments: dict[str, float] | None = None,
) -> int:
    """Send the compensations; with the apply's `version` and cut-over `markers`, first its plan (who is compensated:
    the worker releases the other customers' events at once, `streams.cutover.publish_plan`) and after them its end
    marker into every partition of their topic, which ends the worker's wait (`streams.cutover.publish_compensated`).
    Each step is flushed (acknowledged) before the next is sent, so no retry reorders them."""
    from streams.cutover import publish_compensated, publish_plan
    from streams.producer import make_producer

    moments = {} if moments is None else moments  # when each step was done (time.monotonic()), filled in
    producer = make_producer(bootstrap)
    try:
        if version is not None and markers is not None:
            publish_plan(producer, version, dict(markers), dict(Counter(customer_id for customer_id, _ in events)))
            moments["plan_published"] = time.monotonic()
        futures = [producer.send(REDEMPTIONS, value=value, key=customer_id.encode()) for customer_id, value in events]
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if one was not written: the apply reports it and is run again
        moments["compensations_published"] = time.monotonic()
        if version is not None and markers is not None:
            publish_compensated(producer, version, dict(markers))
    finally:
        producer.close()
    return len(events)


def write_csv(report: dict, path: Path) -> None:
    """The per-customer diff for a spreadsheet. A customer id a spreadsheet would read as a formula (starting with
    =, +, -, @, a tab or a carriage return) is written after a `'`, which spreadsheets show as text."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["customer_id", "balance_before", "balance_after", "delta"])
        writer.writeheader()
        for row in report["customers"]:
            customer_id = row["customer_id"]
            if customer_id.startswith(_formula_starts):
                row = {**row, "customer_id": "'" + customer_id}
            writer.writerow(row)


_formula_starts = ("=", "+", "-", "@", "\t", "\r")


def check_apply_allowed(*, gaps: list, lag: int, lag_max: int) -> None:
    """Refuse `--apply` while the archive has gaps (history would be missing from the comparison) or the worker
    lags beyond the bound (the cut-over would wait for it)."""
    if gaps:
        from projections.archive import describe_gaps

        raise ReplayRefused(
            f"the raw archive misses messages below its end ({describe_gaps(gaps)}): the replay would compare with "
            "incomplete history. The projector archives each partition in offset order, so waiting does not fill them "
            "(docs/operations.md, 'Retention')"
        )
    if lag > lag_max:
        raise ReplayRefused(f"the worker lags by {lag} messages (bound {lag_max}); wait until it catches up")


def apply_report(
    report: dict,
    *,
    bootstrap: str,
    cut_over: datetime | None = None,
    markers: Mapping[tuple[str, int], int] | None = None,
) -> dict:
    """Publish the compensating adjustments of a dry-run report, then (with the apply's cut-over `markers`) its end
    markers, even with no compensation: they end the worker's wait. Returns what was published."""
    moment = cut_over or datetime.now(UTC)
    events = compensations(report, cut_over=moment)
    moments = {"compensations_built": time.monotonic()}
    published = publish(bootstrap, events, report["ruleset_version_new"], markers, moments)
    return {"compensations_published": published, "cut_over": moment.isoformat(), "moments": moments}
