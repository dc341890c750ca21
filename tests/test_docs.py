"""The user documentation names only settings, CLI options and metrics that exist (README, docs/cli.md,
docs/operations.md), and the README's configuration table lists every setting with its default."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from streams.cli import build_parser
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _readme_table() -> dict[str, str]:
    """variable -> default cell of the README's configuration table (a row may name two variables)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`LOYALTY_"):
            for variable in re.findall(r"`(LOYALTY_\w+)`", cells[0]):
                rows[variable] = cells[1]
    return rows


def test_the_readme_configuration_table_lists_every_setting_and_only_settings():
    table = _readme_table()
    variables = {f"LOYALTY_{name.upper()}" for name in Settings.model_fields}
    assert set(table) == variables


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_the_readme_states_each_settings_default(name):
    default = Settings.model_fields[name].default
    cell = _readme_table()[f"LOYALTY_{name.upper()}"]
    if default is None:
        return  # unset: the cell says what happens instead
    shown = {True: "true", False: "false"}.get(default) if isinstance(default, bool) else default
    if isinstance(shown, float) and shown.is_integer():
        shown = int(shown)
    assert re.search(rf"(?<![\w.]){re.escape(str(shown))}(?![\w])", cell.replace(",", "")), (name, cell)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _documented_commands() -> list[tuple[list[str], set[str]]]:
    """(command words, options) of each row of docs/cli.md's command table."""
    found = []
    for line in (ROOT / "docs" / "cli.md").read_text().splitlines():
        if not line.startswith("| `loyalty "):
            continue
        usage = line[: line.index("` | ") + 1]  # the first cell (its options may contain `|`)
        for synopsis in re.findall(r"`loyalty ([^`]+)`", usage):
            words = re.findall(r"^[a-z|]+(?: [a-z|]+)?", synopsis)[0].split()
            options = set(re.findall(r"--[a-z][a-z-]*", synopsis))
            found.append((words, options))
    return found


@pytest.mark.parametrize(("words", "options"), _documented_commands(), ids=lambda value: str(value))
def test_every_option_docs_cli_md_shows_exists(words, options):
    parsers = [build_parser()]
    for word in words:
        chosen = []
        for parser in parsers:
            commands = _subcommands(parser)
            chosen += [commands[name] for name in word.split("|") if name in commands]
        if not chosen:
            break  # a positional argument (FILE, C, ...), not a command word
        parsers = chosen
    for parser in parsers:
        known = {option for action in parser._actions for option in action.option_strings}
        assert options <= known, (parser.prog, options - known)


def test_every_metric_docs_operations_md_names_is_exported():
    from prometheus_client import REGISTRY

    import streams.metrics  # noqa: F401  (registers the metrics)

    exported = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    for family in REGISTRY.collect():  # a labelled metric has no sample before its first label value
        exported.add(family.name)
        exported.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"\b(loyalty_(?:worker|projector)_[a-z_]+)", text))
    assert documented, "the metrics table moved"
    missing = documented - exported
    assert not missing


def test_the_lifecycle_worked_example_is_what_rules_explain_prints(capsys):
    """docs/lifecycle.md's worked example: its rule set is the YAML block, its events docs/examples/life.jsonl, and its
    output block is what `loyalty rules explain` prints for them today."""
    from streams.cli import main

    document = (ROOT / "docs/lifecycle.md").read_text()
    (shown_rules,) = re.findall(r"```yaml\n(version: lifecycle-demo-1\n.*?)```", document, re.S)
    assert (ROOT / "docs/examples/life.yaml").read_text() == shown_rules
    (shown_output,) = re.findall(r"\$ loyalty rules explain --rules life.yaml life.jsonl\n(.*?)```", document, re.S)
    examples = ROOT / "docs/examples"
    main(["rules", "explain", "--rules", str(examples / "life.yaml"), str(examples / "life.jsonl")])
    assert capsys.readouterr().out == shown_output


def test_the_rule_set_file_block_of_docs_rules_md_lists_every_key_with_its_default():
    """docs/rules.md, "The file": one block that claims to hold every key (it lacked expiry, tiers and
    referral.return_window_days)."""
    import typing

    import yaml
    from pydantic import BaseModel

    from streams.rules.ruleset import RuleSet

    text = (ROOT / "docs" / "rules.md").read_text()
    block = text.split("## The file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    document = yaml.safe_load(block)

    def models_in(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [model for argument in typing.get_args(annotation) for model in models_in(argument)]

    def check(model: type[BaseModel], mapping: dict, path: str) -> None:
        assert set(mapping) == set(model.model_fields), path
        for name, field in model.model_fields.items():
            for inner in models_in(field.annotation):
                if isinstance(mapping[name], dict) and field.annotation is inner:
                    check(inner, mapping[name], f"{path}{name}.")
                else:  # lists and maps of settings ([{id, ...}], name -> {...}): their keys are named in a comment
                    missing = [key for key in inner.model_fields if not re.search(rf"\b{key}\b", block)]
                    assert not missing, f"{path}{name}: {missing}"

    check(RuleSet, document, "")
    shown = RuleSet.model_validate(document).model_dump(exclude={"version", "timezone"})
    assert shown == RuleSet(version="v").model_dump(exclude={"version", "timezone"})
