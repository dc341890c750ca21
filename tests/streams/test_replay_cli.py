"""`loyalty replay` and `loyalty projections rebuild` from the operator's side, offline on a chDB directory: what an
audit of the running system found (each test fails on the code before the fix).

- `--since` with a UTC offset was read as UTC; a bad `--since` was a traceback; a replay's own compensations made
  every compensated customer "active"; the counts of changed and losing customers ignored `--since`.
- `--apply --csv <bad path>` applied the change, then failed on the CSV; `--csv <directory>` was a traceback.
- A rule set under a version already in use with other rules was applied, and every compensation was refused by
  the worker as a conflict, while the command said it worked; the dry-run said nothing.
- A rule set applied before and replaced since by another was applied again under its version (A -> B -> A -> B):
  its compensations had the first apply's ids and the worker refused every one as a conflicting repeat, while the
  command said it worked and the new rules were in force on the old balances; the dry-run said nothing.
- The text dry-run did not mention archive gaps; an unreadable rules file was a traceback; `--lag-max` took
  negative numbers.
- An interrupted offline rebuild left half-filled `__rebuild` tables that queries could read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from test_derived_events import RULES
from test_replay_derived import store_live_run

from projections import LedgerSink, connect, migrate
from projections import rebuild as rebuild_module
from streams import cli
from streams.replay import compensation_prefix, version_conflict, write_csv
from streams.rules.ruleset import load_ruleset, parse_ruleset
from streams.simulate import generate_events

REPOSITORY = Path(__file__).resolve().parents[2]
NEW_RULES = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A chDB directory with the archive and live ledger of a small log under the full-lifecycle rules, and the
    environment of an offline `loyalty` command on it."""
    generated = generate_events(events=400, customers=40, seed=3, mean_gap_seconds=5000, disputed_referral_share=0.3)
    lines = [line.encode() for line in generated]
    live_rules = load_ruleset(REPOSITORY / RULES)
    dsn = f"chdb://{tmp_path / 'clickhouse'}"
    client = connect(dsn)
    migrate(client)
    live_run = store_live_run(client, lines, live_rules, gapless=True)  # no gap in the archive
    client.close()
    monkeypatch.setenv("LOYALTY_DATA_DIR", str(tmp_path / "data"))  # no run file there: the offline path
    monkeypatch.setenv("LOYALTY_CLICKHOUSE_DSN", dsn)
    monkeypatch.setenv("LOYALTY_RULES", str(REPOSITORY / RULES))
    return dsn, live_run


