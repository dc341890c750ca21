"""`loyalty replay --customer`: one customer's history under new rules, beside the live ledger, exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_derived_events import RULES
from test_replay_derived import store_live_run

from projections import connect, migrate
from streams.batch import process_lines
from streams.replay import preview_customer
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.simulate import generate_events

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A chDB with the raw archive and the live ledger of a run under the full-lifecycle rules."""
    generated = generate_events(events=1500, customers=80, seed=11, mean_gap_seconds=5000, disputed_referral_share=0.3)
    lines = [line.encode() for line in generated]
    live_rules = load_ruleset(REPOSITORY / RULES)
    dsn = f"chdb://{tmp_path_factory.mktemp('preview') / 'clickhouse'}"
    client = connect(dsn)
    migrate(client)
    live_run = store_live_run(client, lines, live_rules)
    yield client, lines, live_run, dsn
    client.close()


def test_each_customers_preview_equals_their_part_of_the_batch_driver_under_the_new_rules(live):
    client, lines, live_run, _ = live
    text = (REPOSITORY / RULES).read_text()
    assert "referee_points: 100" in text and "referrer_points: 200" in text
    new_rules = parse_ruleset(
        text.replace("referee_points: 100", "referee_points: 100\n  return_window_days: 1").replace(
            "referrer_points: 200", "referrer_points: 250"
        )
    )
    new_run = process_lines(lines, new_rules)
    customers = sorted(new_run.balances())
    # The log must hold what makes a customer's preview depend on others: derived reversals of a referrer's award.
    assert any(entry.event_type == "referral.reversed" for entry in new_run.ledger)
    changed = 0
    for customer in customers:
        preview = preview_customer(client, new_rules, customer)
        expected = [entry.model_dump(mode="json") for entry in new_run.ledger if entry.customer_id == customer]
        assert preview["entries_after"] == expected, customer
        assert preview["balance_after"] == new_run.balances()[customer]
        assert preview["balance_before"] == live_run.balances()[customer]
        live_entries = [entry.model_dump(mode="json") for entry in live_run.ledger if entry.customer_id == customer]
        assert preview["entries_before"] == live_entries
        assert sum(row["points_after"] for row in preview["events"]) == preview["balance_after"]
        assert sum(row["pending_points_after"] for row in preview["events"]) == new_run.states[customer].pending
        assert sum(row["points_before"] for row in preview["events"]) == preview["balance_before"]
        assert sum(row["delta"] for row in preview["per_rule"]) == preview["delta"]
        changed += preview["delta"] != 0
    assert changed  # the new rules change some balances, so the comparison above compares something


def test_a_customer_without_history_previews_as_empty(live):
    client, _, _, _ = live
    preview = preview_customer(client, load_ruleset(None), "nobody-" + os.urandom(4).hex())
    assert (preview["balance_before"], preview["balance_after"], preview["events"]) == (0, 0, [])
    assert preview["events_replayed"] == 0


def test_the_cli_prints_the_customers_events_live_and_new(live, tmp_path, monkeypatch, capsys):
    from streams import cli

    _, lines, live_run, dsn = live
    customer = max(live_run.balances(), key=lambda c: sum(e.customer_id == c for e in live_run.ledger))
    monkeypatch.setenv("LOYALTY_DATA_DIR", str(tmp_path))  # no run file there: the offline path
    monkeypatch.setenv("LOYALTY_CLICKHOUSE_DSN", dsn)
    new_rules = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"
    assert cli.main(["replay", "--rules", str(new_rules), "--dry-run", "--customer", customer, "--json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    expected = process_lines(lines, load_ruleset(new_rules)).balances()[customer]
    assert (preview["balance_before"], preview["balance_after"]) == (live_run.balances()[customer], expected)

    assert cli.main(["replay", "--rules", str(new_rules), "--dry-run", "--customer", customer]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"customer {customer} under seasonal") and f"-> {expected:,}" in shown[0]
    assert len(shown) == 2 + len(preview["events"])

    assert cli.main(["replay", "--rules", str(new_rules), "--apply", "--customer", customer]) == 2
    assert "--customer previews one customer" in capsys.readouterr().err
