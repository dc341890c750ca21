"""How long `loyalty replay --apply` takes on a running system, and how long its worker holds the events after the
cut-over markers (from the first marker's activation to the last "compensations applied" line of its log: the
longest any customer waits), and how long the customers it does not compensate wait (to the last "plan read" line).

    python tests/tools/apply_hold.py [--repo DIR] [--events 100000] [--customers 20000]

`--repo` (default: this checkout) is the code measured, e.g. an export of an older commit (`git archive`). Its
`loyalty up` runs on an embedded broker in a temporary data directory and decides the simulated events (seed 8);
then registrations of new customers keep arriving (about 200 a second) while seasonal-promotion.yaml is applied.
Prints one JSON line. A measuring tool for docs/performance.md, not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

LOG_TIME = r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]? .*"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=20_000)
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path[:0] = [str(repo), str(repo / "tests/integration")]
    from test_embedded_restart import _environment, _Up, _wait_for

    from streams.simulate import generate_events

    def cli(environment: dict, *arguments: str) -> dict:
        command = [sys.executable, "-m", "streams.cli", *arguments, "--json"]
        done = subprocess.run(command, env=environment, cwd=repo, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        return json.loads(done.stdout)

    work = Path(tempfile.mkdtemp(prefix="apply-hold-"))
    environment = _environment(work / "data")
    environment.update(PYTHONPATH=str(repo), LOYALTY_REORDER_WAIT_MS="2000", LOYALTY_REORDER_SETTLE_MS="300")
    history = list(generate_events(events=args.events, customers=args.customers, seed=8))
    (work / "history.jsonl").write_text("".join(line + "\n" for line in history))
    up = _Up(environment, work / "up.log")
    stop = threading.Event()
    try:
        produced = sum(cli(environment, "produce", str(work / "history.jsonl")).values())
        # Every input decided and projected. Not the batch driver's exact ledger: on a loaded host a backlog this size
        # outlasts the 2 s reorder wait, and events decided out of event-time order change entries (counted as late).
        _wait_for(environment, produced, 0, up, inputs=produced)
        bootstrap = json.loads((work / "data/run.json").read_text())["kafka_bootstrap"]
        last = max(datetime.fromisoformat(json.loads(line)["occurred_at"]) for line in history)
        traffic = threading.Thread(target=_registrations, args=(bootstrap, last, stop))
        traffic.start()
        time.sleep(2)
        began = time.monotonic()
        report = cli(environment, "replay", "--rules", "streams/rules/rulesets/seasonal-promotion.yaml", "--apply")
        took = time.monotonic() - began
        stop.set()
        traffic.join()
        deadline = time.monotonic() + 600
        while any(cli(environment, "status")["consumer_lag"].values()) and time.monotonic() < deadline:
            time.sleep(1)  # until the worker has decided every compensation and held event
    finally:
        stop.set()
        up.stop()
    log = (work / "up.log").read_text()
    cut, ended = _times(log, r"rule set \S+ in force on"), _times(log, r"compensations applied on partition")
    planned = _times(log, r"apply of \S+: plan read on partition")
    figures = {
        "events": args.events,
        "events_replayed": report["events_replayed"],
        "compensations": report["applied"]["compensations_published"],
        "apply_s": round(took, 1),
        "replay_s": report.get("elapsed_s"),
        "replay_after_markers_s": report.get("replay_after_markers_s"),
        "after_markers_s": report["applied"].get("after_markers_s"),  # when the apply did what, after its markers
        "late_before_apply": int(re.findall(r" late (\d+),", log[: log.find("in force on")])[-1]),
        "held_s": round((max(ended) - min(cut)).total_seconds(), 1) if cut and ended else None,
        # The customers the apply does not compensate wait until the plan is read (code before the plan: None).
        "others_held_s": round((max(planned) - min(cut)).total_seconds(), 1) if cut and planned else None,
    }
    print(json.dumps(figures))


def _registrations(bootstrap: str, after: datetime, stop: threading.Event) -> None:
    from streams.producer import make_producer, produce_lines

    producer, number = make_producer(bootstrap), 0
    try:
        while not stop.is_set():
            lines = []
            for _ in range(20):
                customer, moment = f"new{number:06d}", after + timedelta(seconds=number + 1)
                number += 1
                event = {"schema_version": 1, "customer_id": customer, "store_id": "s1", "event_id": f"reg-{customer}",
                         "event_type": "customer.registered", "occurred_at": moment.isoformat()}  # fmt: skip
                lines.append(json.dumps(event).encode())
            produce_lines(producer, lines)
            time.sleep(0.1)
    finally:
        producer.close()


def _times(log: str, pattern: str) -> list[datetime]:
    return [
        datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        for match in re.finditer(LOG_TIME + pattern, log, re.MULTILINE)
    ]


if __name__ == "__main__":
    main()
