"""The one settings object: the only place that reads the environment (LOYALTY_* variables)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The most processes a replay may use (`LOYALTY_REPLAY_PROCESSES`, `loyalty replay --processes`).
replay_processes_max = 64


class Settings(BaseSettings):
    """Every option of the engine. Each field is read from the environment variable `LOYALTY_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore", frozen=True)

    kafka_bootstrap: str | None = Field(
        None,
        description="Kafka bootstrap servers, e.g. kafka:9092. Unset: `loyalty up` starts the embedded broker.",
    )
    clickhouse_dsn: str | None = Field(
        None,
        description="ClickHouse DSN, e.g. http://user:pass@host:8123/loyalty. Unset: chdb://<data_dir>/clickhouse.",
    )
    data_dir: Path = Field(Path(".loyalty"), description="Directory for the embedded chDB database and run files.")
    rules: Path | None = Field(None, description="Rule set YAML file. Unset: the packaged default rule set.")
    partitions: int = Field(4, ge=1, le=1024, description="Partition count of every topic the engine creates.")
    worker_id: str = Field("loyalty-worker", description="Faust application id (the consumer group).")
    http_host: str = Field("127.0.0.1", description="Address the status/API server binds to.")
    http_port: int = Field(8787, ge=0, le=65535, description="Port of the status/API server (0 picks a free one).")
    api_token: SecretStr | None = Field(None, description="Bearer token for the admin API. Unset: generated at start.")
    broker_port: int = Field(0, ge=0, le=65535, description="Port of the embedded broker (0 picks a free one).")
    batch_size_max: int = Field(2000, ge=1, le=100_000, description="Events the worker takes per batch.")
    batch_wait_ms: int = Field(100, ge=1, le=60_000, description="How long the worker waits to fill a batch.")
    session_timeout_s: float = Field(
        6.0, ge=1.0, le=300.0, description="Consumer group session timeout; a dead worker's partitions move after it."
    )
    reorder_wait_ms: int = Field(
        2000, ge=0, le=600_000, description="How long events may wait to be applied in event-time order."
    )
    reorder_settle_ms: int = Field(
        300,
        ge=0,
        le=600_000,
        description="Least time an event is held before input partitions found caught up stop holding it back; "
        "raised by the skew measured between the input topics, never above reorder_wait_ms.",
    )
    cutover_hold_s: float = Field(
        900.0,
        ge=0.0,
        le=86_400.0,
        description="After a `loyalty replay --apply` cut-over, how long the worker holds a partition's new events "
        "for the apply's compensations, which they must be decided after, with no sign of the apply: counted from the "
        "first held event and again from each part of its plan or compensation (0: not at all; then it releases them).",
    )
    sink_batch_rows_max: int = Field(20_000, ge=1, description="Ledger rows per ClickHouse insert.")
    sink_flush_interval_ms: int = Field(500, ge=10, description="Longest a ledger row waits before insert.")
    stop_drain_s: float = Field(
        30.0,
        ge=0.0,
        le=3600.0,
        description="With the embedded broker, how long a stopping `loyalty up` (its worker stopped) goes on "
        "archiving and projecting what is left in the topics, whose log dies with it (0: not at all).",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    metrics_host: str = Field("127.0.0.1", description="Address the Prometheus /metrics endpoint binds to.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint (0: no endpoint; 9108 in compose)."
    )
    run_worker: bool = Field(
        True, description="`loyalty up` also runs a worker child; false when workers run as their own service."
    )
    replay_processes: int = Field(
        0,
        ge=0,
        le=replay_processes_max,
        description="Processes `loyalty replay` decides customers in (0: one per CPU); the result is the same.",
    )
    topic_replication_factor: int = Field(
        1, ge=1, le=16, description="Replication factor of the topics created by the topic-creation job."
    )

    def resolved_replay_processes(self) -> int:
        if self.replay_processes:
            return self.replay_processes
        # The CPUs this process may run on (a container's cpuset), not every CPU of the host.
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(usable, replay_processes_max))

    def resolved_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (command-line options) on top."""
    return Settings(**{key: value for key, value in overrides.items() if value is not None})
