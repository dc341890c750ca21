"""Every SQL example in docs/analysts.md runs on the projections' schema and returns rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from projections import LedgerSink

ANALYSTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "analysts.md"
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)
EXAMPLES = SQL_BLOCK.findall(ANALYSTS_DOC.read_text(encoding="utf-8"))


def test_the_document_has_ten_or_more_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("number", range(len(EXAMPLES)), ids=lambda number: f"example-{number + 1}")
def test_analyst_example_runs_and_finds_rows(client, ledger, scenario, number):
    ledger.add(
        "dora", "pending", "2024-02-10T09:00:00+00:00", pending_points=25, order_id="o-dora", reference="line:0",
        available_at="2024-02-24T09:00:00+00:00",
    )  # fmt: skip
    sink = LedgerSink(client)
    sink.write(ledger.entries)
    sink.write(scenario[:3])  # a retry, so that the audit of duplicates has something to show
    assert client.query(EXAMPLES[number]).result_rows != []
