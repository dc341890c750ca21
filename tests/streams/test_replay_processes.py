"""Replay in several processes gives exactly the report of one process, derived events included."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_derived_events import RULES
from test_replay_derived import live_archive

from streams import replay
from streams.batch import process_lines
from streams.replay import replay_messages
from streams.rules.ruleset import load_ruleset
from streams.simulate import generate_events

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def history():
    generated = generate_events(events=2000, customers=100, seed=5, mean_gap_seconds=5000, disputed_referral_share=0.3)
    lines = [line.encode() for line in generated]
    rules = load_ruleset(RULES)
    return lines, rules, live_archive(lines, rules)


def test_replay_in_two_processes_equals_one_process_and_the_batch_driver(history, monkeypatch):
    lines, rules, archive = history

    def refetch(keys):
        return [message for message in archive if message.routing_key in keys]

    alone = replay_messages(archive, rules, refetch=refetch)
    # Small chunks: the 2,000-event history is cut into about 20 chunks, so referrers and their referees are decided
    # in different chunks (and processes), and the derived withdrawals must still reach the referrers.
    monkeypatch.setattr(replay, "chunk_messages", 97)
    seen: list[int] = []
    together = replay_messages(archive, rules, refetch=refetch, processes=2, progress=seen.append)

    assert dataclasses.asdict(together) == dataclasses.asdict(alone)
    expected = process_lines(lines, rules)
    assert any(entry.rule_id == "referral.referrer.withdrawn" for entry in expected.ledger)
    assert together.balances == expected.balances()
    assert together.entries == len(expected.ledger)
    assert seen == sorted(seen) and seen[-1] == together.events  # progress after every merged chunk


def test_the_orders_an_apply_keeps_are_the_same_in_two_processes_and_only_of_changed_customers(history, monkeypatch):
    """An apply keeps the open orders of the customers whose replayed balance differs from the live one (given as
    `keep_orders`, with the pending balance), in every replay process; the derived events' second pass updates them."""
    lines, rules, archive = history

    def refetch(keys):
        return [message for message in archive if message.routing_key in keys]

    every = replay_messages(archive, rules, refetch=refetch, keep_orders=True)
    assert every.orders  # customers with open orders
    # Live balances: half the customers as replayed (nothing to compensate), the others off by one point.
    customers = sorted(every.balances)
    live = {
        customer: (
            every.balances[customer] + (number % 2),
            every.pending.get(customer, 0),
            every.restate[customer].lifetime_earned,
        )
        for number, customer in enumerate(customers)
    }
    changed = {customer for number, customer in enumerate(customers) if number % 2}
    alone = replay_messages(archive, rules, refetch=refetch, keep_orders=live)
    assert alone.orders == {customer: orders for customer, orders in every.orders.items() if customer in changed}
    monkeypatch.setattr(replay, "chunk_messages", 97)
    together = replay_messages(archive, rules, refetch=refetch, processes=2, keep_orders=live)
    assert together.orders == alone.orders
    assert together.pending == alone.pending == every.pending
    assert together.restate == alone.restate == {customer: every.restate[customer] for customer in changed}


def test_chunks_end_where_the_routing_key_changes(history):
    _, _, archive = history
    chunks = list(replay._chunks(archive, 97))
    assert [value for chunk in chunks for value in chunk.values] == [message.value for message in archive]
    assert all(len(chunk.values) >= 97 for chunk in chunks[:-1])
    keys = [message.routing_key for message in archive]
    boundary = 0
    for chunk in chunks[:-1]:
        boundary += len(chunk.values)
        assert keys[boundary - 1] != keys[boundary]  # no customer is split between two chunks
    fields = [field for chunk in chunks for field in chunk.fields()]
    assert fields == [(m.topic, m.offset, m.referee_side, m.event_id, m.value) for m in archive]


