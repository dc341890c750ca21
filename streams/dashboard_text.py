"""The dashboard as plain-text terminal tables: renders the JSON document of `GET /api/dashboard`.

Sections in the order store owners know them: points status per period with a total line, point sources,
top earning customers with their balance, and the liability at the end of each period. Numbers are
right-aligned with thousands separators; money keeps the exact decimal string of the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["render_dashboard"]

STATUS_COLUMNS = (
    ("issued", "issued"),
    ("redeemed", "redeemed"),
    ("expired", "expired"),
    ("reversed", "reversed"),
    ("adjusted", "adjusted"),
    ("pending_issued", "pending issued"),
    ("outstanding", "outstanding"),
)
COLUMN_GAP = "  "


def render_dashboard(document: dict[str, Any]) -> str:
    """The four sections of `document` (the /api/dashboard JSON) as text, ending without a newline."""
    status = document["points_status"]
    granularity = document.get("granularity", status.get("granularity", "day"))
    by = document.get("by", "source")
    lines = [f"Loyalty dashboard {document['from']} .. {document['to']} (by {granularity})", ""]

    lines.append("Points status")
    rows = [[_period(period)] + [_number(period[key]) for key, _ in STATUS_COLUMNS] for period in status["periods"]]
    totals = status["totals"]
    footer = ["total"] + [_number(totals[key]) for key, _ in STATUS_COLUMNS]
    lines += _table(["period"] + [title for _, title in STATUS_COLUMNS], rows, footer=footer)

    lines += ["", f"Point sources (by {by})"]
    sources = document["point_sources"]
    rows = [[_key(source["key"]), _number(source["points"]), _number(source["entries"])] for source in sources]
    lines += _table([by, "points", "entries"], rows) if rows else ["(no points given in this range)"]

    lines += ["", "Top earners"]
    earners = document["top_earners"]
    rows = [
        [str(rank), earner["customer_id"], _number(earner["points_earned"]), _number(earner["balance"])]
        for rank, earner in enumerate(earners, start=1)
    ]
    lines += (
        _table(["#", "customer", "points earned", "balance"], rows, left_columns=2)
        if rows
        else ["(nobody earned points)"]
    )

    lines += ["", "Liability (outstanding at the end of each period)"]
    ends = {period["period_end"] for period in status["periods"]}
    liability = [day for day in document["liability"] if day["day"] in ends] or document["liability"]
    rows = [[day["day"], _number(day["outstanding_points"]), day["outstanding_value"]] for day in liability]
    lines += _table(["day", "outstanding points", "value"], rows)
    return "\n".join(lines)


def _table(
    headers: Sequence[str], rows: list[list[str]], footer: list[str] | None = None, left_columns: int = 1
) -> list[str]:
    """Lines of a table: the first `left_columns` columns left-aligned (labels), the others right-aligned
    (numbers), a rule under the header and above the footer."""
    everything = [list(headers), *rows, *([footer] if footer else [])]
    widths = [max(len(row[column]) for row in everything) for column in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        aligned = [
            cell.ljust(width) if column < left_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return COLUMN_GAP.join(aligned).rstrip()

    rule = COLUMN_GAP.join("-" * width for width in widths)
    output = [line(headers), rule, *(line(row) for row in rows)]
    if footer:
        output += [rule, line(footer)]
    return output


def _period(period: dict[str, Any]) -> str:
    start, end = period["period_start"], period["period_end"]
    return start if start == end else f"{start} .. {end}"


def _number(value: int) -> str:
    return f"{value:,}"


def _key(key: str | None) -> str:
    return "(none)" if key is None else key
