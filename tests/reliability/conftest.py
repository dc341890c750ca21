"""Fixtures for the reliability tests: stream workers that can be killed, and a live reader of the output topics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import (  # noqa: F401  (re-exported for tests that still import from conftest)
    PARTITIONS,
    REPOSITORY,
    TopicTail,
    stop_process,
    wait_until,
    worker_environment,
)


@pytest.fixture
def worker_factory(broker, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Start `python -m streams.cli worker` processes against the broker fixture; all stopped at teardown."""
    started: list[subprocess.Popen] = []
    logs = []

    def start() -> subprocess.Popen:
        # Create the topics before anything is produced: Tansu creates a missing topic on the first produce
        # with its own partition count, which would race the worker's ensure_topics at start.
        from schemas.topics import ALL_TOPICS
        from streams.broker import ensure_topics

        ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")
        logs.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=worker_environment(broker.bootstrap),
            cwd=REPOSITORY,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        process.log_path = Path(log.name)  # type: ignore[attr-defined]
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


@pytest.fixture
def topic_tail_factory() -> Iterator[Callable[..., TopicTail]]:
    tails: list[TopicTail] = []

    def start(bootstrap: str, *topics: str) -> TopicTail:
        tail = TopicTail(bootstrap, topics)
        tails.append(tail)
        return tail

    try:
        yield start
    finally:
        for tail in tails:
            tail.close()
