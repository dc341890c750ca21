"""Shared pytest fixtures: free loopback ports and embedded brokers that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.broker import free_port as _free_port


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests bind only to loopback)."""
    return _free_port()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedBroker]]:
    """Start embedded brokers on demand (keyword arguments go to EmbeddedBroker); all are stopped at teardown.

    For tests that need more than one broker, or to restart one; each broker logs to tmp_path so a
    failing test leaves the broker's output next to its other files.
    """
    started: list[EmbeddedBroker] = []

    def start(**options: object) -> EmbeddedBroker:
        options.setdefault("log_path", tmp_path / f"broker-{len(started)}.log")
        broker = EmbeddedBroker(**options)  # type: ignore[arg-type]
        started.append(broker)
        return broker.start()

    try:
        yield start
    finally:
        for broker in reversed(started):
            broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., EmbeddedBroker]) -> EmbeddedBroker:
    """A running embedded broker on a free loopback port, empty, stopped after the test even if it fails."""
    return broker_factory()
