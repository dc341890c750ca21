"""After `loyalty replay --apply` halfway through a log, do the balances equal `loyalty process` under the new rules
over the whole log, events after the apply included? For every ordered pair of the packaged rule sets.

    python tests/tools/apply_differential.py [--events 6000] [--customers 300] [--seed 5]
        [--no-revalue] [--lifetime-only]

A model of the live worker built from the pure functions, no Kafka or ClickHouse: each customer's events in the
drivers' order (`streams.batch.order_key`), those dated before the cut-over T (the log's median event time) under the
old rules, then the apply's compensation (`streams.replay.compensations` of a replay of the events before T, with
the re-valued orders and pending changes), then the rest under the new rules; derived events (referral reversals)
are decided by their cause's rule set, as in the worker. It prints, per pair, how many customers end with another
available balance, and how many another total of available and pending points, than `process_lines` under the new
rules over the whole log. It is a measuring tool (what the apply does not carry over is listed in docs/replay.md,
"Known limits"); tests/streams/test_replay_lots.py runs one pair of it. `--mean-gap-seconds 10000` spreads the log
over about two years, so that lots awarded before the apply expire after it.
"""

from __future__ import annotations

import argparse
import itertools
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from projections.archive import ArchivedMessage
from schemas import events as ev
from schemas.decode import EventRejected, decode_event
from schemas.ledger import LedgerEntry
from schemas.topics import REDEMPTIONS, REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK
from streams.batch import order_key, process_lines
from streams.replay import (
    PENDING_CHANGES,
    RESTATED,
    REVALUED_ORDERS,
    Restatement,
    compensations,
    expiry_key,
    orders_digest,
    replay_messages,
)
from streams.routing import routes_for
from streams.rules.engine import apply, derived_events
from streams.rules.ruleset import load_ruleset
from streams.rules.state import CustomerState, cap_history_days_max
from streams.simulate import generate_events

RULESETS = Path(__file__).resolve().parents[2] / "streams/rules/rulesets"
NAMES = ["default.yaml", "seasonal-promotion.yaml", "advanced-coupons.yaml", "full-lifecycle.yaml"]


def _moment(raw: bytes) -> datetime:
    return datetime.fromisoformat(json.loads(raw)["occurred_at"]).astimezone(UTC)


def _live_cap_usage(entries: list[LedgerEntry], zones: dict) -> dict[tuple[str, date], int]:
    """The customer's live cap usage as the apply reads it from the ledger (`replay._live_cap_usage`): earned and
    pending entries that add points, each on the local day of the rule set that decided it (`zones`, per version).
    Not `state.cap_usage`: the worker's own usage would hide an apply that counts the days otherwise (it did, on the
    new rules' days, until 2026-11-28)."""
    usage: dict[tuple[str, date], int] = {}
    for entry in entries:
        if entry.kind.value in ("earned", "pending") and (entry.points > 0 or entry.pending_points > 0):
            key = (entry.source.value, entry.occurred_at.astimezone(zones[entry.ruleset_version]).date())
            usage[key] = usage.get(key, 0) + entry.points + entry.pending_points
    return usage


def _restated(
    restatement: Restatement, state: CustomerState, live_caps: dict, since: date, new, lifetime_only: bool
) -> dict:
    restated = restatement.restated(state.lifetime_earned, live_caps, since, new, state.last_activity_at)
    if lifetime_only:  # the code before cap usage and referrals were restated
        restated |= {"cap_usage_changes": [], "referrer_points": {}, "referral": None}
    return restated