def test_an_archive_of_one_chunk_is_replayed_without_starting_processes(history, monkeypatch):
    _, rules, archive = history

    def refuse(*args, **kwargs):
        raise AssertionError("a process pool was started for one chunk")

    monkeypatch.setattr(replay, "ProcessPoolExecutor", refuse)
    alone = replay_messages(archive, rules)
    assert dataclasses.asdict(replay_messages(archive, rules, processes=4)) == dataclasses.asdict(alone)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_customer_keyed_under_two_routing_keys_is_refused_not_decided_twice(history, monkeypatch, processes):
    _, rules, archive = history
    monkeypatch.setattr(replay, "chunk_messages", 97)
    customer = max({m.routing_key for m in archive}, key=lambda key: sum(m.routing_key == key for m in archive))
    # Half of that customer's messages keyed by a foreign producer under another key, which sorts first.
    own = [m for m in archive if m.routing_key == customer]
    moved = {id(m) for m in own[len(own) // 2 :]}
    rekeyed = [dataclasses.replace(m, routing_key="!" + customer) if id(m) in moved else m for m in archive]
    rekeyed.sort(key=lambda m: (m.routing_key, m.occurred_at, m.topic_rank, m.offset))

    with pytest.raises(replay.ReplayRefused, match=f"customer '{customer}' has archived events under more than one"):
        replay_messages(rekeyed, rules, processes=processes)


def test_an_empty_archive_replays_to_an_empty_report_in_any_number_of_processes():
    result = replay_messages(iter(()), load_ruleset(), processes=2)
    assert dataclasses.asdict(result) == dataclasses.asdict(replay.ShadowResult())


@pytest.mark.parametrize("processes", [0, -1, replay.processes_max + 1])
def test_a_process_count_out_of_range_is_refused_before_any_work(processes):
    with pytest.raises(ValueError, match=f"processes must be in 1..{replay.processes_max}, got {processes}"):
        replay_messages(iter(()), load_ruleset(), processes=processes)


def test_the_default_process_count_is_the_cpus_this_process_may_use(monkeypatch):
    from streams.settings import load_settings

    monkeypatch.delenv("LOYALTY_REPLAY_PROCESSES", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert load_settings().resolved_replay_processes() == 3
    monkeypatch.setenv("LOYALTY_REPLAY_PROCESSES", "5")
    assert load_settings().resolved_replay_processes() == 5


ORPHAN_SCRIPT = """
import sys, time
from streams import replay
from streams.bench import build_log, replay_input
from streams.rules.ruleset import load_ruleset

def archive_then_hang(messages):
    yield from messages
    print("submitted", flush=True)
    time.sleep(3600)  # the caller is stuck reading the archive while the pool waits for work

if __name__ == "__main__":
    replay.chunk_messages = 100
    replay.replay_messages(archive_then_hang(replay_input(build_log(1500, 150, 3))), load_ruleset(), processes=2)
"""


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return {int(child) for child in listing.read().split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs /proc")
def test_replay_processes_exit_when_the_calling_process_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    caller = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    children: set[int] = set()
    try:
        assert caller.stdout is not None and caller.stdout.readline().strip() == "submitted"
        children = _children(caller.pid)
        assert len(children) >= 2  # the two replay processes (and multiprocessing's resource tracker)
        caller.kill()
        caller.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [child for child in children if _alive(child)]
    finally:
        if caller.poll() is None:
            caller.kill()
        for child in children:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def test_a_replay_process_whose_caller_died_before_it_started_exits():
    # The caller can be killed while a spawned pool process is still importing: by the time its initializer
    # runs, its parent is already the reaper. The caller's pid must come from the caller (it was read in the
    # child, as its parent, which then never changed: the process stayed behind; the full suite hit it).
    code = (
        "import time\n"
        "from streams import replay\n"
        "from streams.rules.ruleset import load_ruleset\n"
        "replay._start_process(load_ruleset(), caller=-1)\n"
        "time.sleep(60)\n"
    )
    started = subprocess.Popen([sys.executable, "-c", code], cwd=REPOSITORY)
    try:
        assert started.wait(timeout=30) == 1
    finally:
        if started.poll() is None:
            started.kill()
            started.wait()
