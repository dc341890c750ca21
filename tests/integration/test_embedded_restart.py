"""A second embedded `loyalty up` on a data directory continues the first: its topics are rebuilt from ClickHouse.

The embedded broker keeps its log in memory. Without the rebuild the projector waited at its old offsets and the
worker started every customer from zero; where the rebuild is impossible, `up` refuses to start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from test_pipeline import run_cli

from projections import LedgerSink, connect, migrate
from schemas.topics import LEDGER
from streams.batch import process_lines
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

REPOSITORY = Path(__file__).resolve().parents[2]
WAIT_S = 120


def _brokers_left(log: str) -> set[int]:
    """Pids of running Tansu brokers that `loyalty up` logged starting in `log` (found by their listener URL, so
    that another run's brokers on the same machine do not count)."""
    listeners = {f"tcp://{address}".encode() for address in re.findall(r"started the embedded broker on (\S+) ", log)}
    assert listeners, "no embedded broker was started"
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    arguments = cmdline.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if arguments and b"tansu" in Path(arguments[0].decode(errors="replace")).name.encode():
                if listeners & set(arguments):
                    found.add(int(entry))
    return found


def _environment(data_dir: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOYALTY_")}
    environment.update(
        LOYALTY_DATA_DIR=str(data_dir),
        LOYALTY_HTTP_PORT="0",
        LOYALTY_BROKER_PORT="0",
        LOYALTY_PARTITIONS="2",
        LOYALTY_SESSION_TIMEOUT_S="2",
        # Release by watermark and caught-up partitions with a settle that covers a loaded CI host, so that the
        # worker's order equals the batch driver's (as in tests/reliability).
        LOYALTY_REORDER_WAIT_MS="120000",
        LOYALTY_REORDER_SETTLE_MS="1500",
    )
    return environment


class _Up:
    """`loyalty up` with the embedded broker; stopped with SIGTERM (as Ctrl-C) and waited for."""

    def __init__(self, environment: dict[str, str], log_path: Path, *, own_group: bool = False) -> None:
        self.data_dir = Path(environment["LOYALTY_DATA_DIR"])
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "up"],
            env=environment,
            cwd=REPOSITORY,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,  # a process group of its own, for a terminal's Ctrl-C (`interrupt`)
        )
        deadline = time.monotonic() + WAIT_S
        while not (self.data_dir / "run.json").exists():
            assert self.process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "loyalty up did not start"
            time.sleep(0.2)

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to the whole foreground process group, `up` and whatever it started there."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=60)  # no SIGTERM after it: a second signal skips the projector's drain
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _wait_for(environment: dict[str, str], archived: int, projected: int, up: _Up, *, inputs: int = 0) -> dict:
    """Until every input is decided and projected: `projected` ledger rows exactly, or with `inputs` (input messages
    the worker must have committed) at least `projected`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status = run_cli(environment, "status")
        # The worker has committed every input, and every entry emitted is projected (once: an entry emitted twice
        # would keep the two counts apart).
        caught_up = not any(status["consumer_lag"].values()) and (
            status["ledger_entries_emitted"] == status["ledger_rows_projected"]
        )
        if inputs:
            counted = status["events_processed"] >= inputs and status["ledger_rows_projected"] >= projected
        else:
            counted = status["ledger_rows_projected"] == projected
        if caught_up and status["input_messages_archived"] >= archived and counted:
            return status
        assert up.process.poll() is None, up.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not caught up: {status}"
        time.sleep(1)


def _refused(environment: dict[str, str]) -> str:
    """Run `loyalty up`, which must exit with code 2 on its own; return what it printed on stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "up"],
        env=environment,
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2, stderr[-3000:]
    return stderr


