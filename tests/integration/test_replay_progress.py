"""`loyalty replay` against the running system draws its progress bar on a terminal, as offline: the running system
tells how far the replay it runs for the request is (GET /api/replay/progress), and the CLI draws it while its
POST /api/replay waits for the report. Before, it printed "no progress bar through the API" and nothing until done.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application
from test_embedded_restart import REPOSITORY, _environment, _Up, _wait_for
from test_pipeline import run_cli

from streams.batch import process_lines
from streams.rules.ruleset import load_ruleset
from streams.runtime import ReplayProgress, replay_progress_kept
from streams.simulate import generate_events

NEW_RULES = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"


def _on_a_terminal(environment: dict[str, str], *arguments: str) -> tuple[int, str, str]:
    """Run the CLI with its standard error on a pseudo-terminal: (exit code, standard output, what the terminal got)."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", *arguments],
        env=environment,
        cwd=REPOSITORY,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end closed (EIO)
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        os.close(controller)
    return process.returncode, output.decode(), shown.decode(errors="replace")


def test_a_replay_through_the_running_system_draws_its_progress_bar_on_a_terminal(tmp_path):
    history = list(generate_events(events=12_000, customers=2_000, seed=17))
    expected = process_lines([line.encode() for line in history], load_ruleset())
    environment = _environment(tmp_path / "data")
    up = _Up(environment, tmp_path / "up.log")
    try:
        (tmp_path / "history.jsonl").write_text("".join(line + "\n" for line in history))
        produced = sum(run_cli(environment, "produce", str(tmp_path / "history.jsonl")).values())
        _wait_for(environment, produced, len(expected.ledger), up)
        code, output, shown = _on_a_terminal(environment, "replay", "--rules", str(NEW_RULES), "--dry-run", "--json")
        assert code == 0, shown
        report = json.loads(output)
        replayed = report["events_replayed"]
        assert replayed == produced
        # The bar's last state is the whole replay, drawn over the line before; the line ends after it.
        assert shown.rstrip().endswith(f"100%  {replayed:,} of ~{replayed:,} events\x1b[K"), shown[-300:]
        assert "\rreplay [" + "#" * 30 + "]" in shown
        assert "no progress bar" not in shown

        code, output, shown = _on_a_terminal(environment, "replay", "--rules", str(NEW_RULES), "--apply", "--json")
        assert code == 0, shown
        assert json.loads(output)["applied"]["compensations_published"] > 0
        assert shown.rstrip().endswith(f"100%  {replayed:,} of ~{replayed:,} events\x1b[K"), shown[-300:]
    finally:
        up.stop()


def test_the_progress_route_names_a_bad_or_unknown_id_and_keeps_the_last_runs():
    replays = ReplayProgress()
    app = Application()
    app.router.add_get("/api/replay/progress", replays.handler())

    async def scenario() -> None:
        async with TestClient(TestServer(app)) as http:
            bad = await http.get("/api/replay/progress", params={"id": "a b"})
            assert bad.status == 400 and "progress_id" in (await bad.json())["error"]
            unknown = await http.get("/api/replay/progress", params={"id": "nope"})
            assert unknown.status == 404 and "nope" in (await unknown.json())["error"]
            run = replays.start("r0")
            run["phase"], run["events"], run["estimate"] = "replaying", 5000, 12000
            answer = await (await http.get("/api/replay/progress", params={"id": "r0"})).json()
            assert answer == {"phase": "replaying", "events": 5000, "estimate": 12000, "done": False}
            for number in range(1, replay_progress_kept + 1):
                replays.start(f"r{number}")
            gone = await http.get("/api/replay/progress", params={"id": "r0"})
            assert gone.status == 404 and len(replays.runs) == replay_progress_kept

    asyncio.run(scenario())
