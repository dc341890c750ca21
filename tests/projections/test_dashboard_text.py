"""The dashboard document of GET /api/dashboard renders as plain-text tables, exactly as below."""

from __future__ import annotations

from streams.dashboard_text import render_dashboard

DOCUMENT = {
    "from": "2024-01-01",
    "to": "2024-01-14",
    "granularity": "week",
    "by": "category",
    "points_status": {
        "granularity": "week",
        "date_from": "2024-01-01",
        "date_to": "2024-01-14",
        "store_id": None,
        "periods": [
            {
                "period_start": "2024-01-01",
                "period_end": "2024-01-07",
                "issued": 1350,
                "redeemed": 40,
                "expired": 0,
                "reversed": 0,
                "adjusted": -5,
                "pending_issued": 40,
                "outstanding": 1305,
            },
            {
                "period_start": "2024-01-08",
                "period_end": "2024-01-14",
                "issued": 20,
                "redeemed": 0,
                "expired": 10,
                "reversed": 200,
                "adjusted": 0,
                "pending_issued": 0,
                "outstanding": 1115,
            },
        ],
        "totals": {
            "period_start": "2024-01-01",
            "period_end": "2024-01-14",
            "issued": 1370,
            "redeemed": 40,
            "expired": 10,
            "reversed": 200,
            "adjusted": -5,
            "pending_issued": 40,
            "outstanding": 1115,
        },
    },
    "point_sources": [
        {"key": "bags", "points": 1250, "entries": 2},
        {"key": None, "points": 120, "entries": 3},
    ],
    "top_earners": [
        {"customer_id": "bob", "points_earned": 1250, "balance": 1050},
        {"customer_id": "alice", "points_earned": 120, "balance": -30},
    ],
    "liability": [
        {"day": "2024-01-06", "outstanding_points": 1305, "outstanding_value": "13.05"},
        {"day": "2024-01-07", "outstanding_points": 1305, "outstanding_value": "13.05"},
        {"day": "2024-01-14", "outstanding_points": 1115, "outstanding_value": "11.15"},
    ],
}

EXPECTED = """\
Loyalty dashboard 2024-01-01 .. 2024-01-14 (by week)

Points status
period                    issued  redeemed  expired  reversed  adjusted  pending issued  outstanding
------------------------  ------  --------  -------  --------  --------  --------------  -----------
2024-01-01 .. 2024-01-07   1,350        40        0         0        -5              40        1,305
2024-01-08 .. 2024-01-14      20         0       10       200         0               0        1,115
------------------------  ------  --------  -------  --------  --------  --------------  -----------
total                      1,370        40       10       200        -5              40        1,115

Point sources (by category)
category  points  entries
--------  ------  -------
bags       1,250        2
(none)       120        3

Top earners
#  customer  points earned  balance
-  --------  -------------  -------
1  bob               1,250    1,050
2  alice               120      -30

Liability (outstanding at the end of each period)
day         outstanding points  value
----------  ------------------  -----
2024-01-07               1,305  13.05
2024-01-14               1,115  11.15"""


def test_dashboard_renders_every_section_as_aligned_tables():
    assert render_dashboard(DOCUMENT).splitlines() == EXPECTED.splitlines()


def test_liability_shows_the_end_of_each_period_only():
    lines = render_dashboard(DOCUMENT).splitlines()
    liability = lines[lines.index("Liability (outstanding at the end of each period)") :]
    assert not any(line.startswith("2024-01-06") for line in liability)


def test_empty_sections_say_so():
    document = {**DOCUMENT, "point_sources": [], "top_earners": []}
    lines = render_dashboard(document).splitlines()
    assert "(no points given in this range)" in lines
    assert "(nobody earned points)" in lines
