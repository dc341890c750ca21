"""The worker's Prometheus endpoint, scraped from a running `loyalty worker` on the embedded broker.

The counters must equal what the batch driver (`streams.batch.process_lines`) says about the same file:
input messages per topic, rejects per reason category, ledger entries per kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.topics import ALL_TOPICS, INPUT_TOPICS
from streams.batch import process_lines
from streams.broker import ensure_topics, free_port
from streams.metrics import reason_category
from streams.producer import produce_file
from streams.rules.ruleset import load_ruleset
from streams.simulate import write_events

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
PARTITIONS = 2
WAIT_S = 120.0
BAD_LINES = (
    "this line is not JSON",
    '{"event_id": "bad-purchase-1", "event_type": "purchase.completed", "schema_version": 1, '
    '"occurred_at": "2025-03-01T10:00:00+00:00", "customer_id": "c-bad", "store_id": "s1", "currency": "EUR"}',
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_label(samples: Samples, name: str, label: str, *, zeros: bool = False) -> dict[str, int]:
    return {
        dict(labels)[label]: int(value)
        for (sample, labels), value in samples.items()
        if sample == name and (value or zeros) and label in dict(labels)
    }


def worker_environment(bootstrap: str, metrics_port: int) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LOYALTY_")}
    environment.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
        LOYALTY_KAFKA_BOOTSTRAP=bootstrap,
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_METRICS_PORT=str(metrics_port),
        LOYALTY_SESSION_TIMEOUT_S="2",
        # Everything is in the topics before the worker starts: release by watermark / caught-up only, so the
        # ledger equals the batch driver's exactly.
        LOYALTY_REORDER_WAIT_MS="120000",
    )
    return environment


def test_topic_creation_job_creates_every_topic_with_the_configured_partitions(broker) -> None:
    environment = worker_environment(broker.bootstrap, 0)
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "deploy" / "create_topics.py")],
        env={**environment, "LOYALTY_PARTITIONS": "3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(completed.stdout.splitlines()) == sorted(f"{topic}: 3 partitions" for topic in ALL_TOPICS)
    again = subprocess.run(
        [sys.executable, str(REPOSITORY / "deploy" / "create_topics.py")],
        env={**environment, "LOYALTY_PARTITIONS": "5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert "different partition count" in again.stderr


def test_worker_metrics_count_events_rejects_and_ledger_entries_exactly(broker, tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    write_events(events_file, events=400, customers=25, seed=11, duplicate_share=0.05)
    with events_file.open("a", encoding="utf-8") as events:
        events.write("\n".join(BAD_LINES) + "\n")
    expected = process_lines(events_file.read_bytes().splitlines(), load_ruleset(None))
    expected_rejects = Counter(reason_category(rejection.reason) for rejection in expected.rejected)
    expected_kinds = Counter(entry.kind.value for entry in expected.ledger)
    assert expected_rejects["json"] == 1 and sum(expected_rejects.values()) == len(BAD_LINES)

    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    produced = produce_file(events_file, bootstrap=broker.bootstrap)
    assert produced["loyalty.referrals"] > 0 and sum(produced.values()) > 400

    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=worker_environment(broker.bootstrap, metrics_port),
            cwd=tmp_path,  # Faust writes its <app id>-data directory here
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            samples: Samples = {}
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                assert worker.poll() is None, log_path.read_text()[-4000:]
                try:
                    samples = scrape(url)
                except OSError:
                    samples = {}
                processed = by_label(samples, "loyalty_worker_events_total", "topic")
                lag = by_label(samples, "loyalty_worker_consumer_lag", "topic", zeros=True)
                if processed == produced and lag == dict.fromkeys(INPUT_TOPICS, 0):
                    break
                time.sleep(0.5)
            assert by_label(samples, "loyalty_worker_events_total", "topic") == produced, log_path.read_text()[-4000:]
            assert by_label(samples, "loyalty_worker_events_rejected_total", "reason") == dict(expected_rejects)
            assert by_label(samples, "loyalty_worker_ledger_entries_total", "kind") == dict(expected_kinds)
            assert samples[("loyalty_worker_events_duplicate_total", ())] == expected.duplicates
            lag = by_label(samples, "loyalty_worker_consumer_lag", "topic", zeros=True)
            assert lag == dict.fromkeys(INPUT_TOPICS, 0)
            assert samples[("loyalty_worker_events_waiting", ())] == 0
            version = load_ruleset(None).version
            assert samples[("loyalty_worker_ruleset_info", (("version", version),))] == 1

            health = subprocess.run(
                [sys.executable, str(REPOSITORY / "deploy" / "healthcheck.py"), url], capture_output=True, timeout=30
            )
            assert health.returncode == 0, health.stderr
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    dead_port = subprocess.run(
        [sys.executable, str(REPOSITORY / "deploy" / "healthcheck.py"), url], capture_output=True, timeout=30
    )
    assert dead_port.returncode == 1


def test_reject_reasons_become_a_bounded_set_of_categories() -> None:
    assert reason_category("not valid JSON (expected value at line 1 column 1)") == "json"
    assert reason_category("payload of 70000 bytes exceeds the limit of 65536 bytes") == "payload_size"
    assert reason_category("lines.0.quantity: Input should be greater than 0") == "lines"
    assert reason_category("order_id: Field required") == "order_id"
    assert reason_category("event_id: conflict: event id e1 was already applied with different content") == "conflict"
    # Producer-controlled names never become label values.
    assert reason_category("x-attacker-field-1234: unknown field") == "unknown_field"
    assert reason_category("x-attacker-field-1234: Field required") == "other"
    assert reason_category("something unexpected") == "other"


def test_consumer_lag_is_the_distance_to_the_high_water_mark_per_topic() -> None:
    from streams import metrics

    highwaters = {("loyalty.purchases", 0): 100, ("loyalty.purchases", 1): 50, ("loyalty.reviews", 0): 7}

    def highwater(topic: str, partition: int) -> int | None:
        if (topic, partition) not in highwaters:
            raise KeyError((topic, partition))  # no fetch yet: the partition is skipped
        return highwaters[(topic, partition)]

    assigned = [*highwaters, ("loyalty.engagement", 0)]
    seen = {("loyalty.purchases", 0): 89, ("loyalty.reviews", 0): 6}
    metrics.record_consumer_lag(assigned, highwater, seen, waiting=3)
    samples = {
        (sample.labels.get("topic"), sample.name): sample.value
        for family in metrics.worker_consumer_lag.collect() + metrics.worker_events_waiting.collect()
        for sample in family.samples
    }
    assert samples[("loyalty.purchases", "loyalty_worker_consumer_lag")] == 10 + 50
    assert samples[("loyalty.reviews", "loyalty_worker_consumer_lag")] == 0
    assert samples[("loyalty.engagement", "loyalty_worker_consumer_lag")] == 0
    assert samples[("loyalty.redemptions", "loyalty_worker_consumer_lag")] == 0
    assert samples[(None, "loyalty_worker_events_waiting")] == 3
