"""`loyalty replay --apply` while events keep arriving: the compensations cover exactly what lies before the cut-over
markers, on both sides of the comparison.

An apply used to compare the whole archive replayed under the new rules with the whole live ledger at one moment.
Events after the markers, already decided by the new rules, were on one side only whenever the projector had
archived them and not projected their entries yet (or the other way round): a customer whose history lay all after
the markers was credited a second time, another was left short.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import yaml
from test_embedded_restart import REPOSITORY, WAIT_S, _environment, _Up, _wait_for
from test_pipeline import run_cli

from projections.client import connect
from projections.queries import balances as projected_balances
from streams.batch import process_lines
from streams.producer import make_producer, produce_lines
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

NEW_RULES = REPOSITORY / "streams/rules/rulesets/seasonal-promotion.yaml"


def _new_customers(count: int, after: datetime) -> list[str]:
    """Registrations and first purchases of customers the history does not know, after its last event: what they
    earn does not depend on anything before the markers, so the live result must equal the batch driver's."""
    lines = []
    for number in range(count):
        moment = after + timedelta(seconds=2 * number + 1)
        customer = f"new{number:04d}"
        envelope = {"schema_version": 1, "customer_id": customer, "store_id": "s1"}
        lines.append(
            json.dumps(
                {
                    **envelope,
                    "event_id": f"reg-{customer}",
                    "event_type": "customer.registered",
                    "occurred_at": moment.isoformat(),
                }
            )
        )
        lines.append(
            json.dumps(
                {
                    **envelope,
                    "event_id": f"buy-{customer}",
                    "event_type": "purchase.completed",
                    "occurred_at": (moment + timedelta(seconds=1)).isoformat(),
                    "order_id": f"order-{customer}",
                    "currency": "USD",
                    "lines": [
                        {
                            "sku": f"sku-{number % 7:04d}",
                            "category": ("books", "electronics")[number % 2],
                            "quantity": 1 + number % 3,
                            "unit_price": f"{10 + number % 90}.50",
                        }
                    ],
                }
            )
        )
    return lines


