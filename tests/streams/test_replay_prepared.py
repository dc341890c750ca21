"""An apply replays the history before it writes its markers (`replay.prepare`); after them it decides again only the
customers with messages since (`dry_run(prepared=)`). The report, and so the compensations, must be the very same as
a whole replay's at the markers: the worker holds the events after the markers until the compensations arrive, so
this second step is what it waits for."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime

import pytest
from test_derived_events import PARTITIONS, drain, routed
from test_replay_derived import archived

from projections import LedgerSink, connect, migrate
from projections.archive import RawArchive
from schemas.ledger import LedgerEntry
from schemas.topics import INPUT_TOPICS, PURCHASES, TOPIC_RANK
from streams.applier import StreamApplier
from streams.batch import process_lines
from streams.replay import ReplayRefused, _advance, _live_balances, _replay_below, dry_run, live_figures, prepare
from streams.routing import partition_for
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

RULESETS = "streams/rules/rulesets"
UNTIMED = ("elapsed_s", "events_per_s", "replay_after_markers_s")


def _store(client, lines: list[bytes], ruleset) -> dict[tuple[str, int], int]:
    """The archive and ledger of a live run of `lines` under `ruleset`; returns the next offset of every partition."""
    applier = StreamApplier(ruleset, partition_for=functools.partial(partition_for, partitions=PARTITIONS))
    inputs = routed(lines)
    _, output = drain(applier, inputs)
    published = [  # the derived events the worker published, after the inputs in their partitions
        type(m)(m.topic, m.partition, 1_000_000 + n, m.key, m.value, m.headers) for n, m in enumerate(output.derived)
    ]
    messages = archived(inputs + published)
    RawArchive(client).write(messages, {})
    LedgerSink(client).write(process_lines(lines, ruleset).ledger)
    ends = {(topic, partition): 0 for topic in INPUT_TOPICS for partition in range(PARTITIONS)}
    for message in messages:
        ends[(message.topic, message.partition)] = max(ends[(message.topic, message.partition)], message.offset + 1)
    return ends


def _both(client, new, old, markers, horizon) -> tuple[dict, dict]:
    value = old.redemption.point_value
    whole = dry_run(client, new, current_point_value=value, markers=markers)
    prepared = prepare(client, new, horizon=horizon)
    stepped = dry_run(client, new, current_point_value=value, markers=markers, prepared=prepared)
    return whole, stepped


def _same(whole: dict, stepped: dict) -> None:
    for key in UNTIMED:
        whole.pop(key, None)
    timing = {key: stepped.pop(key, None) for key in UNTIMED}
    assert stepped == whole
    assert timing["replay_after_markers_s"] is not None


@pytest.mark.parametrize(
    ("old", "new", "share"),
    [
        ("default", "full-lifecycle", 0.5),
        ("full-lifecycle", "seasonal-promotion", 0.8),
        ("advanced-coupons", "default", 0.2),
        ("default", "advanced-coupons", 1.0),  # the horizon at the markers: nothing to decide again
    ],
)
def test_an_apply_prepared_before_its_markers_reports_what_a_whole_replay_at_them_does(tmp_path, old, new, share):
    generated = generate_events(events=3000, customers=150, seed=11, mean_gap_seconds=3000, disputed_referral_share=0)
    whole, stepped = _reports(tmp_path, old, new, generated, share)
    assert whole["customers_changed"] > 0
    _same(whole, stepped)


def test_with_derived_events_between_the_two_their_receivers_are_decided_again_and_it_reports_the_same(tmp_path):
    generated = generate_events(events=3000, customers=120, seed=5, mean_gap_seconds=5000, disputed_referral_share=0.3)
    whole, stepped = _reports(tmp_path, "full-lifecycle", "default", generated, 0.5)
    _same(whole, stepped)


def _reports(tmp_path, old: str, new: str, generated, share: float) -> tuple[dict, dict]:
    """A live run of the generated log under `old`; the reports of an apply of `new` with markers at its end, by a
    whole replay and prepared with a horizon at `share` of every partition."""
    old_rules, new_rules = load_ruleset(f"{RULESETS}/{old}.yaml"), load_ruleset(f"{RULESETS}/{new}.yaml")
    lines = [line.encode() for line in generated]
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        migrate(client)
        markers = _store(client, lines, old_rules)
        horizon = {tp: int(end * share) for tp, end in markers.items()}
        return _both(client, new_rules, old_rules, markers, horizon)
    finally:
        client.close()


def test_a_customer_keyed_otherwise_between_the_two_is_refused_as_by_a_whole_replay(tmp_path):
    """A foreign producer's event of a customer under another routing key, arriving after the horizon: a whole replay
    refuses (the customer would be decided from two fresh states); the prepared one decided the customer from that
    one event alone (balance_after 0 here, a compensation taking every point) and reported it."""
    old_rules, new_rules = load_ruleset(f"{RULESETS}/default.yaml"), load_ruleset(f"{RULESETS}/full-lifecycle.yaml")
    lines = [line.encode() for line in generate_events(events=400, customers=20, seed=3)]
    foreign = {
        "event_id": "foreign-1",
        "event_type": "purchase.completed",
        "schema_version": 1,
        "occurred_at": "2026-01-01T00:00:30+00:00",
        "customer_id": "c000003",
        "store_id": "s1",
        "order_id": "o-foreign",
        "currency": "USD",
        "lines": [{"sku": "HM-1", "category": "home", "quantity": 1, "unit_price": "500.00"}],
    }
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        migrate(client)
        horizon = _store(client, lines, old_rules)
        offset = horizon[(PURCHASES, 0)]
        message = (PURCHASES, 0, offset, "someone-else", json.dumps(foreign).encode(), 0, TOPIC_RANK[PURCHASES])
        RawArchive(client).write([message], {})
        markers = {**horizon, (PURCHASES, 0): offset + 1}
        value = old_rules.redemption.point_value
        with pytest.raises(ReplayRefused, match="c000003"):
            dry_run(client, new_rules, current_point_value=value, markers=markers)
        prepared = prepare(client, new_rules, horizon=horizon)
        with pytest.raises(ReplayRefused, match="c000003"):
            dry_run(client, new_rules, current_point_value=value, markers=markers, prepared=prepared)
    finally:
        client.close()


def test_a_customer_whose_live_figures_moved_with_no_message_in_between_is_kept_as_by_a_whole_replay(tmp_path):
    """Between the prepare and the markers the worker applies in place a referral reversal it derived for a referrer
    (old rules) from a referee's refund before the markers; the published copy lands after the referrer's marker, so
    the referrer has no message in between. A whole replay keeps the referrer's orders and restatement (the live
    figures now differ); the prepared one had decided them against the live figures of the prepare (equal: none)."""
    old_rules = load_ruleset(f"{RULESETS}/default.yaml")
    new_rules = old_rules.model_copy(update={"version": "default-again"})  # the same rules: nobody differs at first
    lines = [line.encode() for line in generate_events(events=1500, customers=60, seed=9, mean_gap_seconds=3000)]
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        migrate(client)
        markers = _store(client, lines, old_rules)
        horizon = {tp: end if tp[1] == 0 else end // 2 for tp, end in markers.items()}  # partition 0: none between
        referrer = next(
            e.customer_id
            for e in process_lines(lines, old_rules).ledger
            if partition_for(e.customer_id.encode(), PARTITIONS) == 0
        )
        prepared = prepare(client, new_rules, horizon=horizon)
        sequence, balance = client.query(
            "SELECT max(sequence), argMax(balance_after, sequence) FROM ledger_entries WHERE customer_id = {c:String}",
            parameters={"c": referrer},
        ).result_rows[0]
        reversal = LedgerEntry(
            entry_id=f"reversal-{referrer}",
            customer_id=referrer,
            store_id="s1",
            kind="reversed",
            sequence=int(sequence) + 1,
            points=-200,
            balance_after=int(balance) - 200,
            source="referral",
            rule_id="referral.referrer.reversal",
            ruleset_version=old_rules.version,
            caused_by="ev-referral:reversed",
            event_type="referral.reversed",
            fingerprint="f",
            occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
        )
        LedgerSink(client).write([reversal])
        value = old_rules.redemption.point_value
        whole = dry_run(client, new_rules, current_point_value=value, markers=markers)
        stepped = dry_run(client, new_rules, current_point_value=value, markers=markers, prepared=prepared)
    finally:
        client.close()
    assert referrer in whole["restated"]
    _same(whole, stepped)


def test_a_referrer_with_no_history_below_the_horizon_has_its_derived_figures_taken_back(tmp_path):
    """The prepare decides a referrer with no archived event below the horizon from the reversals derived for them
    alone (as `_replay` does); when their history arrives in between, those figures are taken back too (they were
    not: the replay's entries counted them twice). Compared with a whole replay at the markers, figure by figure."""
    old_rules, new_rules = load_ruleset(f"{RULESETS}/full-lifecycle.yaml"), load_ruleset(f"{RULESETS}/default.yaml")
    generated = generate_events(events=3000, customers=120, seed=60, mean_gap_seconds=5000, disputed_referral_share=0.5)
    lines = [line.encode() for line in generated]
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        migrate(client)
        markers = _store(client, lines, old_rules)
        horizon = {tp: 0 if tp[1] == 0 else end for tp, end in markers.items()}  # partition 0's history in between
        archive = RawArchive(client)
        keep = _live_balances(live_figures(client, markers, new_rules.version), None)
        whole = _replay_below(archive, markers, new_rules, None, 1, keep)
        stepped = _advance(prepare(client, new_rules, horizon=horizon), archive, markers, keep)
    finally:
        client.close()
    for name in (
        "balances",
        "points_by_rule",
        "issued",
        "events",
        "rejected",
        "entries",
        "orders",
        "pending",
        "restate",
    ):
        assert getattr(stepped, name) == getattr(whole, name), name
