"""Scale-out: two workers on eight partitions split the load; a worker joining and one leaving mid-run lose
and double nothing (issue 8's scale-out run, exact against the batch driver)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pipeline_checks import StreamingProducer
from reliability_support import REPOSITORY, TopicTail, stop_process, wait_until, worker_environment
from test_worker_crashes import assert_outputs_equal_the_batch_driver, wait_for_outputs

from schemas.topics import ALL_TOPICS, DEAD_LETTER, LEDGER
from streams.batch import process_lines
from streams.broker import ensure_topics
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PARTITIONS = 8


def assignments(log_text: str) -> list[list[int]]:
    return [
        [int(number) for number in found.split(",") if number.strip()]
        for found in re.findall(r"assigned input partitions \[([0-9, ]*)\]", log_text)
    ]


@pytest.mark.parametrize("leaving", ["first", "joiner"])
def test_a_joining_and_a_leaving_worker_on_eight_partitions_lose_and_double_nothing(broker, tmp_path, leaving):
    # "joiner": the partitions the first worker gave away come back to it, after the joiner changed their
    # customers; it must restore them again, not decide on the states it had before (it did, until 2026-11-23).
    lines = list(generate_events(events=12_000, customers=2_000, seed=4242, duplicate_share=0.02, bad_share=0.005))
    expected = process_lines(lines, load_ruleset())
    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    workers: list[subprocess.Popen] = []
    logs = []

    def start_worker() -> subprocess.Popen:
        log = (tmp_path / f"worker-{len(workers)}.log").open("wb")
        logs.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env={**worker_environment(broker.bootstrap), "LOYALTY_PARTITIONS": str(PARTITIONS)},
            cwd=REPOSITORY,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        process.log_path = tmp_path / f"worker-{len(workers)}.log"  # type: ignore[attr-defined]
        workers.append(process)
        return process

    tail = TopicTail(broker.bootstrap, (LEDGER, DEAD_LETTER), partitions=PARTITIONS)
    producer = StreamingProducer(broker.bootstrap, lines, chunk_lines=400, pause_s=1.0)
    try:
        first = start_worker()
        wait_until(lambda: tail.count(LEDGER) >= 2000, 120, "the first worker to process")
        second = start_worker()  # joins mid-run
        wait_until(
            lambda: any(len(found) == PARTITIONS // 2 for found in assignments(second.log_path.read_text())),
            120,
            "the joining worker to take half of the partitions",
        )
        split = [assignments(worker.log_path.read_text())[-1] for worker in (first, second)]
        assert sorted(split[0] + split[1]) == list(range(PARTITIONS)) and all(len(half) == 4 for half in split)
        mark = tail.count(LEDGER)
        wait_until(lambda: tail.count(LEDGER) >= mark + 2000, 120, "both workers to process")
        gone, survivor = (first, second) if leaving == "first" else (second, first)
        stop_process(gone)  # leaves mid-run, gracefully
        wait_for_outputs(tail, expected, survivor, timeout_s=240)
        assert producer.done.is_set() and producer.error is None
        assert_outputs_equal_the_batch_driver(tail, lines, expected)
        assert assignments(survivor.log_path.read_text())[-1] == list(range(PARTITIONS))
    finally:
        producer.close()
        tail.close()
        for worker in workers:
            stop_process(worker)
        for log in logs:
            log.close()
