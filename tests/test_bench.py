"""`loyalty bench --small`: every figure is measured and the worker's ledger is exactly the batch driver's.

Correctness only: speed depends on the machine, so no figure is compared with a target here
(the targets are reported by the bench itself, see docs/performance.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from streams.batch import process_lines
from streams.bench import QUERY_SECTIONS, ROWS, TARGETS, BenchOptions, build_log, format_table, replay_input
from streams.rules.ruleset import load_ruleset

REPOSITORY = Path(__file__).resolve().parents[1]
BENCH_TIMEOUT_S = 300


def test_replay_input_groups_each_customer_in_event_time_order():
    log = build_log(2000, 100, seed=3)
    messages = replay_input(log)
    assert len(messages) == len(log.messages)
    keys = [message.routing_key for message in messages]
    # Each routing key forms one contiguous run, as replay_messages requires.
    runs = [key for index, key in enumerate(keys) if index == 0 or keys[index - 1] != key]
    assert len(runs) == len(set(keys))
    for before, after in zip(messages, messages[1:], strict=False):
        if before.routing_key == after.routing_key:
            assert (before.occurred_at, before.topic_rank, before.offset) <= (
                after.occurred_at,
                after.topic_rank,
                after.offset,
            )


@pytest.mark.integration
def test_small_bench_measures_every_figure_and_drains_exactly_the_batch_ledger():
    completed = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "--small", "--json"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout)

    options = BenchOptions.small_run()
    expected = process_lines(build_log(options.events, options.customers, options.seed).lines, load_ruleset())
    expected_entries = len({entry.entry_id for entry in expected.ledger})
    assert figures["expected_ledger_entries"] == expected_entries
    assert figures["worker_ledger_entries"] == expected_entries
    assert figures["worker_ledger_missing"] == figures["worker_ledger_unexpected"] == 0
    assert figures["projection_rows"] == expected_entries
    assert figures["worker_input_messages"] >= options.events
    assert figures["replay_events"] == figures["worker_input_messages"]
    assert figures["latency_balance_lost"] == 0
    # The memory figure's worker restored every customer's entries (2,000 customers in the small run).
    assert figures["memory_customers"] == options.memory_customers
    assert figures["memory_entries_folded"] == figures["memory_ledger_entries"] >= 2 * options.memory_customers

    rates = [
        "ceiling_produce_msgs_per_s",
        "ceiling_produce_send_msgs_per_s",
        "ceiling_consume_msgs_per_s",
        "baseline_events_per_s",
        "worker_drain_events_per_s",
        "projection_ingest_rows_per_s",
        "replay_events_per_s",
        "latency_ledger_p50_ms",
        "latency_ledger_p99_ms",
        "latency_balance_p50_ms",
        "latency_balance_p99_ms",
        "worker_peak_rss_mb",
        "worker_memory_peak_rss_mb",
        "ratio_worker_to_ceiling",
        "ratio_worker_to_baseline",
        *(f"query_{section}_p{p}_ms" for section in QUERY_SECTIONS for p in (50, 95)),
    ]
    for name in rates:
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert set(figures["targets_met"]) == set(TARGETS)
    table = format_table(figures)
    assert all(label in table for label, _, _ in ROWS)


def test_the_replay_digest_leaves_out_the_derived_events_and_stays_what_older_code_gave():
    """A replay with derived referral reversals keeps them in `ShadowResult.derived` (an apply's second step needs
    them); the digest leaves them out: it hashes figures, so that it stays comparable with older code's."""
    import dataclasses

    from streams.bench import replay_digest
    from streams.replay import replay_messages

    log = build_log(3000, 150, 11)
    result = replay_messages(replay_input(log), load_ruleset("streams/rules/rulesets/full-lifecycle.yaml"))
    assert result.derived
    assert replay_digest(result) == replay_digest(dataclasses.replace(result, derived={}))


def test_live_expiry_memory_measures_the_ledger_read_of_each_size():
    """`python -m streams.bench live-expiry-memory`: an archive and ledger per size, `replay._live_expiry` on each in a
    fresh process, its peak memory read from /proc (a correctness check of the measurement, not a memory target)."""
    done = subprocess.run(
        [sys.executable, "-m", "streams.bench", "live-expiry-memory", "--events", "600,1200", "--customers", "50"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(done.stdout)["runs"]
    assert [run["events"] for run in runs] == [600, 1200]
    for run in runs:
        assert run["entries"] > run["events"] and 50 <= run["customers"] < run["lots"]
        assert run["ruleset_version"] == "full-lifecycle-1" and run["peak_above_base_mib"] >= 0
    assert runs[1]["entries"] > runs[0]["entries"]


def test_live_figures_peak_measures_the_figures_read_with_and_without_markers(tmp_path):
    """`python -m streams.bench live-figures-peak DIR`: `replay.live_figures` on an archive and ledger as
    `replay-memory` stores them, with the markers past every archived message and without them, its peak memory read
    from /proc (a correctness check of the measurement, not a memory target)."""
    bench = [sys.executable, "-m", "streams.bench"]
    built = subprocess.run(
        [*bench, "replay-memory-archive", str(tmp_path), "600", "50"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    runs = []
    for extra in ([], ["--no-markers"]):
        done = subprocess.run(
            [*bench, "live-figures-peak", str(tmp_path), *extra],
            cwd=REPOSITORY, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout))
    assert [run["markers"] for run in runs] == [True, False]
    for run in runs:
        assert run["entries"] > 600 and run["customers"] >= 50 and run["peak_above_base_mib"] >= 0
        assert run["ruleset_version"] == "full-lifecycle-1" and run["slice_entries"] == 100_000
    assert runs[0]["customers"] == runs[1]["customers"]


def test_replay_memory_measures_a_dry_run_of_each_archive_size(tmp_path):
    """`python -m streams.bench replay-memory`: an archive and ledger per size, a real offline dry-run on each, its
    peak memory read from /proc (a correctness check of the measurement, not a memory target)."""
    done = subprocess.run(
        [sys.executable, "-m", "streams.bench", "replay-memory", "--events", "600,1200", "--customers", "50",
         "--processes", "1"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert [run["events"] for run in figures["runs"]] == [600, 1200]
    for run in figures["runs"]:
        assert run["events_replayed"] >= run["events"] and run["customers"] >= 50
        assert 0 < run["peak_rss_main_mib"] <= run["peak_rss_tree_mib"]
    assert figures["runs"][1]["events_replayed"] > figures["runs"][0]["events_replayed"]
