"""A second embedded `loyalty up` on a data directory an earlier one filled refuses to start, instead of losing data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from projections import LedgerSink, connect, migrate
from schemas.topics import LEDGER

REPOSITORY = Path(__file__).resolve().parents[2]


def _broker_processes() -> set[int]:
    """Pids of running Tansu brokers (the embedded broker's binary)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    arguments = cmdline.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if arguments and b"tansu" in Path(arguments[0].decode(errors="replace")).name.encode():
                found.add(int(entry))
    return found


def test_up_with_the_embedded_broker_refuses_a_data_directory_with_projected_positions(tmp_path):
    data_dir = tmp_path / "data"
    # What an earlier embedded run leaves: the projector's stored positions in the data directory's chDB.
    client = connect(f"chdb://{data_dir / 'clickhouse'}")
    migrate(client)
    LedgerSink(client).write([], {(LEDGER, 0): 898, ("loyalty.purchases", 1): 40})
    client.close()

    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOYALTY_")}
    environment.update(LOYALTY_DATA_DIR=str(data_dir), LOYALTY_HTTP_PORT="0", LOYALTY_BROKER_PORT="0")
    brokers_before = _broker_processes()
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "up"],
        env=environment,
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2, stderr[-3000:]
    assert "holds what an earlier `loyalty up` projected from its embedded broker" in stderr
    assert "loyalty.ledger/0 up to offset 898" in stderr and "loyalty.purchases/1 up to offset 40" in stderr
    assert not (data_dir / "run.json").exists()  # nothing was started for clients to find
    assert not _broker_processes() - brokers_before  # the embedded broker it started is stopped
