"""Does a replay's memory grow with the number of customers, not of events? Peak RSS of `loyalty replay --dry-run`.

    python tests/tools/replay_memory.py [--customers 5000] [--events 100000,200000,400000] [--processes 2]

For each event count it simulates a log over the same customers (seed 8), stores the log's archive (every input
message, as `loyalty up` archives it) and the batch driver's ledger in a fresh chDB directory (in a subprocess: one
process opens one chDB directory), then runs `python -m streams.cli replay --rules seasonal-promotion.yaml
--dry-run --json` offline on it, reading the resident memory of that process and of its replay processes every
50 ms (/proc). Prints one JSON line per event count: the peak of the calling process, the peak of the sum over
the process tree, the replayed events and the customers. A measuring tool for docs/performance.md, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def build(directory: Path, events: int, customers: int) -> None:
    """The archive and ledger of a live run of the simulated log, in chDB at `directory`/clickhouse."""
    sys.path.insert(0, str(REPOSITORY))
    from datetime import UTC, datetime

    from projections import LedgerSink, connect, migrate
    from projections.archive import ArchivedMessage, RawArchive
    from schemas.topics import REFEREE_SIDE, SIDE_HEADER, TOPIC_RANK
    from streams.batch import process_lines
    from streams.routing import routes_for
    from streams.rules.ruleset import load_ruleset
    from streams.simulate import generate_events

    lines = [line.encode() for line in generate_events(events=events, customers=customers, seed=8)]
    client = connect(f"chdb://{directory / 'clickhouse'}")
    migrate(client)
    archive, offsets, batch = RawArchive(client), {}, []
    for raw in lines:
        document = json.loads(raw)
        moment = datetime.fromisoformat(document["occurred_at"]).astimezone(UTC)
        for route in routes_for(raw):
            partition = hash(route.key) % 4
            offset = offsets.get((route.topic, partition), 0)
            offsets[(route.topic, partition)] = offset + 1
            side = 1 if (SIDE_HEADER, REFEREE_SIDE) in route.headers else 0
            batch.append(
                ArchivedMessage(
                    route.topic, partition, offset, route.key.decode(), raw, side, TOPIC_RANK[route.topic],
                    str(document["event_id"]), moment,
                )
            )  # fmt: skip
        if len(batch) >= 50_000:
            archive.write(batch, {})
            batch = []
    archive.write(batch, {})
    ledger = process_lines(lines, load_ruleset(None)).ledger
    sink = LedgerSink(client)
    for start in range(0, len(ledger), 50_000):
        sink.write(ledger[start : start + 50_000])
    client.close()


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def measure(directory: Path, processes: int) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "LOYALTY_DATA_DIR": str(directory),
                   "LOYALTY_REPLAY_PROCESSES": str(processes)}  # fmt: skip
    environment.pop("LOYALTY_CLICKHOUSE_DSN", None)
    command = [sys.executable, "-m", "streams.cli", "replay", "--rules",
               str(REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"), "--dry-run", "--json"]  # fmt: skip
    output = directory / "report.json"
    began = time.monotonic()
    with output.open("wb") as sink:
        process = subprocess.Popen(command, env=environment, cwd=directory, stdout=sink, stderr=subprocess.PIPE)
        peak_main = peak_tree = 0
        while process.poll() is None:
            tree = _descendants(process.pid)
            sizes = [_rss_kib(pid) for pid in tree]
            peak_main, peak_tree = max(peak_main, sizes[0]), max(peak_tree, sum(sizes))
            time.sleep(0.05)
        error = process.stderr.read().decode()
    if process.returncode:
        raise SystemExit(f"replay failed: {error[-2000:]}")
    report = json.loads(output.read_text())
    return {
        "events_replayed": report["events_replayed"],
        "customers": len(report["customers"]),
        "seconds": round(time.monotonic() - began, 1),
        "peak_rss_main_mib": round(peak_main / 1024),
        "peak_rss_tree_mib": round(peak_tree / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--events", default="100000,200000,400000")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build is not None:
        build(args.build, int(args.events), args.customers)
        return
    for events in [int(part) for part in args.events.split(",")]:
        directory = Path(tempfile.mkdtemp(prefix="replay-memory-"))
        try:
            subprocess.run(
                [sys.executable, __file__, "--build", str(directory), "--events", str(events),
                 "--customers", str(args.customers)],
                check=True, cwd=REPOSITORY,
            )  # fmt: skip
            print(json.dumps({"events": events, "processes": args.processes, **measure(directory, args.processes)}),
                  flush=True)  # fmt: skip
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
