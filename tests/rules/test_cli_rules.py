"""`loyalty rules validate` and `loyalty rules explain`, through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compact_events import event_document

from streams.cli import main

PACKAGED_RULESETS = Path(__file__).parents[2] / "streams" / "rules" / "rulesets"

BAD_RULESET = """
version: bad-1
timezone: Mars/Olympus_Mons
purchase:
  points_per_unit: "-1"
  bogus: 3
"""

PURCHASE = event_document(
    {"type": "purchase", "id": "p1", "order": "o1", "at": "2026-03-02T10:00:00Z", "lines": [["a", "books", 3, "9.99"]]},
    1,
)


@pytest.mark.parametrize(
    ("name", "version"),
    [("default", "default-1"), ("seasonal-promotion", "seasonal-2026-q4"), ("advanced-coupons", "advanced-coupons-1")],
)
def test_the_packaged_rule_sets_validate_and_print_their_version(capsys, name, version):
    path = PACKAGED_RULESETS / f"{name}.yaml"
    assert main(["rules", "validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: valid rule set, version {version}\n"
    assert main(["rules", "validate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": True, "file": str(path), "version": version}


def test_a_bad_rule_set_lists_the_path_and_reason_of_each_bad_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RULESET)
    assert main(["rules", "validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}: timezone: unknown timezone 'Mars/Olympus_Mons' (use an IANA name such as Europe/Paris)",
        f"{path}: purchase.points_per_unit: Input should be greater than or equal to 0",
        f"{path}: purchase.bogus: unknown key",
    ]


def test_a_bad_rule_set_in_json(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_RULESET)
    assert main(["rules", "validate", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "valid": False,
        "file": str(path),
        "problems": [
            {
                "path": "timezone",
                "reason": "unknown timezone 'Mars/Olympus_Mons' (use an IANA name such as Europe/Paris)",
            },
            {"path": "purchase.points_per_unit", "reason": "Input should be greater than or equal to 0"},
            {"path": "purchase.bogus", "reason": "unknown key"},
        ],
    }


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        (
            "version: v\npurchase: [1, 2]\n",
            "purchase",
            "Input should be a valid dictionary or instance of PurchaseRules",
        ),
        ("- just a list\n", "", "the file must hold a mapping of settings"),
        ("version: v\nrounding: up\n", "rounding", "Input should be 'floor', 'nearest' or 'ceil'"),
        ("purchase: {}\n", "version", "Field required"),
        (
            "version: v\npromotions: [{id: p, starts_at: '2026-01-02T00:00:00Z', ends_at: '2026-01-01T00:00:00Z'}]\n",
            "promotions.0",
            "ends_at must be after starts_at",
        ),
        ("version: v\nproducts: {}\n", "products", "unknown key"),
        # Contradictory pairs of keys (audit r2.yaml: every redemption would have been refused).
        (
            "version: v\nredemption: {minimum_points: 500, maximum_points: 100}\n",
            "redemption",
            "maximum_points 100 is below minimum_points 500: every redemption would be refused",
        ),
        (
            "version: v\npurchase: {categories: {gifts: {excluded: true, multiplier: '2'}}}\n",
            "purchase.categories.gifts",
            "a category is either excluded or has a rate or multiplier, not both",
        ),
        (
            "version: v\npurchase: {spend_thresholds: [{minimum_total: '200', bonus: 10},"
            " {minimum_total: '100', bonus: 50}]}\n",
            "purchase.spend_thresholds",
            "the bonus of the 200 threshold (10) is below the bonus of the 100 threshold (50): only the highest "
            "threshold reached is awarded, so spending more would earn less",
        ),
        (
            "version: v\ntiers: {levels: [{name: silver, minimum: '1000'}, {name: gold, minimum: '1000'}]}\n",
            "tiers.levels",
            "tiers silver and gold have the same minimum 1000: which one a customer reaches would be undecided",
        ),
    ],
)
def test_each_kind_of_bad_rule_set_names_its_key(capsys, tmp_path, text, path, reason):
    file = tmp_path / "rules.yaml"
    file.write_text(text)
    assert main(["rules", "validate", str(file), "--json"]) == 1
    assert {"path": path, "reason": reason} in json.loads(capsys.readouterr().out)["problems"]


def test_consistent_pairs_stay_valid_and_tiers_may_be_listed_in_any_order():
    from streams.rules.ruleset import parse_ruleset

    ruleset = parse_ruleset(
        "version: v\nredemption: {minimum_points: 100, maximum_points: 100}\n"
        "purchase: {categories: {gifts: {excluded: true}}, spend_thresholds: [{minimum_total: '200', bonus: 50},"
        " {minimum_total: '100', bonus: 50}]}\n"
        "tiers: {levels: [{name: gold, minimum: '1000'}, {name: silver, minimum: '100'}]}\n"
    )
    assert [level.name for level in ruleset.tiers.levels] == ["silver", "gold"]
    assert [threshold.minimum_total for threshold in ruleset.purchase.spend_thresholds] == [100, 200]


def test_a_missing_rule_set_file_is_reported(capsys, tmp_path):
    path = tmp_path / "absent.yaml"
    assert main(["rules", "validate", str(path)]) == 1
    # The whole file is the problem: no empty key path ("absent.yaml: : ...").
    assert capsys.readouterr().err == f"{path}: cannot read the file: No such file or directory\n"


def test_explain_one_event_prints_the_rule_inputs_and_arithmetic(capsys):
    assert main(["rules", "explain", json.dumps(PURCHASE, separators=(",", ":"))]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2026-03-02T10:00:00+00:00 c1 p1 [earned] +29 (pending +0) -> balance 29",
        "    rule purchase.rate @ default-1: 3 x 9.99 = 29.97; x rate 1 = 29.97 -> floor 29",
        "2026-03-02T10:00:00+00:00 c1 p1 [earned] +100 (pending +0) -> balance 129",
        "    rule purchase.first_order_bonus @ default-1: first qualifying order: 100",
    ]


def test_explain_a_jsonl_file_with_another_rule_set_in_json(capsys, tmp_path):
    events = tmp_path / "events.jsonl"
    review = event_document({"type": "review", "id": "r1", "sku": "a", "at": "2026-12-02T10:00:00-05:00"}, 2)
    events.write_text(json.dumps(PURCHASE) + "\n" + json.dumps(review) + "\n" + "{not json}\n")
    rules = PACKAGED_RULESETS / "seasonal-promotion.yaml"
    assert main(["rules", "explain", str(events), "--rules", str(rules), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ruleset_version"] == "seasonal-2026-q4"
    assert [(e["rule_id"], e["points"], e["explanation"]) for e in document["ledger"]] == [
        ("purchase.category:books", 45, "3 x 9.99 = 29.97; x rate 1.5 (books) = 44.955 -> nearest 45"),
        ("purchase.first_order_bonus", 100, "first qualifying order: 100"),
        ("review.first_per_product", 20, "approved review of a: 20; cap 60/day, 0 used"),
        ("promotion:december-reviews", 15, "promotion december-reviews bonus 15; cap 60/day, 20 used"),
    ]
    assert document["balances"] == {"c1": 180}
    assert document["rejected"] == [
        {"line": 3, "event_id": None, "reason": "not valid JSON (key must be a string at line 1 column 2)"}
    ]


def test_explain_a_rejected_single_event_exits_non_zero_with_the_reason(capsys):
    bad = dict(PURCHASE, lines=[{"sku": "a", "category": "books", "quantity": 0, "unit_price": "1"}])
    assert main(["rules", "explain", json.dumps(bad, separators=(",", ":"))]) == 1
    assert "the event is rejected: lines.0.quantity" in capsys.readouterr().err


def test_explain_a_long_single_event(capsys):
    long_event = event_document(
        {"type": "purchase", "id": "p2", "lines": [[f"sku-{index}", "books", 1, "1.00"] for index in range(8)]}, 1
    )
    assert main(["rules", "explain", json.dumps(long_event)]) == 0
    assert "purchase.rate" in capsys.readouterr().out
