"""A ClickHouse server unreachable for 30 s: `loyalty up` starts anyway, backs off, retries and loses nothing.

`loyalty up` (worker + projector + API) runs with a server DSN, `http://loyalty:<password>@127.0.0.1:<port>`,
on a port where nothing listens, while a simulated log streams in. After the outage the test starts, on
that port, a ClickHouse HTTP front for chDB (`chdb_http_front.py`: a test double of the ClickHouse HTTP
protocol backed by the real ClickHouse engine, not a ClickHouse server). The outage lasts
`LOYALTY_RELIABILITY_CLICKHOUSE_OUTAGE_S` seconds (default 30).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path
from urllib.parse import quote

import pytest
from pipeline_checks import StreamingProducer, run_cli
from reliability_support import PARTITIONS, REPOSITORY, stop_process, wait_until, worker_environment

from projections import LedgerSink, connect, migrate, queries
from projections.client import ClickHouseUnavailable, ReconnectingClient, redact
from schemas.topics import ALL_TOPICS
from streams.batch import process_lines
from streams.broker import ensure_topics, free_port
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OUTAGE_S = float(os.environ.get("LOYALTY_RELIABILITY_CLICKHOUSE_OUTAGE_S", "30"))
FRONT = Path(__file__).resolve().parent / "chdb_http_front.py"
USER = "loyalty"
# URL-reserved characters on purpose: the DSN carries it percent-encoded, the logs must carry it in no form.
PASSWORD = "pw-outage/7@x:y"


def dsn(port: int, database: str) -> str:
    return f"http://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/{database}?compress=false"


def api_get(data_dir: Path, path: str) -> tuple[int, dict]:
    run = json.loads((data_dir / "run.json").read_text())
    request = urllib.request.Request(run["url"] + path, headers={"Authorization": f"Bearer {run['token']}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def dashboard_figures(client, first: date, last: date, point_value) -> dict:
    """Every dashboard section over the log's whole range, as plain tuples."""
    figures: dict = {}
    for granularity in ("day", "week", "month"):
        status = queries.points_status(client, first, last, granularity)
        figures[("status", granularity)] = (status.periods, status.totals)
    for by in ("source", "rule", "product", "category"):
        figures[("sources", by)] = queries.point_sources(client, first, last, by)
    figures["top"] = queries.top_earners(client, first, last, 100)
    figures["liability"] = queries.liability(client, first, last, point_value)
    return figures


def test_an_unreachable_server_is_reported_by_host_and_port_never_with_the_password():
    port = free_port()
    client = ReconnectingClient(dsn(port, "loyalty"), retry_interval_s=60.0)
    for _ in range(2):  # the second call fails fast: one connection attempt per retry interval
        with pytest.raises(ClickHouseUnavailable) as raised:
            client.query("SELECT 1")
        message = str(raised.value)
        assert message == client.last_error and not client.connected
        assert f"http://127.0.0.1:{port}/loyalty" in message and "refused" in message.lower(), message
        assert PASSWORD not in message and quote(PASSWORD, safe="") not in message, message
    assert (
        redact(f"GET {dsn(port, 'x')} failed", dsn(port, "x"))
        == f"GET http://***@127.0.0.1:{port}/x?compress=false failed"
    )


