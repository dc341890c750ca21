"""Prometheus metrics of the worker and the projector, and the /metrics endpoint that exports them.

The metrics live in the process-wide default registry of prometheus-client. The worker and the projector
only call the `record_*` functions (plumbing stays out of their logic); `start_metrics_server` serves
`/metrics` on `LOYALTY_METRICS_PORT` (0: no endpoint). Label values are bounded sets: topics, ledger kinds
and reject categories (the field of the event the reason names, never the reason's free text), so a flood
of bad input cannot create unbounded time series.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from schemas import events as event_models
from schemas.topics import INPUT_TOPICS
from streams.settings import Settings

log = logging.getLogger("loyalty.metrics")

__all__ = [
    "reason_category",
    "record_consumer_lag",
    "record_output",
    "record_ruleset",
    "record_sink_backlog",
    "record_sink_batch",
    "record_sink_failure",
    "start_metrics_server",
]

lag_interval_s = 1.0
sink_batch_seconds_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

worker_events = Counter(
    "loyalty_worker_events",
    "Input messages the worker finished (applied, duplicate or rejected), by input topic; rate() is events/s.",
    ["topic"],
)
worker_events_rejected = Counter(
    "loyalty_worker_events_rejected",
    "Input messages dead-lettered, by reason category (the field the reason names, or json/payload_size/...).",
    ["reason"],
)
worker_events_duplicate = Counter(
    "loyalty_worker_events_duplicate", "Re-delivered or re-sent events recognised and applied only once."
)
worker_ledger_entries = Counter(
    "loyalty_worker_ledger_entries", "Ledger entries the worker wrote to loyalty.ledger, by kind.", ["kind"]
)
worker_consumer_lag = Gauge(
    "loyalty_worker_consumer_lag",
    "Messages on this worker's assigned partitions not yet fetched (high water mark - next offset), by topic.",
    ["topic"],
)
worker_events_waiting = Gauge(
    "loyalty_worker_events_waiting", "Decoded events held in the event-time reorder buffer, not yet applied."
)
worker_events_held_for_apply = Gauge(
    "loyalty_worker_events_held_for_apply",
    "Events after a `loyalty replay --apply` cut-over held until the apply's compensations are applied "
    "(LOYALTY_CUTOVER_HOLD_S at most).",
)
worker_events_late = Gauge(
    "loyalty_worker_events_late",
    "Events applied out of event-time order: their customer already had a later event applied (they arrived "
    "after the settle or the reorder wait) that wrote entries or were rejected. Re-deliveries do not count. "
    "Since start.",
)
worker_reorder_settle_ms = Gauge(
    "loyalty_worker_reorder_settle_ms",
    "The reorder buffer's settle: how long after an event's arrival a fetch must find a partition caught up "
    "(the floor, raised by the skew measured between the input topics).",
)
worker_ruleset = Info("loyalty_worker_ruleset", "The rule set this worker applies.")

sink_batch_seconds = Histogram(
    "loyalty_projector_sink_batch_seconds",
    "Time to land one ledger batch in ClickHouse, retries included.",
    buckets=sink_batch_seconds_buckets,
)
sink_rows = Counter("loyalty_projector_sink_rows", "Ledger rows the projector inserted into ClickHouse.")
sink_failures = Counter("loyalty_projector_sink_failures", "Failed ClickHouse inserts (each is retried).")
sink_backlog = Gauge("loyalty_projector_sink_backlog", "Ledger messages in Kafka not yet projected into ClickHouse.")

# Top-level field names of every event model: the only field names that may become a label value.
_known_fields: frozenset[str] = frozenset(
    name
    for model in vars(event_models).values()
    if isinstance(model, type) and hasattr(model, "model_fields")
    for name in model.model_fields
)


def reason_category(reason: str) -> str:
    """A bounded label for a rejection reason: the top-level field it names, or the kind of problem."""
    if reason.startswith("not valid JSON"):
        return "json"
    if reason.startswith("payload of"):
        return "payload_size"
    if reason.startswith("the event must be a JSON object"):
        return "not_an_object"
    field, separator, problem = reason.partition(": ")
    if not separator:
        return "other"
    if problem.startswith("conflict"):
        return "conflict"
    if problem == "unknown field":
        return "unknown_field"
    top_level = field.split(".", 1)[0]
    return top_level if top_level in _known_fields else "other"


def record_output(output) -> None:
    """Count what one `StreamApplier` release produced, after the broker acknowledged it (streams.applier.Output)."""
    for topic, count in Tally(message.topic for message in output.acks).items():
        worker_events.labels(topic=topic).inc(count)
    for dead in output.dead_letters:
        worker_events_rejected.labels(reason=reason_category(dead.reason)).inc()
    for kind, count in Tally(entry.kind.value for _, entry, _ in output.ledger).items():
        worker_ledger_entries.labels(kind=kind).inc(count)
    if output.duplicates:
        worker_events_duplicate.inc(output.duplicates)


def record_consumer_lag(
    assigned: Iterable[tuple[str, int]],
    highwater: Callable[[str, int], int | None],
    seen_offsets: Mapping[tuple[str, int], int],
    waiting: int,
    late: int = 0,
    settle_ms: float = 0.0,
    held_for_apply: int = 0,
) -> None:
    """Set the lag gauge of every input topic (0 for topics with no assigned partition), and the reorder
    buffer's gauges."""
    lag = dict.fromkeys(INPUT_TOPICS, 0)
    for topic, partition in assigned:
        try:
            end = highwater(topic, partition)
        except Exception:  # no fetch response for this partition yet
            continue
        if end is not None:
            lag[topic] = lag.get(topic, 0) + max(0, end - seen_offsets.get((topic, partition), -1) - 1)
    for topic, value in lag.items():
        worker_consumer_lag.labels(topic=topic).set(value)
    worker_events_waiting.set(waiting)
    worker_events_late.set(late)
    worker_events_held_for_apply.set(held_for_apply)
    worker_reorder_settle_ms.set(settle_ms)


def record_ruleset(version: str) -> None:
    worker_ruleset.info({"version": version})


def record_sink_batch(rows: int, seconds: float) -> None:
    sink_batch_seconds.observe(seconds)
    sink_rows.inc(rows)


def record_sink_failure() -> None:
    sink_failures.inc()


def record_sink_backlog(backlog: int) -> None:
    sink_backlog.set(backlog)


def start_metrics_server(settings: Settings) -> int | None:
    """Serve /metrics on `settings.metrics_host:metrics_port` in a daemon thread; returns the port, or None if off."""
    if not settings.metrics_port:
        return None
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return settings.metrics_port
