"""End to end on the real embedded broker and chDB: the stream worker and projector equal `loyalty process`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from schemas.topics import DEAD_LETTER, LEDGER
from streams.batch import process_lines
from streams.producer import produce_file
from streams.rules.ruleset import load_ruleset
from streams.simulate import write_events

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
PARTITIONS = 4
WAIT_S = 180


def read_topic(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 60.0):
    """Every record of a topic, read by manual assignment until `expected` records or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=2000,
    )
    try:
        consumer.assign([TopicPartition(topic, partition) for partition in range(partitions)])
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
        # Read on briefly: more records than expected would be a failure the assertion should see.
        records.extend(consumer)
        return records
    finally:
        consumer.close()


def run_cli(environment: dict[str, str], *arguments: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "streams.cli", *arguments, "--json"],
        env=environment,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture
def system(broker, tmp_path):
    """`loyalty up` against the fixture's broker, with its own data directory; always stopped."""
    data_dir = tmp_path / "data"
    environment = dict(
        os.environ,
        LOYALTY_KAFKA_BOOTSTRAP=broker.bootstrap,
        LOYALTY_DATA_DIR=str(data_dir),
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_HTTP_PORT="0",
        LOYALTY_SESSION_TIMEOUT_S="2",
        # The whole log is in the topics before the worker starts: release only by watermark / caught-up,
        # never by age, so that the order equals the batch driver's exactly.
        LOYALTY_REORDER_WAIT_MS="120000",
    )
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "up"],
            env=environment,
            cwd=REPOSITORY,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not (data_dir / "run.json").exists():
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "loyalty up did not start"
                time.sleep(0.2)
            yield {"environment": environment, "data_dir": data_dir, "process": process, "log": log_path}
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_stream_worker_and_projections_equal_the_batch_driver(broker, system, tmp_path):
    events_path = tmp_path / "events.jsonl"
    write_events(events_path, events=6000, customers=400, seed=11, duplicate_share=0.03, bad_share=0.01)
    expected = process_lines(events_path.open("rb"), load_ruleset())
    assert len(expected.rejected) == 60 and expected.duplicates > 100

    counts = produce_file(events_path, bootstrap=broker.bootstrap)
    assert sum(counts.values()) >= 6000

    environment = system["environment"]
    deadline = time.monotonic() + WAIT_S
    status = {}
    while time.monotonic() < deadline:
        status = run_cli(environment, "status")
        if (
            status["ledger_rows_projected"] >= len(expected.ledger)
            and status["events_rejected"] >= len(expected.rejected)
            and sum(status["consumer_lag"].values()) == 0
        ):
            break
        assert system["process"].poll() is None, system["log"].read_text()[-3000:]
        time.sleep(1)
    assert status["ledger_rows_projected"] == len(expected.ledger), (status, system["log"].read_text()[-3000:])
    assert status["events_rejected"] == len(expected.rejected)
    assert status["consumer_lag"] == {topic: 0 for topic in status["consumer_lag"]}

    # The ledger topic holds exactly the batch driver's entries (re-deliveries may repeat an entry id,
    # never change one).
    ledger_records = read_topic(broker.bootstrap, LEDGER, PARTITIONS, len(expected.ledger))
    streamed = {}
    for record in ledger_records:
        entry = json.loads(record.value)
        assert streamed.setdefault(entry["entry_id"], entry) == entry
    wanted = {entry.entry_id: entry.model_dump(mode="json") for entry in expected.ledger}
    if streamed != wanted:  # not `assert ==`: pytest's diff of two large dicts is quadratic
        differing = [key for key in set(streamed) & set(wanted) if streamed[key] != wanted[key]]
        pytest.fail(
            f"{len(set(wanted) - set(streamed))} entries missing, {len(set(streamed) - set(wanted))} extra, "
            f"{len(differing)} differ, e.g. {[(streamed[key], wanted[key]) for key in differing[:1]]}"
        )

    # The dead-letter topic holds exactly the bad lines, byte for byte, each with a reason.
    lines = events_path.read_bytes().splitlines()
    dead_records = read_topic(broker.bootstrap, DEAD_LETTER, PARTITIONS, len(expected.rejected))
    assert Counter(record.value for record in dead_records) == Counter(
        lines[rejection.line - 1] for rejection in expected.rejected
    )
    reasons = [dict(record.headers)["loyalty-reason"].decode() for record in dead_records]
    assert all(reasons) and len(reasons) == len(expected.rejected)

    # Balances and history through the running system's CLI.
    balances = expected.balances()
    heavy = max(balances, key=lambda customer: len([e for e in expected.ledger if e.customer_id == customer]))
    balance = run_cli(environment, "balance", heavy)
    assert balance["customer_id"] == heavy and balance["balance"] == balances[heavy]
    history = run_cli(environment, "history", heavy, "--limit", "1000")
    expected_history = [entry.model_dump(mode="json") for entry in expected.ledger if entry.customer_id == heavy]
    assert history["entries"] == expected_history[:1000]

    # Replay: the dry-run diff under another rule set equals the difference of two `loyalty process` runs.
    new_rules_path = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"
    expected_new = process_lines(events_path.open("rb"), load_ruleset(new_rules_path))
    deadline = time.monotonic() + WAIT_S
    while run_cli(environment, "status")["input_messages_archived"] < sum(counts.values()):
        assert time.monotonic() < deadline, "the archive did not catch up"
        time.sleep(1)
    # Two processes: the archive (more than one chunk of 5,000 messages) is decided in a pool started by `up`.
    report = run_cli(environment, "replay", "--rules", str(new_rules_path), "--dry-run", "--processes", "2")
    assert report["processes"] == 2
    new_balances = expected_new.balances()
    assert {row["customer_id"]: row["delta"] for row in report["customers"]} == {
        customer: new_balances.get(customer, 0) - balances.get(customer, 0)
        for customer in set(balances) | set(new_balances)
    }
    assert report["totals"]["after"]["outstanding"] == sum(new_balances.values())
    assert report["events_rejected"] == len(expected_new.rejected)
    # One customer's preview through the running system: their entries under the new rules, beside the live ones.
    preview = run_cli(environment, "replay", "--rules", str(new_rules_path), "--dry-run", "--customer", heavy)
    assert (preview["balance_before"], preview["balance_after"]) == (balances[heavy], new_balances[heavy])
    assert preview["entries_before"] == expected_history
    new_history = [entry.model_dump(mode="json") for entry in expected_new.ledger if entry.customer_id == heavy]
    assert preview["entries_after"] == new_history

    # Apply: compensating adjustments make every live balance equal the new rules' result; twice = once.
    applied = run_cli(environment, "replay", "--rules", str(new_rules_path), "--apply")
    # One per customer whose balance changes, and per customer whose lifetime earned points alone change (a refunded
    # order earns and reverses other amounts under the new rules: the balance stays, tiers by lifetime points move).
    assert 0 < report["customers_changed"] <= applied["applied"]["compensations_published"] <= len(report["customers"])
    # When the apply did each step after its markers (the worker holds events meanwhile), in that order.
    steps = applied["applied"]["after_markers_s"]
    order = ["worker_passed_markers", "compared", "compensations_built", "plan_published", "compensations_published"]
    assert list(steps) == order and 0 <= steps["worker_passed_markers"]
    assert [steps[step] for step in order] == sorted(steps[step] for step in order)
    # The running system values and reports by the rule set it now decides with.
    assert run_cli(environment, "status")["ruleset_version"] == load_ruleset(new_rules_path).version
    deadline = time.monotonic() + WAIT_S
    while run_cli(environment, "status")["ledger_rows_projected"] < len(expected.ledger) + report["customers_changed"]:
        assert time.monotonic() < deadline, "the compensations were not projected"
        time.sleep(1)
    again = run_cli(environment, "replay", "--rules", str(new_rules_path), "--dry-run")
    assert again["customers_changed"] == 0
    balances = new_balances

    # After the cut-over markers the live worker decides new events with the new rule set.
    late = tmp_path / "late.jsonl"
    late.write_text(
        json.dumps(
            {
                "event_id": "after-cutover-1",
                "event_type": "purchase.completed",
                "schema_version": 1,
                "occurred_at": "2026-12-01T12:00:00+00:00",
                "customer_id": heavy,
                "store_id": "s1",
                "order_id": "after-cutover-order",
                "currency": "USD",
                "lines": [{"sku": "sku-0001", "category": "books", "quantity": 2, "unit_price": "10.00"}],
            }
        )
        + "\n"
    )
    produce_file(late, bootstrap=broker.bootstrap)
    deadline = time.monotonic() + WAIT_S
    while True:
        offset = str(len(expected_history) - 5)
        entries = run_cli(environment, "history", heavy, "--limit", "1000", "--offset", offset)["entries"]
        latest = [entry for entry in entries if entry["caused_by"] == "after-cutover-1"]
        if latest or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert latest and {entry["ruleset_version"] for entry in latest} == {"seasonal-2026-q4"}
    # seasonal: sku-0001 earns 40 fixed points per unit
    assert [(entry["rule_id"], entry["points"]) for entry in latest][0] == ("purchase.product:sku-0001", 80)
    balances[heavy] = latest[-1]["balance_after"]

    # Every ClickHouse balance equals the batch driver's, read directly after the owner stopped.
    system["process"].send_signal(signal.SIGTERM)
    system["process"].wait(timeout=40)
    from projections.client import connect
    from projections.queries import balances as projected_balances

    client = connect(f"chdb://{(system['data_dir'] / 'clickhouse').resolve()}")
    try:
        assert projected_balances(client) == balances
    finally:
        client.close()