def _replay(capsys, *options: str) -> tuple[int, str, str]:
    code = cli.main(["replay", "--rules", str(NEW_RULES), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_since_keeps_its_utc_offset_and_a_bad_one_is_named(offline, capsys):
    code, out, _ = _replay(capsys, "--dry-run", "--json", "--since", "2026-01-02T12:00:00+05:00")
    assert code == 0 and json.loads(out)["since"] == "2026-01-02T07:00:00+00:00"
    code, out, err = _replay(capsys, "--dry-run", "--since", "yesterday")
    assert code == 2 and out == ""
    assert err == (
        "loyalty: --since: not a date or time: 'yesterday' (ISO 8601, e.g. 2026-05-16 or 2026-05-16T12:00:00+02:00)\n"
    )
    code, out, err = _replay(capsys, "--dry-run", "--since", "")  # an empty value is refused, not taken as none
    assert code == 2 and out == "" and "--since: not a date or time: ''" in err


def test_since_counts_only_the_customers_it_lists_and_not_a_replays_own_entries(offline, capsys):
    dsn, live_run = offline
    latest = max(entry.occurred_at for entry in live_run.ledger)
    since = latest.replace(hour=0, minute=0, second=0, microsecond=0)
    code, out, _ = _replay(capsys, "--dry-run", "--json")
    everyone = json.loads(out)
    code, out, _ = _replay(capsys, "--dry-run", "--json", "--since", since.isoformat())
    report = json.loads(out)
    listed = {row["customer_id"] for row in report["customers"]}
    assert 0 < len(listed) < len(everyone["customers"])
    assert report["customers_changed"] == sum(1 for row in report["customers"] if row["delta"])
    assert set(report["customers_losing_points"]) <= listed
    # A compensation dated after `since` (its cut-over) is no activity of the customer's.
    quiet = next(row["customer_id"] for row in everyone["customers"] if row["customer_id"] not in listed)
    client = connect(dsn)
    try:
        entry = next(entry for entry in live_run.ledger if entry.customer_id == quiet)
        compensation = entry.model_copy(
            update={
                "entry_id": "compensation-entry",
                "caused_by": f"{compensation_prefix}v2:{quiet}",
                "occurred_at": datetime(2030, 1, 1, tzinfo=UTC),
                "sequence": 10_000,
            }
        )
        LedgerSink(client).write([compensation])
    finally:
        client.close()
    code, out, _ = _replay(capsys, "--dry-run", "--json", "--since", since.isoformat())
    assert {row["customer_id"] for row in json.loads(out)["customers"]} == listed


def test_a_csv_that_cannot_be_written_is_refused_before_anything_runs(offline, capsys, tmp_path):
    code, out, err = _replay(capsys, "--apply", "--csv", str(tmp_path / "absent" / "diff.csv"))
    assert (code, out) == (2, "")
    assert err == f"loyalty: --csv {tmp_path}/absent/diff.csv: no directory {tmp_path}/absent\n"
    code, out, err = _replay(capsys, "--dry-run", "--csv", str(tmp_path))
    assert code == 2 and err == f"loyalty: --csv {tmp_path}: is a directory\n"
    code, out, err = _replay(capsys, "--dry-run", "--csv", str(tmp_path / "diff.csv"))
    assert code == 0 and (tmp_path / "diff.csv").read_text().startswith("customer_id,balance_before")


def test_lag_max_is_checked(offline, capsys):
    assert _replay(capsys, "--apply", "--lag-max", "-5")[2] == "loyalty: --lag-max must be 0 or more, got -5\n"
    assert _replay(capsys, "--dry-run", "--lag-max", "5")[2] == "loyalty: --lag-max goes with --apply\n"


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_an_unreadable_rules_file_is_named_without_a_traceback(offline, capsys, tmp_path, kind):
    path = tmp_path / "rules"
    if kind == "binary":
        path.write_bytes(b"\xff\xfe")
        reason = "not UTF-8 text"
    else:
        path.mkdir()
        reason = "Is a directory"
    code = cli.main(["replay", "--rules", str(path), "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err == f"loyalty: invalid rule set {path}: cannot read the file: {reason}\n"


def test_the_text_dry_run_warns_of_archive_gaps(offline, capsys):
    dsn, _ = offline
    client = connect(dsn)
    try:
        client.command(
            "ALTER TABLE raw_events DELETE WHERE topic = 'loyalty.purchases' AND offset IN (3, 4) "
            "SETTINGS mutations_sync = 1"
        )
    finally:
        client.close()
    code, out, _ = _replay(capsys, "--dry-run")
    assert code == 0
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: the raw archive misses messages (loyalty.purchases/0: ")


def test_a_rule_set_under_a_version_in_use_with_other_rules_is_flagged(offline, capsys, tmp_path):
    dsn, _ = offline
    document = yaml.safe_load(NEW_RULES.read_text())
    applied = parse_ruleset(yaml.safe_dump(document))
    document["fixed"]["review"] += 5  # edited, version kept
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(document))
    in_force = load_ruleset(REPOSITORY / RULES)
    known = {applied.version: yaml.safe_dump(yaml.safe_load(NEW_RULES.read_text()))}
    assert version_conflict(applied, known, in_force) is None  # the same rules again: a second apply
    assert "already in use with other rules" in version_conflict(parse_ruleset(edited.read_text()), known, in_force)
    same_as_in_force = yaml.safe_load((REPOSITORY / RULES).read_text())
    same_as_in_force["fixed"]["review"] = 1
    assert version_conflict(parse_ruleset(yaml.safe_dump(same_as_in_force)), {}, in_force) is not None

    client = connect(dsn)
    try:
        client.insert("rulesets", [[applied.version], [NEW_RULES.read_text()]], column_names=("version", "text"),
                      column_oriented=True)  # fmt: skip
    finally:
        client.close()
    code = cli.main(["replay", "--rules", str(edited), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    warning = f"warning: --apply would refuse: rule set version {applied.version} is already in use with other rules"
    assert warning in out
    assert cli.main(["replay", "--rules", str(NEW_RULES), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_an_interrupted_offline_rebuild_leaves_no_half_filled_table(offline, capsys, monkeypatch):
    dsn, _ = offline

    def interrupted(client, days, *, suffix):
        client.command(f"INSERT INTO daily_points{suffix} SELECT * FROM daily_points LIMIT 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(rebuild_module, "_recompute", interrupted)
    assert cli.main(["projections", "rebuild"]) == 130
    assert "interrupted; a rebuild stopped before its swap" in capsys.readouterr().err
    client = connect(dsn)
    try:
        tables = {row[0] for row in client.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
                  .result_rows}  # fmt: skip
    finally:
        client.close()
    assert "daily_points" in tables and not any(name.endswith("__rebuild") for name in tables)


def test_the_csv_shows_a_customer_id_a_spreadsheet_would_run_as_a_formula_as_text(tmp_path):
    report = {
        "customers": [
            {"customer_id": "=1+2", "balance_before": 1, "balance_after": 3, "delta": 2},
            {"customer_id": "-neg", "balance_before": 5, "balance_after": 0, "delta": -5},
            {"customer_id": 'a,"b', "balance_before": 0, "balance_after": 0, "delta": 0},
        ]
    }
    write_csv(report, tmp_path / "diff.csv")
    assert (tmp_path / "diff.csv").read_text().splitlines() == [
        "customer_id,balance_before,balance_after,delta",
        "'=1+2,1,3,2",
        "'-neg,5,0,-5",
        '"a,""b",0,0,0',
    ]


def _archive_markers(dsn: str, versions: list[str]) -> None:
    """Cut-over markers of `versions` in the archive, in that order (one apply each, archived a moment apart)."""
    from projections.archive import ArchivedMessage, RawArchive

    client = connect(dsn)
    try:
        end = client.query("SELECT max(offset) + 1 FROM raw_events WHERE topic = 'loyalty.purchases' AND partition = 0")
        for index, version in enumerate(versions):  # at the partition's end: no gap
            offset = int(end.result_rows[0][0]) + index
            marker = ArchivedMessage(
                "loyalty.purchases", 0, offset, "", version.encode(), 2, 0, "", datetime(2026, 1, 1, tzinfo=UTC)
            )
            RawArchive(client).write([marker], {})
            client.command("SELECT sleep(0.01)")  # archived_at apart: the order of the applies
    finally:
        client.close()


def test_a_rule_set_applied_before_and_replaced_since_is_flagged(offline, capsys, tmp_path):
    """A -> B -> A -> B: the second apply of B would publish compensations under the first one's ids."""
    dsn, _ = offline
    first = parse_ruleset(NEW_RULES.read_text())
    document = yaml.safe_load(NEW_RULES.read_text())
    document["version"] = "second"
    second_text = yaml.safe_dump(document)
    second = parse_ruleset(second_text)
    known = {first.version: NEW_RULES.read_text(), "second": second_text}
    reason = f"rule set version {first.version} was applied before and replaced since by second"
    assert reason in version_conflict(first, known, second, activated=[first.version, "second"])
    assert version_conflict(first, known, first, activated=["second", first.version]) is None  # in force: again
    assert version_conflict(second, known, first, activated=[first.version]) is None  # recorded, never activated

    client = connect(dsn)
    try:
        client.insert("rulesets", [[first.version, "second"], [NEW_RULES.read_text(), second_text]],
                      column_names=("version", "text"), column_oriented=True)  # fmt: skip
    finally:
        client.close()
    _archive_markers(dsn, [first.version, "second"])
    code = cli.main(["replay", "--rules", str(NEW_RULES), "--dry-run"])
    assert code == 0
    assert f"warning: --apply would refuse: {reason}" in capsys.readouterr().out
    (tmp_path / "second.yaml").write_text(second_text)  # the one in force (the last activated): no warning
    assert cli.main(["replay", "--rules", str(tmp_path / "second.yaml"), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_one_customers_text_preview_says_how_many_replayed_events_made_entries(offline, capsys, monkeypatch):
    """An event that made no entry on either side (a clock tick with nothing to do) has no row: the header says how
    many of the replayed events have one, so that its count and the rows agree."""
    from streams import replay

    code, out, _ = _replay(capsys, "--dry-run", "--json", "--customer", "c000001")
    assert code == 0
    preview = json.loads(out)
    rows = len(preview["events"])
    for replayed, suffix in ((rows, "events replayed"), (rows + 2, f"events replayed, {rows:,} with entries")):
        shown = {**preview, "events_replayed": replayed}
        monkeypatch.setattr(replay, "preview_customer", lambda client, rules, customer, shown=shown: shown)
        code, out, _ = _replay(capsys, "--dry-run", "--customer", "c000001")
        header, _, *lines = out.splitlines()
        assert code == 0 and len(lines) == rows and header.endswith(f"{replayed:,} {suffix}")


def test_a_since_in_the_future_is_named_as_the_reason_no_customer_is_listed(offline, capsys):
    code, out, _ = _replay(capsys, "--dry-run", "--since", "2999-01-01")
    assert code == 0
    assert "warning: --since 2999-01-01T00:00:00+00:00 is in the future: no customer is listed" in out
    code, out, _ = _replay(capsys, "--dry-run", "--json", "--since", "2999-01-01")
    report = json.loads(out)
    assert report["customers"] == [] and report["warnings"] == [
        "--since 2999-01-01T00:00:00+00:00 is in the future: no customer is listed"
    ]
    code, out, _ = _replay(capsys, "--dry-run", "--json", "--since", "2026-01-02")  # a past one: no such warning
    assert not any("in the future" in warning for warning in json.loads(out)["warnings"])