def differing(
    old_name: str,
    new_name: str,
    *,
    events: int,
    customers: int,
    seed: int,
    gap: float = 30.0,
    revalue: bool = True,
    lifetime_only: bool = False,
):
    """(customers, {customer: ((live balance, pending), (expected balance, pending))} where either differs)."""
    old, new = load_ruleset(RULESETS / old_name), load_ruleset(RULESETS / new_name)
    lines = [
        line.encode() for line in generate_events(events=events, customers=customers, seed=seed, mean_gap_seconds=gap)
    ]
    cut = sorted(_moment(raw) for raw in lines)[len(lines) // 2]
    archived = []
    for raw in lines:
        if _moment(raw) >= cut:
            continue
        document = json.loads(raw)
        for route in routes_for(raw):
            side = 1 if (SIDE_HEADER, REFEREE_SIDE) in route.headers else 0
            archived.append(
                ArchivedMessage(
                    route.topic, 0, len(archived), route.key.decode(), raw, side, TOPIC_RANK[route.topic],
                    document["event_id"], _moment(raw),
                )
            )  # fmt: skip
    archived.sort(key=lambda m: (m.routing_key, m.occurred_at, m.topic_rank, m.offset))
    since = cut.astimezone(new.zone).date() - timedelta(days=cap_history_days_max)
    # The replayed states' open order awards, as the apply's replay compares them (`replay._unchanged`).
    history = process_lines([raw for raw in lines if _moment(raw) < cut], new).states
    replayed_digests = {customer_id: orders_digest(state) for customer_id, state in history.items()}
    shadow = replay_messages(
        archived, new, refetch=lambda keys: [m for m in archived if m.routing_key in keys], keep_orders=True
    )

    def unchanged(state: CustomerState) -> bool:
        """The apply's selection (`replay._unchanged`): balances, lifetime points, what expiry decides by and the
        awards of the open orders (`replay.orders_digest`, of the live state and of the replay's)."""
        restatement = shadow.restate.get(state.customer_id)
        if restatement is None:
            return (state.balance, state.pending, state.lifetime_earned) == (0, 0, 0)
        replayed = (restatement.balance, (shadow.pending or {}).get(state.customer_id, 0), restatement.lifetime_earned)
        mode = new.expiry.mode
        key = {"lot": restatement.lots, "inactivity": restatement.last_activity_at}.get(mode)
        if (*replayed, key) != (state.balance, state.pending, state.lifetime_earned, expiry_key(state, mode)):
            return False
        return orders_digest(state) == replayed_digests.get(state.customer_id)

    zones = {old.version: old.zone, new.version: new.zone}

    def compensate(state: CustomerState, entries: list[LedgerEntry]) -> None:
        customer_id = state.customer_id
        if unchanged(state):
            return
        after = shadow.balances.get(customer_id, 0)
        pending = (shadow.pending or {}).get(customer_id, 0) - state.pending
        live_caps = _live_cap_usage(entries, zones)
        report = {
            "ruleset_version_new": new.version,
            "customers": [
                {"customer_id": customer_id, "balance_before": state.balance, "balance_after": after,
                 "delta": after - state.balance}
            ],
            REVALUED_ORDERS: shadow.orders if revalue else {},
            PENDING_CHANGES: {customer_id: pending} if revalue else {},
            RESTATED: {
                customer_id: _restated(shadow.restate[customer_id], state, live_caps, since, new, lifetime_only)
            } if revalue and customer_id in (shadow.restate or {}) else {},
        }  # fmt: skip
        for _, value in compensations(report, cut_over=cut - timedelta(microseconds=1)):
            apply(state, decode_event(value, REDEMPTIONS), new)

    def live(customer_id: str, items: list) -> tuple[CustomerState, list]:
        state, derived, compensated, ledger = CustomerState(customer_id), [], False, []
        for key, event, side in sorted(items, key=lambda item: item[0]):
            if not compensated and event.occurred_at >= cut:
                compensated = True
                compensate(state, ledger)
            try:
                entries = apply(state, event, old if event.occurred_at < cut else new, side=side)
            except EventRejected:
                continue
            ledger += entries
            derived += [(extra, key) for extra in derived_events(state, event, entries)]
        if not compensated:
            compensate(state, ledger)
        return state, derived

    work: dict[str, list] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            event = decode_event(raw)
        except EventRejected:
            continue
        work.setdefault(event.customer_id, []).append((order_key(event, number), event, "customer"))
        if isinstance(event, ev.ReferralCompleted):
            work.setdefault(event.referee_id, []).append((order_key(event, number), event, "referee"))
    outcomes = {customer_id: live(customer_id, items) for customer_id, items in work.items()}
    extra: dict[str, list] = {}
    for customer_id in sorted(outcomes):
        for event, key in outcomes[customer_id][1]:
            extra.setdefault(event.customer_id, []).append((order_key(event, key[2]), event, "customer"))
    for target, items in extra.items():
        outcomes[target] = live(target, work.setdefault(target, []) + items)
    expected = {c: (state.balance, state.pending) for c, state in process_lines(lines, new).states.items()}
    got = {c: (outcome[0].balance, outcome[0].pending) for c, outcome in outcomes.items()}
    everyone = set(got) | set(expected)
    return len(everyone), {
        c: (got.get(c, (0, 0)), expected.get(c, (0, 0)))
        for c in sorted(everyone)
        if got.get(c, (0, 0)) != expected.get(c, (0, 0))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--mean-gap-seconds", type=float, default=30.0, help="between events (10000: about two years, lots expire)"
    )
    parser.add_argument("--no-revalue", action="store_true", help="compensate balances only (the code before orders)")
    parser.add_argument(
        "--lifetime-only", action="store_true", help="restate lifetime points and the first-order mark only"
    )
    parser.add_argument("--rules", action="append", default=[], help="another rule set file to pair (repeatable)")
    parser.add_argument("--involving", help="only the pairs with this rule set file name on one side")
    args = parser.parse_args()
    names = NAMES + [str(Path(name).resolve()) for name in args.rules]
    for old, new in itertools.chain(((name, name) for name in names), itertools.permutations(names, 2)):
        if args.involving and args.involving not in (Path(old).name, Path(new).name):
            continue
        total, bad = differing(
            old,
            new,
            events=args.events,
            customers=args.customers,
            seed=args.seed,
            gap=args.mean_gap_seconds,
            revalue=not args.no_revalue,
            lifetime_only=args.lifetime_only,
        )
        available = sum(1 for got, wanted in bad.values() if got[0] != wanted[0])
        in_total = sum(1 for got, wanted in bad.values() if sum(got) != sum(wanted))
        print(
            f"{Path(old).name:24} -> {Path(new).name:24} customers {total}: available differs for {available:3}, "
            "available + pending for "
            f"{in_total:3}; e.g. {list(bad.items())[:1]}"
        )


if __name__ == "__main__":
    main()
