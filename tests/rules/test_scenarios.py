"""The earning rules as a table of scenarios (tests/rules/scenarios/*.yaml), run through the batch driver.

Each scenario reads as documentation: a name stating the behaviour, a rule set (a YAML fragment over a
small base, or a packaged rule set), a compact event log, and the exact ledger and balances expected.

Scenario keys:
- `name`: the behaviour, as a sentence.
- `rules`: a YAML mapping deep-merged over BASE_RULESET; or `ruleset: <name>` for a packaged rule set.
- `events`: compact events; `type` is a short alias (see compact_events.EVENT_TYPES) and the helper fills the envelope
  (`id` defaults to e1, e2, ... by position, `at` to a Monday morning, `customer` to c1) and type defaults.
- `ledger`: every entry in output order, as [customer, kind, rule_id, points] or, when the entry moves
  pending points, [customer, kind, rule_id, points, pending_points].
- `balances` (available points per customer), optional `pending`, `rejected` ([line, reason substring]),
  and `explanations` ({ledger row index: substring of that entry's explanation}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from compact_events import BASE_RULESET, event_document, merge_rules

from streams.batch import process_lines
from streams.rules.ruleset import RuleSet, load_ruleset, parse_ruleset
from streams.rules.state import CustomerState, evolve

SCENARIO_DIRECTORY = Path(__file__).parent / "scenarios"
PACKAGED_RULESETS = Path(__file__).parents[2] / "streams" / "rules" / "rulesets"


def scenario_ruleset(scenario: dict[str, Any]) -> RuleSet:
    if "ruleset" in scenario:
        return load_ruleset(PACKAGED_RULESETS / f"{scenario['ruleset']}.yaml")
    return parse_ruleset(yaml.safe_dump(merge_rules(BASE_RULESET, scenario.get("rules") or {})))


def load_scenarios() -> list[Any]:
    cases = []
    for file in sorted(SCENARIO_DIRECTORY.glob("*.yaml")):
        for scenario in yaml.safe_load(file.read_text()):
            cases.append(pytest.param(scenario, id=f"{file.stem}: {scenario['name']}"))
    return cases


def run_scenario(scenario: dict[str, Any]):
    ruleset = scenario_ruleset(scenario)
    lines = [json.dumps(event_document(compact, index)) for index, compact in enumerate(scenario["events"], 1)]
    return process_lines(lines, ruleset)


def ledger_rows(result) -> list[list[Any]]:
    rows = []
    for entry in result.ledger:
        row: list[Any] = [entry.customer_id, entry.kind.value, entry.rule_id, entry.points]
        if entry.pending_points:
            row.append(entry.pending_points)
        rows.append(row)
    return rows


SCENARIOS = load_scenarios()


def test_the_specification_has_at_least_40_scenarios_with_unique_names():
    names = [case.values[0]["name"] for case in SCENARIOS]
    assert len(names) >= 40
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario):
    result = run_scenario(scenario)
    assert ledger_rows(result) == scenario["ledger"]
    assert result.balances() == scenario["balances"]
    pending = {customer_id: state.pending for customer_id, state in result.states.items()}
    assert pending == scenario.get("pending", dict.fromkeys(pending, 0))
    rejected = [[rejection.line, rejection.reason] for rejection in result.rejected]
    expected_rejected = scenario.get("rejected", [])
    assert [line for line, _ in rejected] == [line for line, _ in expected_rejected]
    for (_, reason), (_, fragment) in zip(rejected, expected_rejected, strict=True):
        assert fragment in reason
    for index, fragment in (scenario.get("explanations") or {}).items():
        assert fragment in result.ledger[index].explanation
    for entry in result.ledger:
        assert entry.ruleset_version == scenario_ruleset(scenario).version


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_folding_the_scenarios_ledger_gives_the_same_state(scenario):
    """What a restarted worker does: its state is the fold of the customer's ledger entries (`state.evolve`), and
    must equal the state the decisions were made on, field by field (refunds held before their order included)."""
    result = run_scenario(scenario)
    zone = scenario_ruleset(scenario).zone
    for customer_id, state in result.states.items():
        folded = CustomerState(customer_id)
        for entry in result.ledger:
            if entry.customer_id == customer_id:
                evolve(folded, entry, zone)
        assert folded == state, customer_id
