"""An apply's compensation restates the points counted against caps and what referrals earned, so that a capped
source earns, and a referral reversed after the apply takes back, what it does under the new rules over the whole log.

Caps: before, the worker's cap usage stayed the old rules' after the apply. Under the old rules two shares earned 10
each (20 counted against the cap); under the new ones 20 each against a monthly cap of 50 (40 counted), so a third
share the next day earned 10 under the new rules over the whole log but 20 after the apply (room 50 - 20 = 30).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import yaml
from test_replay_derived import store_live_run
from test_replay_revalue import RULESETS, archived, event

from projections import LedgerSink, connect, migrate
from projections.archive import RawArchive
from schemas.decode import decode_event
from schemas.topics import INPUT_TOPICS, REDEMPTIONS
from streams.batch import process_lines
from streams.replay import RESTATED, Restatement, compensations, dry_run
from streams.rules.engine import apply, derived_events
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.rules.state import CustomerState, evolve

OLD = load_ruleset(RULESETS / "default.yaml")  # a share earns 10, at most 30 a day
HISTORY = [
    event("e1", "customer.registered", "2026-12-01T08:00:00+00:00"),
    event("e2", "social.shared", "2026-12-01T09:00:00+00:00", share_id="s1", network="x"),
    event("e3", "social.shared", "2026-12-01T10:00:00+00:00", share_id="s2", network="x"),
]
LATER_SHARE = [event("e4", "social.shared", "2026-12-02T10:00:00+00:00", share_id="s3", network="x")]
CUT_OVER = datetime(2026, 12, 1, 12, tzinfo=UTC)


def _new_rules():
    document = yaml.safe_load((RULESETS / "default.yaml").read_text())
    document["version"] = "default-shares-20"
    document["fixed"]["social_share"] = 20
    document["caps"] = [{"source": "social_share", "period": "month", "points_max": 50}]
    return parse_ruleset(yaml.safe_dump(document))


NEW = _new_rules()


@pytest.fixture
def live(tmp_path):
    """A chDB with the archive and the live ledger of HISTORY under the old rules."""
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(client)
    RawArchive(client).write(archived(HISTORY), {})
    LedgerSink(client).write(process_lines([line.encode() for line in HISTORY], OLD).ledger)
    yield client
    client.close()


def _markers(offset: int) -> dict[tuple[str, int], int]:
    return {(topic, 0): offset for topic in INPUT_TOPICS}


def test_a_dry_run_for_an_apply_gives_the_change_of_cap_usage_from_the_live_ledger(live):
    report = dry_run(live, NEW, current_point_value=OLD.redemption.point_value, markers=_markers(len(HISTORY)))
    restated = report[RESTATED]["c1"]
    assert restated["cap_usage_changes"] == [{"source": "social_share", "day": "2026-12-01", "points": 20}]
    assert restated["lifetime_earned_change"] == 20


def test_after_an_apply_a_capped_source_earns_what_the_new_rules_give_and_a_restart_folds_the_same(live):
    expected = process_lines([line.encode() for line in HISTORY + LATER_SHARE], NEW).states["c1"]
    state = CustomerState("c1")
    ledger = []
    for line in HISTORY:
        ledger += apply(state, decode_event(line.encode()), OLD)
    assert state.cap_usage[("social_share", datetime(2026, 12, 1).date())] == 20
    report = dry_run(live, NEW, current_point_value=OLD.redemption.point_value, markers=_markers(len(HISTORY)))
    ((_, compensation),) = compensations(report, cut_over=CUT_OVER)
    applied = apply(state, decode_event(compensation, REDEMPTIONS), NEW)
    (restate,) = [entry for entry in applied if entry.rule_id == "replay.restate"]
    assert "points counted against caps +20 over 1 days" in restate.explanation
    assert json.loads(restate.reference.removeprefix("restate:"))["cap_usage_changes"] == [
        ["social_share", "2026-12-01", 20]
    ]
    ledger += applied
    for line in LATER_SHARE:
        ledger += apply(state, decode_event(line.encode()), NEW)
    assert (state.balance, state.cap_usage) == (expected.balance, expected.cap_usage)
    assert [entry.points for entry in ledger if entry.caused_by == "e4"] == [10]
    folded = CustomerState("c1")  # what a restarted worker folds back from the ledger
    for entry in ledger:
        evolve(folded, entry, NEW.zone)
    assert folded.cap_usage == state.cap_usage


def test_a_second_apply_counts_the_first_ones_restatement_as_live_cap_usage(live):
    """The live usage of a second apply includes the first apply's restatement (a 0-point entry that sums of earned
    points do not show). The second rule set changes the registration bonus only: the customer is compensated again,
    with no change of cap usage (+20 again without it)."""
    first = dry_run(live, NEW, current_point_value=OLD.redemption.point_value, markers=_markers(len(HISTORY)))
    ((_, compensation),) = compensations(first, cut_over=CUT_OVER)
    state = CustomerState("c1")
    for line in HISTORY:
        apply(state, decode_event(line.encode()), OLD)
    LedgerSink(live).write(apply(state, decode_event(compensation, REDEMPTIONS), NEW))
    lines = [*HISTORY, compensation.decode()]
    RawArchive(live).write([message for message in archived(lines) if message.topic == REDEMPTIONS], {})
    document = yaml.safe_load(NEW.model_dump_json())
    document["version"], document["fixed"]["registration"] = "default-shares-20-registration-60", 60
    newer = parse_ruleset(yaml.safe_dump(document))
    second = dry_run(live, newer, current_point_value=OLD.redemption.point_value, markers=_markers(len(lines)))
    assert second[RESTATED]["c1"]["cap_usage_changes"] == []
    ((_, again),) = compensations(second, cut_over=CUT_OVER)
    assert json.loads(again)["points"] == 10


def _referral_rules(version: str, referrer: int, referee: int):
    document = yaml.safe_load((RULESETS / "default.yaml").read_text())
    document["version"] = version
    document["referral"] = {"referrer_points": referrer, "referee_points": referee, "return_window_days": 30}
    return parse_ruleset(yaml.safe_dump(document))


REFERRAL_OLD, REFERRAL_NEW = _referral_rules("referrals-1", 200, 100), _referral_rules("referrals-2", 250, 150)


def _shopper(event_id: str, event_type: str, at: str, customer: str, **fields) -> str:
    document = json.loads(event(event_id, event_type, at, **fields))
    return json.dumps({**document, "customer_id": customer})


REFERRAL = [
    _shopper("r1", "customer.registered", "2026-12-01T08:00:00+00:00", "c2"),
    _shopper(
        "r2", "purchase.completed", "2026-12-01T09:00:00+00:00", "c2", order_id="o1", currency="USD",
        lines=[{"sku": "sku-1", "category": "books", "quantity": 1, "unit_price": "40.00"}],
    ),
    _shopper("r3", "referral.completed", "2026-12-01T10:00:00+00:00", "c1", referral_id="x1", referee_id="c2",
             order_id="o1"),
]  # fmt: skip
REFUND = [_shopper("r4", "purchase.refunded", "2026-12-05T10:00:00+00:00", "c2", order_id="o1", refund_id="f1")]


@pytest.mark.parametrize("restate", [True, False])
def test_a_referral_reversed_after_an_apply_takes_back_what_the_new_rules_awarded_on_both_sides(restate):
    """The new rules give the referrer 250 and the referee 150 (200 and 100 live); the referee's order is refunded
    inside the referral's return window after the apply. Before, both reversals took back the old amounts, leaving
    the referrer 50 and the referee 50 points the new rules never give."""
    lines = [line.encode() for line in REFERRAL]
    live = process_lines(lines, REFERRAL_OLD)
    replayed = process_lines(lines, REFERRAL_NEW).states
    expected = process_lines(lines + [line.encode() for line in REFUND], REFERRAL_NEW).states
    states = live.states
    for customer_id, state in states.items():
        restatement = Restatement.of(replayed[customer_id])
        after = replayed[customer_id].balance
        report = {
            "ruleset_version_new": REFERRAL_NEW.version,
            "customers": [{"customer_id": customer_id, "balance_before": state.balance, "balance_after": after,
                           "delta": after - state.balance}],
            RESTATED: {customer_id: restatement.restated(state.lifetime_earned, state.cap_usage, None, REFERRAL_NEW)}
            if restate else {},
        }  # fmt: skip
        ((_, compensation),) = compensations(report, cut_over=CUT_OVER)
        applied = apply(state, decode_event(compensation, REDEMPTIONS), REFERRAL_NEW)
        folded = CustomerState(customer_id)  # what a restarted worker folds back from the ledger
        for entry in [entry for entry in live.ledger if entry.customer_id == customer_id] + applied:
            evolve(folded, entry, REFERRAL_NEW.zone)
        assert (folded.referees, folded.referral_points, folded.referral_event) == (
            state.referees, state.referral_points, state.referral_event
        )  # fmt: skip
    refund = decode_event(REFUND[0].encode())
    entries = apply(states["c2"], refund, REFERRAL_NEW)
    (reversal,) = derived_events(states["c2"], refund, entries)
    apply(states["c1"], reversal, REFERRAL_NEW)
    balances = {customer_id: state.balance for customer_id, state in states.items()}
    assert expected["c1"].balance == 0 and expected["c2"].balance == 50  # 50 for registering
    if restate:
        assert balances == {"c1": 0, "c2": 50}
    else:
        assert balances == {"c1": 50, "c2": 100}


def test_a_referral_the_worker_reversed_after_the_markers_stays_reversed():
    """The referee's order is refunded live between the markers and the compensation: the worker reverses the
    referral (-100). The compensation's restatement, taken before the markers, set it back to not reversed, and a
    later cancellation reversed it a second time (review)."""
    lines = [line.encode() for line in REFERRAL]
    live = process_lines(lines, REFERRAL_OLD).states["c2"]
    replayed = process_lines(lines, REFERRAL_NEW).states["c2"]
    refund = _shopper("r4", "purchase.refunded", "2026-12-02T10:00:00+00:00", "c2", order_id="o1", refund_id="f1")
    apply(live, decode_event(refund.encode()), REFERRAL_NEW)
    assert live.referral_reversed
    before = live.balance
    report = {
        "ruleset_version_new": REFERRAL_NEW.version,
        "customers": [{"customer_id": "c2", "balance_before": before, "balance_after": before + 50, "delta": 50}],
        RESTATED: {"c2": Restatement.of(replayed).restated(live.lifetime_earned, live.cap_usage, None, REFERRAL_NEW)},
    }
    ((_, compensation),) = compensations(report, cut_over=CUT_OVER)
    apply(live, decode_event(compensation, REDEMPTIONS), REFERRAL_NEW)
    assert live.referral_reversed
    cancel = _shopper("r5", "purchase.cancelled", "2026-12-03T10:00:00+00:00", "c2", order_id="o1")
    entries = apply(live, decode_event(cancel.encode()), REFERRAL_NEW)
    assert "referral.referee.reversal" not in {entry.rule_id for entry in entries}


def _minimum_rules(version: str, minimum: str):
    document = yaml.safe_load(REFERRAL_OLD.model_dump_json())
    document["version"], document["purchase"]["minimum_order_total"] = version, minimum
    return parse_ruleset(yaml.safe_dump(document))


# The referee's order (40.00) is below the old rules' minimum order total: not recorded, so the referral finds no
# qualifying order and the worker withdraws the referrer's 200 (derived event `r3:reversed`). The new rules record
# the order and reward the referral on both sides.
WITHDRAWING, REWARDING = _minimum_rules("referrals-min-50", "50"), _minimum_rules("referrals-min-10", "10")


def test_a_referral_the_worker_withdrew_and_the_new_rules_reward_is_reversed_by_a_refund_after_the_apply(tmp_path):
    """The refund after the apply derives the referrer's `referral.reversed` again. It had the withdrawal's event id
    (`r3:reversed`), so the referrer refused it as a conflicting repeat and kept the 200 points the new rules take
    back (docs/replay.md, Known limits). A restarted worker folds the referee's ledger to the same derived event."""
    lines = [line.encode() for line in REFERRAL]
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(client)
    try:
        live = store_live_run(client, lines, WITHDRAWING, gapless=True)
        assert [e.rule_id for e in live.ledger if e.caused_by == "r3:reversed"] == ["referral.referrer.withdrawn"]
        markers = {(topic, partition): 100 for topic in INPUT_TOPICS for partition in range(4)}
        report = dry_run(client, REWARDING, current_point_value=WITHDRAWING.redemption.point_value, markers=markers)
    finally:
        client.close()
    states, ledgers = live.states, {customer_id: [] for customer_id in live.states}
    for entry in live.ledger:
        ledgers[entry.customer_id].append(entry)
    for customer_id, compensation in compensations(report, cut_over=CUT_OVER):
        ledgers[customer_id] += apply(states[customer_id], decode_event(compensation, REDEMPTIONS), REWARDING)
    refund = decode_event(REFUND[0].encode())
    folded = CustomerState("c2")  # what a restarted worker folds back from the referee's ledger
    for entry in ledgers["c2"]:
        evolve(folded, entry, REWARDING.zone)
    entries = apply(states["c2"], refund, REWARDING)
    (reversal,) = derived_events(states["c2"], refund, entries)
    assert reversal.reason == "refunded"
    apply(states["c1"], reversal, REWARDING)  # refused before: "event id r3:reversed was already applied ..."
    expected = process_lines(lines + [line.encode() for line in REFUND], REWARDING).states
    assert {c: (state.balance, state.pending) for c, state in states.items()} == {
        c: (state.balance, state.pending) for c, state in expected.items()
    }
    assert expected["c1"].balance == 0
    assert reversal.event_id == "r3:reversed:restated"
    assert derived_events(folded, refund, apply(folded, refund, REWARDING)) == [reversal]