def _settled_and_replayed(environment: dict[str, str], inputs: int, up, rules=NEW_RULES) -> None:
    """Wait until at least `inputs` input messages are decided and every entry is projected once; then a dry-run of
    the applied rules must change no customer."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status = run_cli(environment, "status")
        if (
            status["events_processed"] == status["input_messages"]
            and status["events_processed"] >= inputs
            and status["projection_backlog"] == 0
            and status["ledger_entries_emitted"] == status["ledger_rows_projected"]
        ):
            break
        assert up.process.poll() is None, up.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not caught up: {status}"
        time.sleep(1)
    again = run_cli(environment, "replay", "--rules", str(rules), "--dry-run")
    assert again["customers_changed"] == 0, [row for row in again["customers"] if row["delta"]][:5]


def test_an_apply_while_events_keep_arriving_compensates_exactly_what_lies_before_its_markers(tmp_path):
    history = list(generate_events(events=800, customers=50, seed=37))
    last = max(datetime.fromisoformat(json.loads(line)["occurred_at"]) for line in history)
    arriving = _new_customers(1000, last)  # 2,000 events: about 50 s at the pace below, cut when the apply is done
    arrived = _apply_during_traffic(tmp_path, history, arriving, NEW_RULES, wait_s=1.5)

    # Live balances are the new rules' over the whole log, customer by customer (read after the owner stopped).
    expected = process_lines([line.encode() for line in history + arrived], load_ruleset(NEW_RULES))
    client = connect(f"chdb://{(tmp_path / 'data' / 'clickhouse').resolve()}")
    try:
        assert projected_balances(client) == expected.balances()
    finally:
        client.close()


def _apply_during_traffic(tmp_path, history: list[str], arriving: list[str], rules, *, wait_s: float) -> list[str]:
    """`loyalty up` decides `history`; then `arriving` is produced steadily, and `wait_s` into it the rules are
    applied. The traffic stops when the apply returns; once every event and compensation is decided and projected,
    a dry-run of the rules must change no customer. Returns the arriving lines that were sent."""
    expected_before = process_lines([line.encode() for line in history], load_ruleset())
    environment = _environment(tmp_path / "data")
    up = _Up(environment, tmp_path / "up.log")
    stop_producing, sent = threading.Event(), []
    producer_thread: threading.Thread | None = None
    try:
        (tmp_path / "history.jsonl").write_text("".join(line + "\n" for line in history))
        produced = sum(run_cli(environment, "produce", str(tmp_path / "history.jsonl")).values())
        _wait_for(environment, produced, len(expected_before.ledger), up)
        producer_thread = _produce_steadily(tmp_path, arriving, stop_producing, sent)
        time.sleep(wait_s)
        sent_before_apply = sum(sent)
        applied = run_cli(environment, "replay", "--rules", str(rules), "--apply")
        sent_during_apply = sum(sent) - sent_before_apply
        still_arriving = producer_thread.is_alive()
        stop_producing.set()
        producer_thread.join(timeout=60)
        assert sent_before_apply > 0 and sent_during_apply > 0 and still_arriving, "the apply ran outside the traffic"
        arrived = arriving[: sum(sent)]
        compensations = applied["applied"]["compensations_published"]
        assert compensations > 0

        # Every event and every compensation decided and projected, then a replay agrees with the live balances.
        _settled_and_replayed(environment, produced + len(arrived) + compensations, up, rules)
    finally:
        stop_producing.set()
        if producer_thread is not None:
            producer_thread.join(timeout=60)
        up.stop()
    return arrived


def _produce_steadily(tmp_path, lines: list[str], stop: threading.Event, sent: list[int]) -> threading.Thread:
    """A thread producing `lines`, 4 every 0.1 s (about 40 events a second), until they are out or `stop` is set;
    `sent` gets the size of each group sent."""
    bootstrap = json.loads((tmp_path / "data" / "run.json").read_text())["kafka_bootstrap"]

    def produce() -> None:
        producer = make_producer(bootstrap)
        try:
            for start in range(0, len(lines), 4):
                if stop.is_set():
                    break
                produce_lines(producer, [line.encode() for line in lines[start : start + 4]])
                sent.append(len(lines[start : start + 4]))
                time.sleep(0.1)
        finally:
            producer.close()

    thread = threading.Thread(target=produce, name="arriving-events")
    thread.start()
    return thread


def test_events_of_known_customers_during_an_apply_are_decided_after_its_compensation(tmp_path):
    """While the apply replays, refunds and ticks of the history's customers keep arriving. The worker holds what comes
    after the markers until the compensations are applied (it logs it per partition), so each is decided on the new
    rules' state: the live balances, available and pending, and the expired points equal `loyalty process` under the
    new rules over the whole log. Before (as with `LOYALTY_CUTOVER_HOLD_S=0`), a tick among them expired the old rules'
    lots and a refund reversed the old rules' award, and the compensation, computed from the history before the
    markers, did not correct that: a dry-run afterwards found 32 customers changed (2026-11-28)."""
    document = yaml.safe_load(NEW_RULES.read_text())
    document["version"] += "-held"
    document["expiry"] = {"mode": "lot", "days": 180}
    rules = tmp_path / "held.yaml"
    rules.write_text(yaml.safe_dump(document))
    history = list(generate_events(events=600, customers=40, seed=43))
    documents = [json.loads(line) for line in history]
    closed = {d["order_id"] for d in documents if d["event_type"] in ("purchase.refunded", "purchase.cancelled")}
    orders = [d for d in documents if d["event_type"] == "purchase.completed" and d["order_id"] not in closed]
    customers = sorted({d["customer_id"] for d in documents})
    start = max(datetime.fromisoformat(d["occurred_at"]) for d in documents)
    start = max(start, datetime.now(UTC))  # about when the apply runs: its compensations carry the wall clock
    arriving = []
    for number in range(400):  # about 10 s of traffic: a tick of a customer, or a refund of an open order
        envelope = {
            "schema_version": 1,
            "store_id": "s1",
            "occurred_at": (start + timedelta(seconds=number)).isoformat(),
        }
        if number % 2 and orders:
            order = orders.pop(0)
            arriving.append({**envelope, "customer_id": order["customer_id"], "event_id": f"during-refund-{number}",
                             "event_type": "purchase.refunded", "order_id": order["order_id"],
                             "refund_id": f"during-{number}"})  # fmt: skip
        else:
            customer = customers[number % len(customers)]
            arriving.append({**envelope, "customer_id": customer, "event_id": f"during-tick-{number}",
                             "event_type": "clock.tick"})  # fmt: skip
    lines = [json.dumps(line) for line in arriving]
    arrived = _apply_during_traffic(tmp_path, history, lines, rules, wait_s=1.0)

    log = (tmp_path / "up.log").read_text()
    version = document["version"]
    assert all(f"apply of {version}: compensations applied on partition {p}" in log for p in (0, 1)), log[-3000:]
    expected = process_lines([line.encode() for line in history + arrived], load_ruleset(rules))
    client = connect(f"chdb://{(tmp_path / 'data' / 'clickhouse').resolve()}")
    try:
        assert projected_balances(client) == expected.balances()
        pending = client.query("SELECT customer_id, sum(pending_points) FROM ledger_entries FINAL GROUP BY customer_id")
    finally:
        client.close()
    wanted = {customer: state.pending for customer, state in expected.states.items() if state.pending}
    assert {c: int(p) for c, p in pending.result_rows if p} == wanted


def test_refunds_and_cancellations_after_an_apply_take_back_what_the_new_rules_awarded(tmp_path):
    """The compensation re-values the open orders: every balance after the refunds equals `loyalty process` under the
    new rules over the whole log (before, a refunded order left its uplift with the customer)."""
    _refunds_after_an_apply(tmp_path, NEW_RULES)


def test_an_apply_that_adds_a_return_window_moves_the_points_of_open_orders_to_pending(tmp_path):
    """The new rules hold purchase points pending for 60 days: the open orders' points go back to the pending balance
    with the new rules' lots, and the refunds after the apply reverse them from there; available and pending balances
    equal `loyalty process` under the new rules over the whole log (before, those refunds took the points from the
    available balance a second time)."""
    document = yaml.safe_load(NEW_RULES.read_text())
    document["version"] += "-window"
    document["purchase"]["pending_days"] = 60
    rules = tmp_path / "window.yaml"
    rules.write_text(yaml.safe_dump(document))
    outcome = _refunds_after_an_apply(tmp_path, rules)
    expected = outcome["expected"]
    client = connect(outcome["dsn"])
    try:
        pending = dict(
            client.query(
                "SELECT customer_id, sum(pending_points) FROM ledger_entries FINAL GROUP BY customer_id"
            ).result_rows
        )
    finally:
        client.close()
    wanted = {customer: state.pending for customer, state in expected.states.items()}
    assert {c: int(p) for c, p in pending.items() if p} == {c: p for c, p in wanted.items() if p}
    assert any(wanted.values())


def test_an_apply_into_expiry_by_lot_expires_the_new_rules_lots_after_it(tmp_path):
    """The new rules expire points 180 days after each award. The history (January) is older than that at the apply
    (its wall-clock time), so a tick of every customer after it expires what the new rules' lots hold, which is the
    whole available balance; before the lots were restated, the compensation's change was one lot at the cut-over,
    which stayed after the ticks."""
    document = yaml.safe_load(NEW_RULES.read_text())
    document["version"] += "-lots"
    document["expiry"] = {"mode": "lot", "days": 180}
    rules = tmp_path / "lots.yaml"
    rules.write_text(yaml.safe_dump(document))
    outcome = _refunds_after_an_apply(tmp_path, rules, ticks=True)
    client = connect(outcome["dsn"])
    try:
        expired = client.query("SELECT count(), sum(points) FROM ledger_entries FINAL WHERE kind = 'expired'")
    finally:
        client.close()
    count, points = expired.result_rows[0]
    wanted = [entry.points for entry in outcome["expected"].ledger if entry.kind == "expired"]
    assert (count, points) == (len(wanted), sum(wanted)) and count > 0


def _refunds_after_an_apply(tmp_path, new_rules, *, ticks: bool = False) -> dict:
    history = list(generate_events(events=600, customers=40, seed=41))
    documents = [json.loads(line) for line in history]
    last = max(datetime.fromisoformat(document["occurred_at"]) for document in documents)
    refunded = {d["order_id"] for d in documents if d["event_type"] in ("purchase.refunded", "purchase.cancelled")}
    orders = [d for d in documents if d["event_type"] == "purchase.completed" and d["order_id"] not in refunded]
    later = []
    # Dated after the apply's cut-over (the compensations carry its wall-clock time): the worker orders a customer's
    # events by their time, and these come after the compensation as they would in a store.
    after_apply = max(last, datetime.now(UTC)) + timedelta(hours=1)
    for number, order in enumerate(orders[:40]):
        moment = (after_apply + timedelta(minutes=number)).isoformat()
        envelope = {"schema_version": 1, "occurred_at": moment, "customer_id": order["customer_id"], "store_id": "s1"}
        if number % 3 == 0:
            later.append({**envelope, "event_id": f"late-cancel-{number}", "event_type": "purchase.cancelled",
                          "order_id": order["order_id"]})  # fmt: skip
        elif number % 3 == 1:
            later.append({**envelope, "event_id": f"late-refund-{number}", "event_type": "purchase.refunded",
                          "order_id": order["order_id"], "refund_id": f"late-{number}"})  # fmt: skip
        else:
            line = order["lines"][0]
            later.append({**envelope, "event_id": f"late-refund-{number}", "event_type": "purchase.refunded",
                          "order_id": order["order_id"], "refund_id": f"late-{number}",
                          "lines": [{"sku": line["sku"], "quantity": 1}]})  # fmt: skip
    if ticks:  # a tick of every customer after the refunds
        customers = sorted({d["customer_id"] for d in documents})
        moment = (after_apply + timedelta(hours=2)).isoformat()
        envelope = {"schema_version": 1, "occurred_at": moment, "store_id": "s1", "event_type": "clock.tick"}
        later += [{**envelope, "customer_id": customer, "event_id": f"late-tick-{customer}"} for customer in customers]
    arriving = [json.dumps(document) for document in later]
    expected_before = process_lines([line.encode() for line in history], load_ruleset())
    expected = process_lines([line.encode() for line in history + arriving], load_ruleset(new_rules))
    environment = _environment(tmp_path / "data")
    log_path = tmp_path / "up.log"

    up = _Up(environment, log_path)
    try:
        (tmp_path / "history.jsonl").write_text("".join(line + "\n" for line in history))
        produced = sum(run_cli(environment, "produce", str(tmp_path / "history.jsonl")).values())
        _wait_for(environment, produced, len(expected_before.ledger), up)
        applied = run_cli(environment, "replay", "--rules", str(new_rules), "--apply")
        compensations = applied["applied"]["compensations_published"]
        assert compensations > 0
        (tmp_path / "later.jsonl").write_text("".join(line + "\n" for line in arriving))
        more = sum(run_cli(environment, "produce", str(tmp_path / "later.jsonl")).values())
        _settled_and_replayed(environment, produced + compensations + more, up, new_rules)
    finally:
        up.stop()

    dsn = f"chdb://{(tmp_path / 'data' / 'clickhouse').resolve()}"
    client = connect(dsn)
    try:
        assert projected_balances(client) == expected.balances()
    finally:
        client.close()
    return {"expected": expected, "dsn": dsn}
