"""The `loyalty` command's options for the running system, without starting one (docs/cli.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streams import client as client_module
from streams.cli import _settings, build_parser, main


@pytest.mark.parametrize("command", [["status"], ["balance", "c1"], ["history", "c1"], ["dashboard"]])
def test_client_commands_have_no_port_option_that_they_would_ignore(command, capsys):
    # They find the running system through <data dir>/run.json; a --port would be silently ignored.
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--port", "9999"])
    assert "unrecognized arguments: --port" in capsys.readouterr().err


def test_up_takes_the_port_of_its_api():
    assert _settings(build_parser().parse_args(["up", "--port", "0"])).http_port == 0


def test_dashboard_passes_grouping_and_top_earners_limit_to_the_api(monkeypatch, capsys):
    asked = []

    def fake_query(settings, path, params):
        asked.append((path, params))
        return {"from": "2026-01-01", "to": "2026-01-31", "by": params["by"], "point_sources": []}

    monkeypatch.setattr(client_module, "query_running_system", fake_query)
    assert main(["dashboard", "--by", "category", "--limit", "5", "--json"]) == 0
    assert asked == [("/api/dashboard", {"granularity": "day", "by": "category", "limit": 5})]
    assert json.loads(capsys.readouterr().out)["by"] == "category"


@pytest.mark.parametrize("option", [["--as-of", "2027-01-01"], ["--rules", "some.yaml"]])
def test_expiring_refuses_offline_only_options_while_the_system_runs(option, tmp_path, monkeypatch, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "token": "t"}))

    def fake_query(settings, path, params):
        raise AssertionError("no query: the option cannot be honoured by the running system")

    monkeypatch.setattr(client_module, "query_running_system", fake_query)
    assert main(["expiring", "--within-days", "30", "--data-dir", str(tmp_path), *option]) == 2
    assert f"{option[0]}: offline only" in capsys.readouterr().err


def test_expiring_offline_under_a_rule_set_without_expiry_answers_as_the_running_system(tmp_path, monkeypatch, capsys):
    # The running system answers {"mode": "none", "customers": []} with exit 0; offline used to exit 1.
    monkeypatch.delenv("LOYALTY_RULES", raising=False)
    assert main(["expiring", "--within-days", "30", "--json", "--data-dir", str(tmp_path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["mode"], document["customers"], document["ruleset_version"]) == ("none", [], "default-1")
    assert main(["expiring", "--within-days", "30", "--data-dir", str(tmp_path)]) == 0
    assert "has no expiry (expiry.mode: none): nothing expires" in capsys.readouterr().out
    assert not (tmp_path / "clickhouse").exists()  # nothing to read: no database opened or created


def test_the_broker_has_no_data_directory_option_that_it_would_ignore(capsys):
    # It keeps its log in memory and writes no file: a --data-dir was accepted and silently did nothing.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["broker", "--data-dir", "/tmp/anywhere"])
    assert "unrecognized arguments: --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["projections", "migrate"], "loyalty: cannot open the ClickHouse database (the chDB directory "),
        (["up"], "loyalty: ClickHouse at chdb://"),
    ],
)
def test_a_chdb_directory_another_process_holds_is_named_once_without_a_traceback(command, said, tmp_path):
    """chDB writes its own error straight to descriptor 2; the command says it once, in its own message."""
    import os
    import subprocess
    import sys

    directory = tmp_path / "clickhouse"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, clickhouse_connect; c = clickhouse_connect.get_client(dsn=sys.argv[1]); c.command('SELECT 1');"
            " print('open', flush=True); sys.stdin.read()",
            f"chdb://{directory}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("LOYALTY_")}
        environment.update(
            LOYALTY_CLICKHOUSE_DSN=f"chdb://{directory}",
            LOYALTY_DATA_DIR=str(tmp_path / "data"),
            LOYALTY_HTTP_PORT="0",
            LOYALTY_LOG_LEVEL="WARNING",
        )
        migrating = subprocess.run(
            [sys.executable, "-m", "streams.cli", *command],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert migrating.returncode == 1, migrating.stderr
    assert migrating.stderr.startswith(said), migrating.stderr
    assert f"the chDB directory {directory} is open in another process" in migrating.stderr
    assert "Traceback" not in migrating.stderr
    assert migrating.stderr.count("Cannot lock file") == 1  # not a raw engine line before the message as well


def test_dashboard_passes_every_given_option_to_the_api_even_zero_or_empty(monkeypatch, tmp_path):
    """`--limit 0` and `--from ''` were dropped (a truthiness filter), so the default answered instead of the API's
    400 naming the bad value."""
    import streams.client
    from streams.cli import main

    asked = []
    monkeypatch.setattr(streams.client, "query_running_system", lambda settings, path, params: asked.append(params))
    main(["dashboard", "--data-dir", str(tmp_path), "--json", "--limit", "0", "--from", ""])
    assert asked == [{"from": "", "granularity": "day", "by": "source", "limit": 0}]


def test_an_applied_replay_says_when_each_step_after_the_markers_was_done(capsys):
    from streams.cli import _print_replay

    totals = {"issued": 10, "outstanding": 5, "liability": "0.05"}
    report = {
        "events_replayed": 3, "ruleset_version_new": "v2", "ruleset_versions_live": ["v1"],
        "totals": {"before": totals, "after": totals}, "customers_changed": 1, "customers_losing_points": [],
        "per_rule": [],
        "applied": {"compensations_published": 1, "cut_over": "2026-11-28T07:00:00+00:00",
                    "after_markers_s": {"worker_passed_markers": 1.2, "compared": 1.5, "compensations_built": 2.0,
                                        "plan_published": 2.1, "compensations_published": 3.25}},
    }  # fmt: skip
    assert _print_replay(report, as_json=False) == 0
    assert (
        "  after the markers: worker passed markers 1.2 s, compared 1.5 s, compensations built 2.0 s, plan published "
        "2.1 s, compensations published 3.2 s\n"
    ) in capsys.readouterr().out


def test_the_text_status_names_the_rule_set_in_force(monkeypatch, capsys):
    # docs/replay.md tells the operator to check `loyalty status`'s ruleset_version after an apply: only --json had it.
    status = {
        "consumer_lag": {"loyalty.purchases": 0},
        "events_processed": 10,
        "events_rejected": 0,
        "ledger_entries_emitted": 20,
        "ledger_rows_projected": 20,
        "projection_backlog": 0,
        "aggregate_days_pending": 0,
        "ruleset_version": "default-2",
    }
    monkeypatch.setattr(client_module, "query_running_system", lambda settings, path, params=None: status)
    assert main(["status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "  rule set in force: default-2"


def test_a_run_file_left_by_a_killed_system_is_named_as_such(tmp_path, capsys):
    # A `loyalty up` killed with SIGKILL leaves run.json behind: every command then said only "does not answer",
    # and the commands with an offline path (replay --dry-run, projections rebuild) would not take it.
    never_a_pid = 2**22 + 1  # above the largest pid_max Linux allows
    (tmp_path / "run.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "token": "t", "pid": never_a_pid}))
    assert main(["status", "--data-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "does not answer" in error
    assert f"names process {never_a_pid}, which is not running here" in error
    assert f"remove {tmp_path / 'run.json'}" in error


def test_a_system_that_dies_during_a_request_is_named_without_a_traceback(tmp_path, capsys):
    # QA 2026-11-28: `loyalty up` SIGKILLed during `loyalty replay --apply` left the command with a traceback
    # (http.client.RemoteDisconnected, which urllib does not wrap in URLError) instead of a message.
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()  # no answer at all

    thread = threading.Thread(target=hang_up)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    (tmp_path / "run.json").write_text(json.dumps({"url": url, "token": "t", "pid": os.getpid()}))
    rules = Path(__file__).resolve().parents[1] / "streams/rules/rulesets/seasonal-promotion.yaml"
    try:
        assert main(["replay", "--rules", str(rules), "--apply", "--data-dir", str(tmp_path)]) == 2
    finally:
        thread.join(timeout=10)
        listener.close()
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert f"the running system at {url} closed the connection before answering /api/replay" in error
    assert "may have been carried out in part" in error