def test_a_compensation_with_many_referees_stays_under_the_event_limit_with_its_balance_change():
    """1,000 referees with long ids made the compensation 73 KiB: the worker refused it, balance change included,
    while its continuation re-valued the orders (review). The oldest referees' restatement is cut instead."""
    referees = {f"customer-{number:06d}-" + "x" * 50: 250 for number in range(1000)}
    report = {
        "ruleset_version_new": "v2",
        "customers": [{"customer_id": "c9", "balance_before": 200_000, "balance_after": 250_000, "delta": 50_000}],
        RESTATED: {
            "c9": {"lifetime_earned_change": 50_000, "first_order_done": True, "cap_usage_changes": [],
                   "referrer_points": referees, "referral": None}
        },
        "revalued_orders": {"c9": [{"order_id": "o1", "refunds": [], "lines": {"line:0": [10, 0]}, "bonuses": {}}]},
    }  # fmt: skip
    first, *rest = compensations(report, cut_over=CUT_OVER)
    assert len(first[1]) <= 48 * 1024
    adjusted = decode_event(first[1], REDEMPTIONS)
    assert adjusted.points == 50_000 and [order.order_id for order in adjusted.revalued_orders] == ["o1"]
    kept = list(adjusted.restated.referrer_points)
    assert 100 < len(kept) < 1000 and kept == list(referees)[-len(kept) :]  # the newest kept
    assert rest == []