def _two_runs(lines: list[str], directory: Path) -> tuple[int, Path, Path]:
    """The log cut in two files, one per run, where every later event is at least as late as every earlier one,
    so that the batch driver's order over the whole log is the order the two runs see."""
    times = [json.loads(line)["occurred_at"] for line in lines]
    cut = next(index for index in range(len(lines) // 2, len(lines)) if min(times[index:]) >= max(times[:index]))
    first, second = directory / "first.jsonl", directory / "second.jsonl"
    first.write_text("".join(line + "\n" for line in lines[:cut]))
    second.write_text("".join(line + "\n" for line in lines[cut:]))
    return cut, first, second


def test_a_second_embedded_up_continues_the_first_from_its_data_directory(tmp_path):
    lines = list(generate_events(events=1200, customers=60, seed=23))
    cut, first, second = _two_runs(lines, tmp_path)
    ruleset = load_ruleset()
    expected_first = process_lines([line.encode() for line in lines[:cut]], ruleset)
    expected = process_lines([line.encode() for line in lines], ruleset)
    environment = _environment(tmp_path / "data")
    log_path = tmp_path / "up.log"
    up = _Up(environment, log_path)
    try:
        produced = sum(run_cli(environment, "produce", str(first)).values())
        _wait_for(environment, produced, len(expected_first.ledger), up)
    finally:
        up.stop()

    up = _Up(environment, log_path)
    try:
        assert "continued the data directory" in log_path.read_text()
        more = sum(run_cli(environment, "produce", str(second)).values())
        # input_messages_archived counts this run's archiving: the second file's messages.
        status = _wait_for(environment, more, len(expected.ledger), up)
        assert status["ledger_entries_emitted"] == len(expected.ledger)  # the rebuilt ledger and no entry twice
        balances = expected.balances()
        for customer in sorted(balances)[:: max(1, len(balances) // 12)]:
            assert run_cli(environment, "balance", customer)["balance"] == balances[customer], customer
        heavy = max(balances, key=lambda customer: sum(e.customer_id == customer for e in expected.ledger))
        history = run_cli(environment, "history", heavy, "--limit", "1000")["entries"]
        assert history == [e.model_dump(mode="json") for e in expected.ledger if e.customer_id == heavy]
    finally:
        up.stop()
    assert not _brokers_left(log_path.read_text())


def test_a_stop_right_after_producing_archives_and_projects_everything_first(tmp_path):
    """`up` is stopped as soon as the first file is produced: the worker stops first, and the projector then takes
    what is left in the topics (unprocessed inputs, the last ledger entries) into ClickHouse before the broker's
    memory log dies. The next run decides the rest and ends with the batch driver's ledger over the whole log."""
    lines = list(generate_events(events=1200, customers=60, seed=31))
    cut, first, second = _two_runs(lines, tmp_path)
    expected = process_lines([line.encode() for line in lines], load_ruleset())
    environment = _environment(tmp_path / "data")
    log_path = tmp_path / "up.log"

    up = _Up(environment, log_path, own_group=True)
    try:
        run_cli(environment, "produce", str(first))
    finally:
        up.interrupt()  # as Ctrl-C: the broker and the worker must not get it and stop before the projector is done
    assert up.process.returncode == 0, log_path.read_text()[-3000:]
    assert "every message is archived and every ledger entry projected" in log_path.read_text()

    up = _Up(environment, log_path)
    try:
        more = sum(run_cli(environment, "produce", str(second)).values())
        status = _wait_for(environment, more, len(expected.ledger), up)
        assert status["ledger_entries_emitted"] == len(expected.ledger)
        balances = expected.balances()
        for customer in sorted(balances):
            assert run_cli(environment, "balance", customer)["balance"] == balances[customer], customer
    finally:
        up.stop()


def test_up_refuses_a_data_directory_it_cannot_rebuild_the_topics_of(tmp_path):
    data_dir = tmp_path / "data"
    # Positions the projector had read to, with no archived message behind them: the inputs cannot be rebuilt.
    client = connect(f"chdb://{data_dir / 'clickhouse'}")
    migrate(client)
    LedgerSink(client).write([], {(LEDGER, 0): 898, ("loyalty.purchases", 1): 40})
    client.close()

    stderr = _refused(_environment(data_dir))
    assert "holds what an earlier `loyalty up` projected from its embedded broker" in stderr
    assert "loyalty.purchases/1: archived up to 0, read up to 40" in stderr
    assert not (data_dir / "run.json").exists()  # nothing was started for clients to find
    assert not _brokers_left(stderr)  # the embedded broker it started is stopped


def test_a_rule_set_applied_before_the_restart_stays_in_force_after_it(tmp_path):
    lines = list(generate_events(events=600, customers=40, seed=29))
    cut, first, second = _two_runs(lines, tmp_path)
    # The second run's events are dated after the apply, as a store's would be: the worker decides a customer's
    # events in time order, and the compensations carry the apply's wall-clock time.
    times = [datetime.fromisoformat(json.loads(line)["occurred_at"]) for line in lines[cut:]]
    shift = datetime.now(UTC) + timedelta(hours=1) - min(times)
    shifted = []
    for line, moment in zip(lines[cut:], times, strict=True):
        shifted.append(json.dumps({**json.loads(line), "occurred_at": (moment + shift).isoformat()}))
    lines[cut:] = shifted
    second.write_text("".join(line + "\n" for line in shifted))
    new_rules = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"
    new_version = load_ruleset(new_rules).version
    expected_first = process_lines([line.encode() for line in lines[:cut]], load_ruleset())
    environment = _environment(tmp_path / "data")
    log_path = tmp_path / "up.log"

    up = _Up(environment, log_path)
    try:
        produced = sum(run_cli(environment, "produce", str(first)).values())
        _wait_for(environment, produced, len(expected_first.ledger), up)
        applied = run_cli(environment, "replay", "--rules", str(new_rules), "--apply")
        compensations = applied["applied"]["compensations_published"]
        assert compensations > 0
        # The compensations' entries, and a 0-point re-valuation per open order whose awards change.
        _wait_for(environment, 0, len(expected_first.ledger) + compensations, up, inputs=produced + compensations)
    finally:
        up.stop()

    up = _Up(environment, log_path)
    try:
        assert run_cli(environment, "status")["ruleset_version"] == new_version  # from the rebuilt activations
        more = sum(run_cli(environment, "produce", str(second)).values())
        deadline = time.monotonic() + WAIT_S
        later = {json.loads(line)["event_id"] for line in lines[cut:]}
        customer = json.loads(lines[-1])["customer_id"]
        while True:
            status = run_cli(environment, "status")
            entries = run_cli(environment, "history", customer, "--limit", "1000")["entries"]
            decided = [entry for entry in entries if entry["caused_by"] in later]
            mine = sum(json.loads(line)["customer_id"] == customer for line in lines[cut:])
            # Every entry emitted is projected once: an entry emitted twice would keep the two counts apart.
            settled = (
                status["projection_backlog"] == 0
                and status["ledger_entries_emitted"] == status["ledger_rows_projected"]
            )
            if status["input_messages_archived"] >= more and not any(status["consumer_lag"].values()) and settled:
                if len({entry["caused_by"] for entry in decided}) >= mine:
                    break
            assert up.process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not caught up: {status}"
            time.sleep(1)
        assert {entry["ruleset_version"] for entry in decided} == {new_version}
    finally:
        up.stop()


def test_up_with_the_embedded_broker_refuses_to_start_without_clickhouse(tmp_path):
    from streams.broker import free_port

    environment = _environment(tmp_path / "data")
    environment["LOYALTY_CLICKHOUSE_DSN"] = f"http://127.0.0.1:{free_port()}/loyalty"  # nothing listens there
    stderr = _refused(environment)
    assert "with the embedded broker, `loyalty up` needs ClickHouse at start" in stderr
    assert not _brokers_left(stderr)
