"""The web dashboard in headless Chromium shows exactly what `loyalty process` implies for a known log.

Every expected figure is computed here from the batch driver's ledger (`process_lines`), following the
definitions in docs/analysts.md, never from the query code or the API.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, date, timedelta
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPOSITORY = Path(__file__).resolve().parents[2]
ARTIFACTS = REPOSITORY / "test-artifacts"
EARNING_KINDS = ("earned", "confirmed")
SOURCE_KINDS = ("earned", "confirmed", "adjusted")
TOP_EARNERS_SHOWN = 20
HISTORY_PAGE_SIZE = 200
wait_ms = 20_000


def day_of(entry) -> date:
    return entry.occurred_at.astimezone(UTC).date()


def integer(value: int) -> str:
    return f"{value:,}"


def in_range(system, entry) -> bool:
    return system.date_from <= day_of(entry) <= system.date_to


def expected_tiles(system) -> dict[str, str]:
    ledger = system.result.ledger
    inside = [entry for entry in ledger if in_range(system, entry)]
    outstanding = sum(entry.points for entry in ledger if day_of(entry) <= system.date_to)
    return {
        "issued": str(sum(entry.points for entry in inside if entry.kind in EARNING_KINDS)),
        "redeemed": str(-sum(entry.points for entry in inside if entry.kind == "redeemed")),
        "expired": str(-sum(entry.points for entry in inside if entry.kind == "expired")),
        "outstanding": str(outstanding),
        "liability": format(outstanding * system.ruleset.redemption.point_value, "f"),
    }


def expected_sources(system, attribute: str) -> dict[str, tuple[int, int]]:
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in system.result.ledger:
        if in_range(system, entry) and entry.kind in SOURCE_KINDS and entry.points > 0:
            key = getattr(entry, attribute)
            key = "(none)" if key is None else str(key)
            sums[key][0] += entry.points
            sums[key][1] += 1
    return {key: (points, entries) for key, (points, entries) in sums.items()}


def expected_top_earners(system) -> list[tuple[str, str, str, str]]:
    earned: dict[str, int] = defaultdict(int)
    for entry in system.result.ledger:
        if in_range(system, entry) and entry.kind in EARNING_KINDS:
            earned[entry.customer_id] += entry.points
    balances = system.result.balances()
    ranked = sorted(earned.items(), key=lambda item: (-item[1], item[0]))[:TOP_EARNERS_SHOWN]
    return [
        (str(rank), customer_id, integer(points), integer(balances[customer_id]))
        for rank, (customer_id, points) in enumerate(ranked, start=1)
    ]


def expected_history_rows(system, customer_id: str) -> list[tuple[str, ...]]:
    entries = sorted(
        (entry for entry in system.result.ledger if entry.customer_id == customer_id),
        key=lambda entry: (entry.sequence, entry.entry_id),
    )
    rows = []
    for entry in entries:
        explanation = entry.explanation
        if entry.available_at is not None:
            explanation += f" (available from {entry.available_at.astimezone(UTC).isoformat()[:16].replace('T', ' ')})"
        rows.append(
            (
                entry.occurred_at.astimezone(UTC).isoformat()[:19].replace("T", " "),
                entry.kind.value,
                entry.source.value,
                entry.rule_id,
                integer(entry.points),
                integer(entry.pending_points) if entry.pending_points else "",
                integer(entry.balance_after),
                explanation,
            )
        )
    return rows


def period_count(system, granularity: str) -> int:
    starts = set()
    day = system.date_from
    while day <= system.date_to:
        if granularity == "day":
            starts.add(day)
        elif granularity == "week":
            starts.add(max(day - timedelta(days=day.weekday()), system.date_from))
        else:
            starts.add(day.replace(day=1))
        day += timedelta(days=1)
    return len(starts)


def table_rows(page, selector: str) -> list[tuple[str, ...]]:
    return [
        tuple(row)
        for row in page.eval_on_selector_all(
            f"{selector} tbody tr", "rows => rows.map(row => [...row.cells].map(cell => cell.textContent))"
        )
    ]


def wait_for_dashboard(page, system, granularity: str = "day", by: str = "source") -> None:
    state = f"{granularity}|{by}|{system.date_from}|{system.date_to}"
    page.wait_for_function("state => document.body.dataset.dashboard === state", arg=state, timeout=wait_ms)


def chart_labels(page, canvas_id: str) -> list[str]:
    return page.evaluate(f"Chart.getChart(document.getElementById({canvas_id!r})).data.labels")


def painted_pixels(page, canvas_id: str) -> int:
    """Pixels of the canvas that are not transparent: 0 for a chart that drew nothing."""
    return page.evaluate(
        """id => {
            const canvas = document.getElementById(id);
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let index = 3; index < pixels.length; index += 4) if (pixels[index] > 0) painted += 1;
            return painted;
        }""",
        canvas_id,
    )


def open_dashboard(page, system, **fragment) -> None:
    page.goto(system.page_url(token=system.token, **fragment))
    wait_for_dashboard(page, system, fragment.get("granularity", "day"), fragment.get("by", "source"))


def test_every_section_shows_the_figures_of_the_batch_ledger(page, loaded_system):
    system = loaded_system
    open_dashboard(page, system)
    assert "token" not in page.url  # read once, then kept in sessionStorage only

    tiles = {
        name: page.get_attribute(f'#status [data-tile="{name}"] .value', "data-value")
        for name in ("issued", "redeemed", "expired", "outstanding", "liability")
    }
    assert tiles == expected_tiles(system)
    assert all(int(tiles[name]) > 0 for name in ("issued", "redeemed", "expired", "outstanding"))
    assert page.text_content('#status [data-tile="issued"] .value') == integer(int(tiles["issued"]))

    sources = expected_sources(system, "source")
    rows = table_rows(page, "#sources-table")
    assert {row[0]: (row[1], row[2]) for row in rows} == {
        key: (integer(points), integer(entries)) for key, (points, entries) in sources.items()
    }
    shown_points = [int(row[1].replace(",", "")) for row in rows]
    assert shown_points == sorted(shown_points, reverse=True)

    assert table_rows(page, "#top-table") == expected_top_earners(system)

    page.wait_for_function("() => document.body.dataset.settings === 'web-test-1'", timeout=wait_ms)
    assert page.text_content("#ruleset-version") == "web-test-1"
    assert '"pending_days": 7' in page.text_content("#ruleset-json")

    assert painted_pixels(page, "status-chart") > 2000
    assert painted_pixels(page, "sources-chart") > 2000
    assert page.page_errors == [] and page.foreign_requests == []


def test_the_period_switch_regroups_the_chart(page, loaded_system):
    system = loaded_system
    open_dashboard(page, system)
    counts = {}
    for granularity in ("day", "week", "month"):
        if granularity != "day":
            page.click(f'#granularity button[data-value="{granularity}"]')
            wait_for_dashboard(page, system, granularity)
        counts[granularity] = len(chart_labels(page, "status-chart"))
        assert painted_pixels(page, "status-chart") > 2000, granularity
    assert counts == {granularity: period_count(system, granularity) for granularity in ("day", "week", "month")}
    assert counts["day"] > counts["week"] > counts["month"] > 1
    assert "granularity=month" in page.url


def test_the_source_switch_groups_by_category(page, loaded_system):
    system = loaded_system
    open_dashboard(page, system)
    page.click('#source-dimension button[data-value="category"]')
    wait_for_dashboard(page, system, by="category")
    rows = table_rows(page, "#sources-table")
    expected = expected_sources(system, "category")
    assert {row[0]: (row[1], row[2]) for row in rows} == {
        key: (integer(points), integer(entries)) for key, (points, entries) in expected.items()
    }
    assert page.text_content("#sources-key") == "Category"
    assert len(chart_labels(page, "sources-chart")) == min(len(expected), 13)


def test_clicking_a_top_earner_opens_their_history(page, loaded_system):
    system = loaded_system
    open_dashboard(page, system)
    customer_id = expected_top_earners(system)[0][1]
    page.click(f'#top-table tr[data-customer="{customer_id}"]')
    page.wait_for_function("id => document.body.dataset.history === id", arg=customer_id, timeout=wait_ms)

    expected = expected_history_rows(system, customer_id)
    assert len(expected) > HISTORY_PAGE_SIZE  # the busiest customer needs a second page
    assert table_rows(page, "#history-table") == expected[:HISTORY_PAGE_SIZE]
    page.click("#history-more")
    page.wait_for_function(
        "count => document.querySelectorAll('#history-table tbody tr').length === count",
        arg=min(len(expected), 2 * HISTORY_PAGE_SIZE),
        timeout=wait_ms,
    )
    assert table_rows(page, "#history-table") == expected[: 2 * HISTORY_PAGE_SIZE]

    state = system.result.states[customer_id]
    assert page.get_attribute('#customer-summary [data-tile="balance"] .value', "data-value") == str(state.balance)
    assert page.input_value("#customer-input") == customer_id
    assert "about to expire" in page.text_content("#expiry-note")
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_searching_a_customer_shows_every_entry_with_its_explanation(page, loaded_system):
    system = loaded_system
    counts: dict[str, int] = defaultdict(int)
    for entry in system.result.ledger:
        counts[entry.customer_id] += 1
    customer_id = max(
        (customer for customer, count in counts.items() if 20 <= count <= HISTORY_PAGE_SIZE),
        key=lambda customer: counts[customer],
    )
    open_dashboard(page, system)
    page.fill("#customer-input", customer_id)
    page.press("#customer-input", "Enter")
    page.wait_for_function("id => document.body.dataset.history === id", arg=customer_id, timeout=wait_ms)
    expected = expected_history_rows(system, customer_id)
    assert table_rows(page, "#history-table") == expected
    assert page.is_hidden("#history-more")
    state = system.result.states[customer_id]
    for name, value in (("balance", state.balance), ("pending", state.pending)):
        assert page.get_attribute(f'#customer-summary [data-tile="{name}"] .value', "data-value") == str(value)
    assert re.search(rf"{len(expected)} entries of {customer_id}", page.text_content("#history-note"))
    assert f"customer={customer_id}" in page.url


def test_the_page_asks_for_the_token_and_rejects_a_wrong_one(page, loaded_system):
    system = loaded_system
    page.goto(system.page_url())
    page.wait_for_selector("#token-dialog[open]", timeout=wait_ms)
    page.fill("#token-input", "wrong-token")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-error:not([hidden])", timeout=wait_ms)
    assert page.text_content("#token-error") == "The token was not accepted."
    page.fill("#token-input", system.token)
    page.click("#token-form button[type=submit]")
    wait_for_dashboard(page, system)
    assert page.get_attribute('#status [data-tile="issued"] .value', "data-value") == expected_tiles(system)["issued"]
    assert page.evaluate("sessionStorage.getItem('loyalty.api.token')") == system.token
