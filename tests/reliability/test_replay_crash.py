"""Replay --apply with the worker killed in the middle: nothing lost, nothing doubled, twice equals once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pipeline_checks import run_cli
from reliability_support import REPOSITORY, stop_process, wait_until

from schemas.topics import ALL_TOPICS
from streams.batch import process_lines
from streams.broker import ensure_topics
from streams.producer import produce_file
from streams.rules.ruleset import load_ruleset
from streams.simulate import write_events

pytestmark = [pytest.mark.integration, pytest.mark.faults]

NEW_RULES = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"


def test_a_worker_killed_during_apply_loses_nothing_and_doubles_nothing(broker, worker_factory, tmp_path):
    events_path = tmp_path / "events.jsonl"
    write_events(events_path, events=3000, customers=300, seed=77, duplicate_share=0.02, bad_share=0.01)
    old = process_lines(events_path.open("rb"), load_ruleset())
    new = process_lines(events_path.open("rb"), load_ruleset(NEW_RULES))
    ensure_topics(broker.bootstrap, ALL_TOPICS, 4)
    produced = sum(produce_file(events_path, bootstrap=broker.bootstrap).values())

    data_dir = tmp_path / "data"
    environment = dict(
        os.environ,
        LOYALTY_KAFKA_BOOTSTRAP=broker.bootstrap,
        LOYALTY_DATA_DIR=str(data_dir),
        LOYALTY_PARTITIONS="4",
        LOYALTY_HTTP_PORT="0",
        LOYALTY_RUN_WORKER="false",  # the workers are ours, so that one can be killed
    )
    worker = worker_factory()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "up"],
        env=environment,
        cwd=REPOSITORY,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    apply = None
    try:
        wait_until(lambda: (data_dir / "run.json").exists(), 60, "loyalty up to start")

        def settled() -> bool:
            status = run_cli(environment, "status")
            return (
                status["ledger_rows_projected"] >= len(old.ledger)
                and status["input_messages_archived"] >= produced
                and sum(status["consumer_lag"].values()) == 0
            )

        wait_until(settled, 180, "the log to be processed, archived and projected", interval_s=1.0)

        apply = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "replay", "--rules", str(NEW_RULES), "--apply", "--json"],
            env=environment,
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Kill the worker while apply is writing its markers and waiting for them to be passed.
        time.sleep(1.0)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        time.sleep(2.0)
        worker = worker_factory()
        stdout, stderr = apply.communicate(timeout=300)
        assert apply.returncode == 0, stderr
        report = json.loads(stdout)
        # Per customer whose balance changes, or whose lifetime earned points alone change (docs/replay.md).
        assert 0 < report["customers_changed"] <= report["applied"]["compensations_published"]

        wanted = new.balances()

        def converged() -> bool:
            status = run_cli(environment, "status")
            return sum(status["consumer_lag"].values()) == 0 and status["projection_backlog"] == 0

        wait_until(converged, 180, "the compensations to be applied and projected", interval_s=1.0)
        again = run_cli(environment, "replay", "--rules", str(NEW_RULES), "--dry-run")
        assert again["customers_changed"] == 0
        live = {row["customer_id"]: row["balance_before"] for row in again["customers"]}
        assert {customer: balance for customer, balance in live.items() if balance or customer in wanted} == {
            customer: balance for customer, balance in wanted.items() if balance or customer in live
        }
        second = run_cli(environment, "replay", "--rules", str(NEW_RULES), "--apply")
        assert second["applied"]["compensations_published"] == 0
    finally:
        if apply is not None and apply.poll() is None:
            apply.kill()
        stop_process(up)
        stop_process(worker)
        log.close()
