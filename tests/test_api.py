"""The HTTP API against a temporary chDB: bearer token, parameter validation, response shapes, analysts' SQL."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from projections import LedgerSink, connect, migrate
from schemas.ledger import Kind, LedgerEntry, Source
from streams.api import ApiContext, build_app
from streams.rules.ruleset import load_ruleset

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def entry(customer_id: str, sequence: int, kind: str, occurred_at: str, points: int, balance_after: int, **fields):
    return LedgerEntry(
        entry_id=f"{customer_id}-{sequence}",
        customer_id=customer_id,
        store_id="store-1",
        kind=Kind(kind),
        sequence=sequence,
        points=points,
        balance_after=balance_after,
        source=Source(fields.pop("source", "purchase")),
        rule_id=fields.pop("rule_id", "purchase-base"),
        ruleset_version="2024.1",
        caused_by=f"event-{customer_id}-{sequence}",
        event_type="purchase.completed",
        fingerprint=f"fp-{customer_id}-{sequence}",
        occurred_at=datetime.fromisoformat(occurred_at),
        **fields,
    )


LEDGER = [
    entry("alice", 1, "earned", "2024-01-01T10:00:00+00:00", 100, 100, sku="SKU-1", category="shoes"),
    entry("alice", 2, "redeemed", "2024-01-02T10:00:00+00:00", -40, 60, source="redemption", rule_id="redeem"),
    entry("alice", 3, "earned", "2024-01-09T10:00:00+00:00", 20, 80, source="review", rule_id="review"),
    entry("bob", 1, "earned", "2024-01-03T10:00:00+00:00", 250, 250, sku="SKU-2", category="bags"),
]


@pytest.fixture
def api_client_factory(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(client)
    LedgerSink(client).write(LEDGER)

    async def status() -> dict[str, Any]:
        return {"events_processed": 4}

    def run(scenario: Callable[[TestClient], Awaitable[None]]) -> None:
        async def main() -> None:
            context = ApiContext(
                client=client, client_lock=asyncio.Lock(), ruleset=load_ruleset(), token=TOKEN, status=status
            )
            async with TestClient(TestServer(build_app(context), host="127.0.0.1")) as http:
                await scenario(http)

        asyncio.run(main())

    yield run
    client.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_every_api_route_needs_the_bearer_token(api_client_factory, headers):
    async def scenario(http: TestClient) -> None:
        for method, path in (
            ("GET", "/api/status"),
            ("GET", "/api/customers/alice/balance"),
            ("GET", "/api/customers/alice/history"),
            ("GET", "/api/dashboard"),
            ("GET", "/api/settings"),
            ("POST", "/api/sql"),
            ("GET", "/api/expiring"),
            ("GET", "/api/customers/alice/expiring"),
        ):
            response = await http.request(method, path, headers=headers, json={"sql": "SELECT 1"})
            assert response.status == 401, path
            assert await response.json() == {"error": "missing or wrong bearer token"}
        health = await http.get("/healthz")
        assert health.status == 200

    api_client_factory(scenario)


def test_balance_and_history_shapes(api_client_factory):
    async def scenario(http: TestClient) -> None:
        response = await http.get("/api/customers/alice/balance", headers=AUTH)
        assert response.status == 200
        assert await response.json() == {
            "customer_id": "alice",
            "balance": 80,
            "pending": 0,
            "lifetime_earned": 120,
            "lifetime_redeemed": 40,
            "debt": 0,
            "last_activity": "2024-01-09T10:00:00+00:00",
            "entries": 3,
        }
        nobody = await (await http.get("/api/customers/nobody/balance", headers=AUTH)).json()
        assert (nobody["balance"], nobody["entries"], nobody["last_activity"]) == (0, 0, None)

        response = await http.get("/api/customers/alice/history", params={"limit": 2, "offset": 1}, headers=AUTH)
        assert response.status == 200
        document = await response.json()
        assert document["customer_id"] == "alice"
        assert [
            (item["sequence"], item["kind"], item["points"], item["balance_after"]) for item in document["entries"]
        ] == [
            (2, "redeemed", -40, 60),
            (3, "earned", 20, 80),
        ]
        assert document["entries"][0] == LEDGER[1].model_dump(mode="json")

    api_client_factory(scenario)


def test_dashboard_shape_and_figures(api_client_factory):
    async def scenario(http: TestClient) -> None:
        params = {"from": "2024-01-01", "to": "2024-01-14", "granularity": "week", "limit": 5}
        response = await http.get("/api/dashboard", params=params, headers=AUTH)
        assert response.status == 200
        document = await response.json()
        assert sorted(document) == [
            "by",
            "from",
            "granularity",
            "liability",
            "point_sources",
            "point_sources_truncated",
            "points_status",
            "to",
            "top_earners",
        ]
        assert (document["from"], document["to"], document["granularity"], document["by"]) == (
            "2024-01-01",
            "2024-01-14",
            "week",
            "source",
        )
        weeks = document["points_status"]["periods"]
        assert [(week["period_start"], week["period_end"], week["issued"], week["outstanding"]) for week in weeks] == [
            ("2024-01-01", "2024-01-07", 350, 310),
            ("2024-01-08", "2024-01-14", 20, 330),
        ]
        assert document["points_status"]["totals"]["redeemed"] == 40
        assert document["point_sources"] == [
            {"key": "purchase", "points": 350, "entries": 2},
            {"key": "review", "points": 20, "entries": 1},
        ]
        assert document["point_sources_truncated"] is False
        assert document["top_earners"] == [
            {"customer_id": "bob", "points_earned": 250, "balance": 250},
            {"customer_id": "alice", "points_earned": 120, "balance": 80},
        ]
        assert len(document["liability"]) == 14
        assert document["liability"][-1] == {
            "day": "2024-01-14",
            "outstanding_points": 330,
            "outstanding_value": "3.30",
        }

    api_client_factory(scenario)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"from": "2024-13-01"}, "from: expected a date like 2026-01-31, got '2024-13-01'"),
        ({"from": ""}, "from: expected a date like 2026-01-31, got ''"),  # was taken as no date
        ({"to": "yesterday"}, "to: expected a date like 2026-01-31, got 'yesterday'"),
        ({"from": "2024-02-01", "to": "2024-01-01"}, "from: must not be after to"),
        ({"from": "2000-01-01", "to": "2024-01-01"}, "the range may span at most 3660 days"),
        ({"granularity": "year"}, "granularity: must be day, week or month"),
        ({"by": "customer_id"}, "by: must be source, rule, product or category"),
        ({"limit": "0"}, "limit: must be between 1 and 100"),
        ({"limit": "101"}, "limit: must be between 1 and 100"),
        ({"limit": "ten"}, "limit: expected an integer, got 'ten'"),
        ({"sources_limit": "0"}, "sources_limit: must be between 1 and 1000"),
        ({"sources_limit": "1001"}, "sources_limit: must be between 1 and 1000"),
    ],
)
def test_dashboard_answers_bad_parameters_with_400_and_the_reason(api_client_factory, params, reason):
    async def scenario(http: TestClient) -> None:
        response = await http.get("/api/dashboard", params=params, headers=AUTH)
        assert response.status == 400
        assert await response.json() == {"error": reason}

    api_client_factory(scenario)


def test_dashboard_answers_the_first_days_of_year_one(api_client_factory):
    """The default start (29 days before `to`) was computed even with `from` given: 500 before 0001-01-30."""

    async def scenario(http: TestClient) -> None:
        for params in ({"from": "0001-01-01", "to": "0001-01-05"}, {"to": "0001-01-05"}):
            response = await http.get("/api/dashboard", params=params, headers=AUTH)
            assert response.status == 200, await response.text()
            assert (await response.json())["from"] == "0001-01-01"

    api_client_factory(scenario)


def test_a_customer_id_with_a_slash_is_one_path_segment(api_client_factory):
    from streams.client import customer_path

    async def scenario(http: TestClient) -> None:
        path = customer_path("a/b?c%d", "balance")
        assert path == "/api/customers/a%2Fb%3Fc%25d/balance"
        response = await http.get(path, headers=AUTH)
        assert response.status == 200 and (await response.json())["customer_id"] == "a/b?c%d"

    api_client_factory(scenario)


def test_history_answers_a_limit_out_of_range_with_400(api_client_factory):
    async def scenario(http: TestClient) -> None:
        response = await http.get("/api/customers/alice/history", params={"limit": "5000"}, headers=AUTH)
        assert response.status == 400
        assert await response.json() == {"error": "limit: must be between 1 and 1000"}

    api_client_factory(scenario)


def test_sql_runs_an_analyst_select(api_client_factory):
    async def scenario(http: TestClient) -> None:
        sql = (
            "SELECT customer_id, sum(points) AS points FROM ledger_entries FINAL "
            "GROUP BY customer_id ORDER BY customer_id -- per customer"
        )
        response = await http.post("/api/sql", json={"sql": sql}, headers=AUTH)
        assert response.status == 200
        assert await response.json() == {
            "columns": ["customer_id", "points"],
            "rows": [["alice", 80], ["bob", 250]],
            "truncated": False,
            "rows_max": 10_000,
        }
        response = await http.post("/api/sql", json={"sql": "SELECT number FROM numbers(20000)"}, headers=AUTH)
        document = await response.json()
        assert (len(document["rows"]), document["truncated"]) == (10_000, True)

    api_client_factory(scenario)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"sql": "DROP TABLE ledger_entries"}, "only a SELECT (or WITH ... SELECT) statement is accepted, not 'DROP'"),
        (
            {"sql": "SELECT 1; DROP TABLE ledger_entries"},
            "only one statement is accepted (a `;` may only end the query)",
        ),
        (
            {"sql": "SELECT * FROM file('/etc/passwd')"},
            "the function file() is not accepted: it reads outside the projections",
        ),
        (
            {"sql": "SELECT 1 SETTINGS max_result_rows = 0"},
            "SETTINGS is not accepted: a SETTINGS clause changes limits (the API sets them)",
        ),
        ({"query": "SELECT 1"}, 'expected a JSON body {"sql": "SELECT ..."}'),
        ({"sql": 1}, 'expected a JSON body {"sql": "SELECT ..."}'),
    ],
)
def test_sql_refuses_with_400_and_the_reason(api_client_factory, body, reason):
    async def scenario(http: TestClient) -> None:
        response = await http.post("/api/sql", json=body, headers=AUTH)
        assert response.status == 400
        assert await response.json() == {"error": reason}
        count = await http.post("/api/sql", json={"sql": "SELECT count() FROM ledger_entries"}, headers=AUTH)
        assert (await count.json())["rows"] == [[4]]

    api_client_factory(scenario)


def test_sql_answers_an_engine_error_and_a_non_json_body_with_400(api_client_factory):
    async def scenario(http: TestClient) -> None:
        response = await http.post("/api/sql", json={"sql": "SELECT * FROM no_such_table"}, headers=AUTH)
        assert response.status == 400
        assert "no_such_table" in (await response.json())["error"]
        response = await http.post("/api/sql", data=b"SELECT 1", headers=AUTH)
        assert response.status == 400
        assert await response.json() == {"error": 'expected a JSON body {"sql": "SELECT ..."}'}

    api_client_factory(scenario)


def test_point_sources_are_bounded_by_sources_limit(api_client_factory):
    async def scenario(http: TestClient) -> None:
        params = {"from": "2024-01-01", "to": "2024-01-14", "sources_limit": "1"}
        document = await (await http.get("/api/dashboard", params=params, headers=AUTH)).json()
        assert document["point_sources"] == [{"key": "purchase", "points": 350, "entries": 2}]
        assert document["point_sources_truncated"] is True

    api_client_factory(scenario)


def test_openapi_document_is_public_and_describes_every_api_route(api_client_factory):
    async def scenario(http: TestClient) -> None:
        response = await http.get("/api/openapi.json")
        assert response.status == 200
        document = await response.json()
        assert document["openapi"] == "3.1.0"
        registered = {
            (route.resource.canonical, route.method.lower())
            for route in http.server.app.router.routes()
            if route.resource is not None and route.resource.canonical.startswith("/api/") and route.method != "HEAD"
        }
        documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
        # `loyalty up` adds the operators' routes to this app (streams/runtime.py); the document describes them too.
        assert documented - registered == {
            ("/api/replay", "post"),
            ("/api/replay/progress", "get"),
            ("/api/projections/rebuild", "post"),
        }
        assert registered <= documented
        for path, method in documented - {("/api/openapi.json", "get")}:
            responses = document["paths"][path][method]["responses"]
            assert {"200", "401"} <= set(responses), (path, method)
        for path in ("/api/dashboard", "/api/customers/{customer_id}/history", "/api/sql"):
            assert "400" in next(iter(document["paths"][path].values()))["responses"], path
        dashboard_parameters = {item["name"] for item in document["paths"]["/api/dashboard"]["get"]["parameters"]}
        assert dashboard_parameters == {"from", "to", "granularity", "by", "limit", "sources_limit"}
        history_limit = document["paths"]["/api/customers/{customer_id}/history"]["get"]["parameters"][1]
        assert (history_limit["name"], history_limit["schema"]["maximum"]) == ("limit", 1000)
        # Every reference resolves to a component.
        text = json.dumps(document)
        for name in re.findall(r'"#/components/schemas/([^"]+)"', text):
            assert name in document["components"]["schemas"], name

    api_client_factory(scenario)


def test_no_cors_headers_are_sent(api_client_factory):
    async def scenario(http: TestClient) -> None:
        origin = {"Origin": "https://elsewhere.example"}
        for path in ("/api/status", "/api/dashboard", "/", "/static/app.js", "/api/openapi.json"):
            response = await http.get(path, headers={**AUTH, **origin})
            assert response.status == 200, path
            assert not [name for name in response.headers if name.lower().startswith("access-control-")], path
        preflight = await http.options(
            "/api/dashboard",
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status in (401, 405)
        assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]

    api_client_factory(scenario)


def test_the_page_and_its_static_files_are_served_without_the_token(api_client_factory):
    async def scenario(http: TestClient) -> None:
        page = await http.get("/")
        assert page.status == 200
        assert page.content_type == "text/html"
        html = await page.text()
        assert '<script src="/static/app.js" defer></script>' in html
        assert '<script src="/static/vendor/chart.umd.js" defer></script>' in html
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        for path, content_type, marker in (
            ("/static/app.js", "javascript", "/api/dashboard"),
            ("/static/app.css", "text/css", ".tiles"),
            ("/static/vendor/chart.umd.js", "javascript", "Chart.js v4"),
        ):
            response = await http.get(path)
            assert response.status == 200, path
            assert content_type in response.content_type, path
            assert marker in await response.text(), path
        for path in ("/static/", "/static/../api.py", "/static/%2e%2e/api.py", "/static/missing.js"):
            response = await http.get(path)
            assert response.status in (403, 404), path

    api_client_factory(scenario)


def test_expiring_lists_nothing_when_the_rule_set_has_no_expiry_and_bounds_its_parameters(api_client_factory):
    async def scenario(http: TestClient) -> None:
        response = await http.get("/api/expiring?within_days=14&limit=5", headers=AUTH)
        assert response.status == 200
        document = await response.json()
        assert (document["mode"], document["within_days"], document["customers"]) == ("none", 14, [])
        response = await http.get("/api/expiring?limit=0", headers=AUTH)
        assert response.status == 400
        assert await response.json() == {"error": "limit: must be between 1 and 1000"}

    api_client_factory(scenario)


def test_routes_that_need_clickhouse_answer_503_while_it_is_unreachable_and_status_still_answers():
    from projections.client import ReconnectingClient
    from streams.broker import free_port

    port = free_port()
    client = ReconnectingClient(f"http://analyst:hunter2-secret@127.0.0.1:{port}/loyalty", retry_interval_s=0.0)

    async def status() -> dict[str, Any]:
        return {"projection_backlog": 7, "clickhouse_error": client.last_error}

    async def main() -> None:
        context = ApiContext(
            client=client, client_lock=asyncio.Lock(), ruleset=load_ruleset(), token=TOKEN, status=status
        )
        async with TestClient(TestServer(build_app(context), host="127.0.0.1")) as http:
            for method, path, body in (
                ("GET", "/api/customers/alice/balance", None),
                ("GET", "/api/customers/alice/history", None),
                ("GET", "/api/dashboard", None),
                ("POST", "/api/sql", {"sql": "SELECT 1"}),
            ):
                response = await http.request(method, path, headers=AUTH, json=body)
                answer = await response.json()
                assert response.status == 503, (path, answer)
                assert f"127.0.0.1:{port}/loyalty is unavailable" in answer["error"], answer
                assert "hunter2" not in answer["error"], answer
            response = await http.get("/api/status", headers=AUTH)
            document = await response.json()
            assert response.status == 200 and document["projection_backlog"] == 7
            assert "refused" in document["clickhouse_error"].lower() and "hunter2" not in document["clickhouse_error"]

    asyncio.run(main())


def test_metrics_of_the_serving_process_are_served_without_a_token(api_client_factory):
    from streams import metrics

    async def scenario(http: TestClient) -> None:
        metrics.record_sink_batch(7, 0.01)
        response = await http.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
        rows = [line for line in text.splitlines() if line.startswith("loyalty_projector_sink_rows_total ")]
        assert len(rows) == 1 and float(rows[0].split()[1]) >= 7

    api_client_factory(scenario)