def test_clickhouse_server_unreachable_at_start_then_back_loses_nothing(broker, tmp_path):
    ensure_topics(broker.bootstrap, ALL_TOPICS, PARTITIONS)
    ruleset = load_ruleset()
    lines = list(generate_events(events=3000, customers=300, seed=909, duplicate_share=0.02, bad_share=0.005, stores=2))
    expected = process_lines(lines, ruleset)
    port = free_port()
    data_dir = tmp_path / "data"
    environment = worker_environment(
        broker.bootstrap,
        LOYALTY_DATA_DIR=str(data_dir),
        LOYALTY_HTTP_PORT="0",
        LOYALTY_CLICKHOUSE_DSN=dsn(port, "loyalty"),
    )
    up_log_path, front_log_path = tmp_path / "up.log", tmp_path / "front.log"
    up_log, front_log = up_log_path.open("wb"), front_log_path.open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "up"],
        env=environment,
        cwd=REPOSITORY,
        stdout=up_log,
        stderr=subprocess.STDOUT,
    )
    front: subprocess.Popen | None = None
    producer: StreamingProducer | None = None
    try:
        wait_until(lambda: (data_dir / "run.json").exists() or up.poll() is not None, 60, "loyalty up to start")
        assert up.poll() is None, f"loyalty up exited with ClickHouse unreachable:\n{up_log_path.read_text()[-3000:]}"
        outage_started = time.monotonic()
        producer = StreamingProducer(broker.bootstrap, lines, chunk_lines=500, pause_s=1.0)

        # ClickHouse down: the worker keeps going, the ledger waits in Kafka, the status shows it and why.
        backlogs: list[int] = []
        status: dict = {}
        while time.monotonic() - outage_started < OUTAGE_S:
            status = run_cli(environment, "status")
            backlogs.append(status["projection_backlog"])
            assert up.poll() is None, up_log_path.read_text()[-3000:]
            time.sleep(1.0)
        assert producer.error is None, producer.error
        assert status["events_processed"] > 0 and status["worker_running"], status
        assert status["ledger_rows_projected"] is None, status
        # Nothing could be projected: the backlog is the whole ledger written so far, and it grew.
        assert status["projection_backlog"] == status["ledger_entries_emitted"] > 0, status
        assert backlogs[-1] > min(backlogs), f"the backlog never grew: {backlogs}"
        for field in ("clickhouse_error", "projection_error"):
            error = status[field] or ""
            assert f"127.0.0.1:{port}" in error and "refused" in error.lower(), (field, status)
        code, answer = api_get(data_dir, f"/api/customers/{expected.ledger[0].customer_id}/balance")
        assert code == 503 and "unavailable" in answer["error"], (code, answer)

        # ClickHouse comes up on that port: the projector's next retry connects, migrates and catches up.
        front = subprocess.Popen(
            [sys.executable, str(FRONT), "--data-dir", str(tmp_path / "clickhouse"), "--port", str(port)]
            + ["--user", USER],
            env=dict(os.environ, CHDB_HTTP_FRONT_PASSWORD=PASSWORD),
            cwd=REPOSITORY,
            stdout=front_log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: listening(port) or front.poll() is not None, 60, "the chDB HTTP front to listen")
        assert front.poll() is None, front_log_path.read_text()[-3000:]
        back_at = time.monotonic()
        wait_until(lambda: producer.done.is_set(), 120, "the log to be produced")
        assert producer.error is None, producer.error

        def caught_up() -> bool:
            status.update(run_cli(environment, "status"))
            assert up.poll() is None, up_log_path.read_text()[-3000:]
            return (
                status["ledger_rows_projected"] == len(expected.ledger)
                and status["projection_backlog"] == 0
                and status["input_messages_archived"] >= producer.messages
                and sum(status["consumer_lag"].values()) == 0
            )

        wait_until(caught_up, 120, "the ledger to be projected after the outage", interval_s=1.0)
        assert status["clickhouse_error"] is None and status["projection_error"] is None, status
        print(
            f"outage {OUTAGE_S:.0f}s; projected {len(expected.ledger)} entries {time.monotonic() - back_at:.1f}s after"
        )
        code, answer = api_get(data_dir, f"/api/customers/{expected.ledger[0].customer_id}/balance")
        assert code == 200 and answer["balance"] == expected.balances()[expected.ledger[0].customer_id], answer

        # Every number in ClickHouse equals `loyalty process` on the same log.
        client = connect(dsn(port, "loyalty"))
        reference = connect(dsn(port, "reference"))
        try:
            rows = client.query("SELECT entry_id, customer_id, caused_by, rule_id, points FROM ledger_entries FINAL")
            projected = {row[0]: row[1:] for row in rows.result_rows}
            wanted_entries = {e.entry_id: (e.customer_id, e.caused_by, e.rule_id, e.points) for e in expected.ledger}
            if projected.keys() != wanted_entries.keys():
                missing = sorted(set(wanted_entries) - set(projected))
                extra = sorted(set(projected) - set(wanted_entries))
                pytest.fail(
                    f"{len(missing)} entries missing, e.g. {[wanted_entries[key] for key in missing[:4]]}; "
                    f"{len(extra)} extra, e.g. {[projected[key] for key in extra[:4]]}"
                )
            balances, wanted = queries.balances(client), expected.balances()
            if balances != wanted:
                differing = sorted(c for c in set(balances) | set(wanted) if balances.get(c) != wanted.get(c))
                examples = [(customer, balances.get(customer), wanted.get(customer)) for customer in differing[:3]]
                pytest.fail(f"{len(differing)} balances differ (customer, ClickHouse, batch), e.g. {examples}")
            # The dashboard of the streamed projection equals that of the batch ledger written directly.
            migrate(reference)
            LedgerSink(reference).write(expected.ledger)
            days = sorted(entry.occurred_at.date() for entry in expected.ledger)
            point_value = ruleset.redemption.point_value
            streamed = dashboard_figures(client, days[0], days[-1], point_value)
            batch = dashboard_figures(reference, days[0], days[-1], point_value)
            differing = [key for key in batch if streamed[key] != batch[key]]
            if differing:
                pytest.fail(f"dashboard sections differ from the batch ledger's: {differing}")
        finally:
            client.close()
            reference.close()
    finally:
        if producer is not None:
            producer.close()
        stop_process(up, timeout_s=40)
        if front is not None:
            stop_process(front)
        up_log.close()
        front_log.close()
    logged = up_log_path.read_text()
    for secret in (PASSWORD, quote(PASSWORD, safe="")):
        assert secret not in logged, "the ClickHouse password appeared in the log of loyalty up"
    assert "retrying" in logged and "reachable again" in logged
