"""Browser-test fixtures: a dashboard server over a chDB loaded from a simulated log, and headless Chromium.

The server is the real `streams.api.build_app` on 127.0.0.1 (port chosen by the OS), run in a thread with
its own event loop, because Playwright's sync API owns the test thread. Everything started here is
stopped at teardown, also when a test fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from projections import LedgerSink, connect, migrate
from streams.api import ApiContext, build_app
from streams.batch import ProcessResult, process_lines
from streams.rules.ruleset import ExpiryRules, RuleSet, load_ruleset
from streams.simulate import generate_events

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOKEN = "web-test-token-0123456789"
LOG_START = datetime(2026, 1, 1, tzinfo=UTC)
server_start_timeout_s = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the dashboard in headless Chromium (tests/web)")


def missing_browser_tooling() -> str | None:
    """Why the browser tests cannot run here, or None. CI installs both (see .ci/run and the test extra)."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"
    return None


def web_test_rules() -> RuleSet:
    """The default rule set with a 7-day return window and 30-day lot expiry, so that pending, confirmed
    and expired entries all appear on the page."""
    default = load_ruleset()
    return default.model_copy(
        update={
            "version": "web-test-1",
            "purchase": default.purchase.model_copy(update={"pending_days": 7}),
            "expiry": ExpiryRules(mode="lot", days=30),
        }
    )


@dataclass(frozen=True)
class LoadedSystem:
    url: str
    token: str
    ruleset: RuleSet
    result: ProcessResult
    date_from: date
    date_to: date

    def page_url(self, **fragment: Any) -> str:
        """The dashboard URL with the range (and anything else) in the fragment."""
        values = {"from": self.date_from.isoformat(), "to": self.date_to.isoformat(), **fragment}
        return f"{self.url}/#" + "&".join(f"{key}={value}" for key, value in values.items())


class _ServerThread:
    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self.loop = asyncio.new_event_loop()
        self.runner = None
        self.port: int | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dashboard-server", daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = web.AppRunner(build_app(self.context), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        try:
            self.loop.run_until_complete(start())
        except BaseException as error:  # reported to the test thread
            self.error = error
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> str:
        self.thread.start()
        if not self.ready.wait(server_start_timeout_s):
            raise RuntimeError("the dashboard server did not start")
        if self.error is not None:
            raise self.error
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.runner is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.loop.is_running():
            self.loop.close()


@pytest.fixture(scope="module")
def loaded_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedSystem]:
    """A simulated log (2026-01-01 to early March, one event every 30 minutes on average) through the batch
    driver, written to a fresh chDB through the LedgerSink, and served by the API on a free loopback port."""
    reason = missing_browser_tooling()
    if reason:
        pytest.skip(reason)
    ruleset = web_test_rules()
    lines = generate_events(events=3000, customers=120, seed=5, start=LOG_START, mean_gap_seconds=1800)
    result = process_lines(lines, ruleset)
    days = [entry.occurred_at.astimezone(UTC).date() for entry in result.ledger]
    client = connect(f"chdb://{tmp_path_factory.mktemp('web') / 'clickhouse'}")
    server: _ServerThread | None = None
    try:
        migrate(client)
        LedgerSink(client).write(result.ledger)

        async def status() -> dict[str, Any]:
            return {"ledger_rows_projected": len(result.ledger)}

        context = ApiContext(client=client, client_lock=asyncio.Lock(), ruleset=ruleset, token=TOKEN, status=status)
        server = _ServerThread(context)
        url = server.start()
        yield LoadedSystem(url=url, token=TOKEN, ruleset=ruleset, result=result, date_from=min(days), date_to=max(days))
    finally:
        if server is not None:
            server.stop()
        client.close()


@pytest.fixture(scope="module")
def chromium(loaded_system: LoadedSystem) -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright; stopped at teardown."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(chromium: Any, loaded_system: LoadedSystem) -> Iterator[Any]:
    """A fresh browser context whose requests may only go to the test server; any other is aborted and
    recorded in `page.foreign_requests` (the test asserts there were none)."""
    context = chromium.new_context(viewport={"width": 1360, "height": 900})
    foreign: list[str] = []

    def only_the_test_server(route: Any) -> None:
        if route.request.url.startswith(loaded_system.url + "/"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_test_server)
    page = context.new_page()
    page.foreign_requests = foreign
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.page_errors = errors
    try:
        yield page
    finally:
        context.close()
