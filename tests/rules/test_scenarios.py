"""The earning rules as a table of scenarios (tests/rules/scenarios/*.yaml), run through the batch driver.

Each scenario reads as documentation: a name stating the behaviour, a rule set (a YAML fragment over a
small base, or a packaged rule set), a compact event log, and the exact ledger and balances expected.

Scenario keys:
- `name`: the behaviour, as a sentence.
- `rules`: a YAML mapping deep-merged over BASE_RULESET; or `ruleset: <name>` for a packaged rule set.
- `events`: compact events; `type` is a short alias (see EVENT_TYPES) and the helper fills the envelope
  (`id` defaults to e1, e2, ... by position, `at` to DEFAULT_AT, `customer` to c1) and type defaults.
- `ledger`: every entry in output order, as [customer, kind, rule_id, points] or, when the entry moves
  pending points, [customer, kind, rule_id, points, pending_points].
- `balances` (available points per customer), optional `pending`, `rejected` ([line, reason substring]),
  and `explanations` ({ledger row index: substring of that entry's explanation}).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.batch import process_lines
from streams.rules.ruleset import RuleSet, load_ruleset, parse_ruleset

SCENARIO_DIRECTORY = Path(__file__).parent / "scenarios"
PACKAGED_RULESETS = Path(__file__).parents[2] / "streams" / "rules" / "rulesets"
DEFAULT_AT = "2026-03-02T10:00:00+00:00"  # a Monday

# Everything off except 1 point per currency unit, floor rounding, UTC.
BASE_RULESET: dict[str, Any] = {
    "version": "spec-1",
    "timezone": "UTC",
    "rounding": "floor",
    "purchase": {"points_per_unit": "1"},
}

EVENT_TYPES = {
    "purchase": "purchase.completed",
    "refund": "purchase.refunded",
    "cancel": "purchase.cancelled",
    "review": "review.approved",
    "referral": "referral.completed",
    "register": "customer.registered",
    "comment": "blog.commented",
    "share": "social.shared",
    "feedback": "feedback.submitted",
    "tick": "clock.tick",
    "redeem": "points.redeem_requested",
    "adjust": "points.adjusted",
}


def _merge(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def scenario_ruleset(scenario: dict[str, Any]) -> RuleSet:
    if "ruleset" in scenario:
        return load_ruleset(PACKAGED_RULESETS / f"{scenario['ruleset']}.yaml")
    return parse_ruleset(yaml.safe_dump(_merge(BASE_RULESET, scenario.get("rules") or {})))


def event_document(compact: dict[str, Any], position: int) -> dict[str, Any]:
    """A full event JSON object from a compact one: envelope and per-type defaults filled in."""
    fields = dict(compact)
    event_type = EVENT_TYPES[fields.pop("type")]
    event_id = str(fields.pop("id", f"e{position}"))
    document: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": fields.pop("at", DEFAULT_AT),
        "customer_id": fields.pop("customer", "c1"),
        "store_id": fields.pop("store", "s1"),
    }
    if event_type == "purchase.completed":
        document["order_id"] = fields.pop("order", f"o-{event_id}")
        document["currency"] = fields.pop("currency", "EUR")
        document["lines"] = [
            {"sku": sku, "category": category, "quantity": quantity, "unit_price": str(price)}
            for sku, category, quantity, price in fields.pop("lines")
        ]
    elif event_type == "purchase.refunded":
        document["order_id"] = fields.pop("order")
        document["refund_id"] = fields.pop("refund", f"r-{event_id}")
        if "lines" in fields:
            document["lines"] = [{"sku": sku, "quantity": quantity} for sku, quantity in fields.pop("lines")]
    elif event_type == "purchase.cancelled":
        document["order_id"] = fields.pop("order")
    elif event_type == "review.approved":
        document.update(review_id=fields.pop("review", f"rv-{event_id}"), sku=fields.pop("sku"))
        document["rating"] = fields.pop("rating", 5)
    elif event_type == "referral.completed":
        document.update(referral_id=fields.pop("referral", f"rf-{event_id}"), referee_id=fields.pop("referee"))
        document["order_id"] = fields.pop("order", f"o-{event_id}")
    elif event_type == "blog.commented":
        document.update(comment_id=fields.pop("comment", f"cm-{event_id}"), post_id=fields.pop("post"))
    elif event_type == "social.shared":
        document.update(share_id=fields.pop("share", f"sh-{event_id}"), network=fields.pop("network", "x"))
    elif event_type == "feedback.submitted":
        document["feedback_id"] = fields.pop("feedback", f"fb-{event_id}")
    elif event_type == "points.redeem_requested":
        document.update(redemption_id=fields.pop("redemption", f"rd-{event_id}"), points=fields.pop("points"))
    elif event_type == "points.adjusted":
        document.update(adjustment_id=fields.pop("adjustment", f"ad-{event_id}"), points=fields.pop("points"))
        document.update(note=fields.pop("note", "goodwill"), actor=fields.pop("actor", "admin"))
    if event_type in ("purchase.completed", "customer.registered") and "segment" in fields:
        document["customer_segment"] = fields.pop("segment")
    for money in ("discount_total", "tax_total", "shipping_total", "fee_total"):
        if money in fields:
            document[money] = str(fields.pop(money))
    for money in ("paid_with_points", "paid_with_store_credit"):
        if money in fields:
            document[money] = str(fields.pop(money))
    document.update(fields)  # anything else (allow_negative, coupon_codes, ...) verbatim
    return document


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
