"""The HTTP API and the web dashboard of the running system, served by the ClickHouse owner.

In embedded mode one process owns the chDB directory, so the CLI's `status`, `balance`, `history` and
`dashboard` ask this server, and analysts send read-only SQL to `POST /api/sql` (checked and bounded by
`streams.sql_guard`). Every /api route except `/api/openapi.json` needs the bearer token; parameters are
validated and a bad one is answered with 400 and the reason. The dashboard page (`/`, assets under
`/static/`) carries no data: it asks the API with the token the user gives it. No CORS header is ever
sent, so a page of another origin cannot read the API.

While ClickHouse is unreachable (a server DSN), every route that needs it answers 503 with
`{"error": "ClickHouse at http://host:port/db is unavailable: <reason>"}` (never the DSN's password), and
`/api/status` still answers, with the projection backlog and the last ClickHouse error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from projections import queries
from projections.client import ClickHouseUnavailable
from streams.replay import lag_bound_messages
from streams.rules.ruleset import RuleSet
from streams.sql_guard import RESULT_ROWS_MAX, run_read_only_sql

log = logging.getLogger("loyalty.api")

history_page_size_max = 1000
expiring_page_size_max = 1000
top_earners_limit_max = 100
point_sources_limit_max = 1000
point_sources_limit_default = 100
dashboard_range_days_max = 3660

WEB_DIRECTORY = Path(__file__).resolve().parent / "web"
# The page loads only its own files and talks only to its own origin; the API answers are JSON, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class BadRequest(ValueError):
    pass


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _date_param(request: web.Request, name: str, default: date | None) -> date | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a date like 2026-01-31, got {raw[:40]!r}") from None


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}")
    return value


class ApiContext:
    """What the handlers need: the ClickHouse client (behind a lock: chDB is single-connection), the rule set,
    a status callable and the token."""

    def __init__(
        self,
        *,
        client,
        client_lock: asyncio.Lock,
        ruleset: RuleSet,
        token: str,
        status: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.client = client
        self.client_lock = client_lock
        self.ruleset = ruleset
        self.token = token
        self.status = status

    async def query(self, function, *args, **kwargs):
        async with self.client_lock:
            return await asyncio.to_thread(function, self.client, *args, **kwargs)


def _range(request: web.Request) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    date_to = _date_param(request, "to", today)
    date_from = _date_param(request, "from", None)
    if date_from is None:  # 30 days up to `to`; computed only when not given (0001-01-05 has no 29 days before it)
        date_from = max(date_to, date.min + timedelta(days=29)) - timedelta(days=29)
    if date_from > date_to:
        raise BadRequest("from: must not be after to")
    if (date_to - date_from).days > dashboard_range_days_max:
        raise BadRequest(f"the range may span at most {dashboard_range_days_max} days")
    return date_from, date_to


def build_app(context: ApiContext) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path.startswith("/api/") and request.path != "/api/openapi.json":
            header = request.headers.get("Authorization", "")
            supplied = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            if not supplied or not hmac.compare_digest(supplied, context.token):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        try:
            response = await handler(request)
        except BadRequest as error:
            return web.json_response({"error": str(error)}, status=400)
        except queries_errors() as error:
            return web.json_response({"error": str(error)}, status=400)
        except unavailable_errors() as error:
            if not _is_unavailable(error):
                raise
            log.warning("%s %s: %s", request.method, request.path, error)
            return web.json_response({"error": unavailable_message(error)}, status=503)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.path.startswith("/api/"):
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            response.headers.setdefault("Cache-Control", "no-cache")
        return response

    async def status(request: web.Request) -> web.Response:
        return web.json_response(_jsonable(await context.status()))

    async def balance(request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        result = await context.query(queries.balance, customer_id)
        if result is None:
            document = {
                "customer_id": customer_id,
                "balance": 0,
                "pending": 0,
                "lifetime_earned": 0,
                "lifetime_redeemed": 0,
                "debt": 0,
                "last_activity": None,
                "entries": 0,
            }
        else:
            document = _jsonable(result)
            document["balance"] = document.pop("available")
        return web.json_response(document)

    async def history(request: web.Request) -> web.Response:
        customer_id = request.match_info["customer_id"]
        limit = _int_param(request, "limit", 200, 1, history_page_size_max)
        offset = _int_param(request, "offset", 0, 0, 10_000_000)
        entries = await context.query(queries.history, customer_id, limit=limit, offset=offset)
        return web.json_response({"customer_id": customer_id, "entries": _jsonable(entries)})

    async def expiring(request: web.Request) -> web.Response:
        """Points that expire within `within_days` under the running rule set's expiry: one customer's (the
        path names it), or the list of customers soonest first (for reminder e-mails)."""
        customer_id = request.match_info.get("customer_id")
        within_days = _int_param(request, "within_days", 30, 0, queries.EXPIRING_WITHIN_DAYS_MAX)
        limit = 1 if customer_id else _int_param(request, "limit", 100, 1, expiring_page_size_max)
        expiry = context.ruleset.expiry
        as_of = datetime.now(UTC)
        document: dict[str, Any] = {
            "as_of": as_of.isoformat(),
            "within_days": within_days,
            "mode": expiry.mode,
            "days": expiry.days,
            "ruleset_version": context.ruleset.version,
            "customers": [],
        }
        if customer_id:
            document = {"customer_id": customer_id, **document}
        if expiry.mode != "none":
            found = await context.query(
                queries.expiring_soon,
                as_of=as_of,
                within_days=within_days,
                mode=expiry.mode,
                days=expiry.days,
                limit=limit,
                customer_id=customer_id,
            )
            document["customers"] = _jsonable(found)
        return web.json_response(document)

    async def dashboard(request: web.Request) -> web.Response:
        date_from, date_to = _range(request)
        granularity = request.query.get("granularity", "day")
        if granularity not in ("day", "week", "month"):
            raise BadRequest("granularity: must be day, week or month")
        by = request.query.get("by", "source")
        if by not in ("source", "rule", "product", "category"):
            raise BadRequest("by: must be source, rule, product or category")
        limit = _int_param(request, "limit", 10, 1, top_earners_limit_max)
        sources_limit = _int_param(request, "sources_limit", point_sources_limit_default, 1, point_sources_limit_max)
        status_result = await context.query(queries.points_status, date_from, date_to, granularity)
        sources = await context.query(queries.point_sources, date_from, date_to, by)
        top = await context.query(queries.top_earners, date_from, date_to, limit)
        liability = await context.query(queries.liability, date_from, date_to, context.ruleset.redemption.point_value)
        return web.json_response(
            {
                "from": date_from.isoformat(),
                "to": date_to.isoformat(),
                "granularity": granularity,
                "by": by,
                "points_status": _jsonable(status_result),
                "point_sources": _jsonable(sources[:sources_limit]),
                "point_sources_truncated": len(sources) > sources_limit,
                "top_earners": _jsonable(top),
                "liability": _jsonable(liability),
            }
        )

    async def sql(request: web.Request) -> web.Response:
        """Body {"sql": "SELECT ..."}; answer {"columns", "rows", "truncated"} (at most RESULT_ROWS_MAX rows)."""
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest('expected a JSON body {"sql": "SELECT ..."}') from None
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            raise BadRequest('expected a JSON body {"sql": "SELECT ..."}')
        # SqlRefused (the check) and SqlFailed (the engine) are ValueErrors: the guard answers 400 with the reason.
        result = await context.query(run_read_only_sql, body["sql"])
        return web.json_response(
            {"columns": result.columns, "rows": result.rows, "truncated": result.truncated, "rows_max": RESULT_ROWS_MAX}
        )

    async def settings(request: web.Request) -> web.Response:
        return web.json_response({"ruleset": context.ruleset.model_dump(mode="json")})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIRECTORY / "index.html")

    async def metrics_page(request: web.Request) -> web.Response:
        """This process's Prometheus metrics: under `loyalty up` the projector's and sink's, which the worker
        child's LOYALTY_METRICS_PORT does not serve. No token, like /healthz."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[guard], client_max_size=1024 * 1024)
    app.router.add_get("/", page)
    app.router.add_static("/static/", WEB_DIRECTORY, show_index=False, follow_symlinks=False)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/customers/{customer_id}/balance", balance)
    app.router.add_get("/api/customers/{customer_id}/history", history)
    app.router.add_get("/api/customers/{customer_id}/expiring", expiring)
    app.router.add_get("/api/expiring", expiring)
    app.router.add_get("/api/dashboard", dashboard)
    app.router.add_get("/api/settings", settings)
    app.router.add_post("/api/sql", sql)
    return app


def unavailable_errors() -> tuple[type[Exception], ...]:
    """ClickHouse cannot be reached: the ReconnectingClient's error, or a plain client's transport error."""
    from clickhouse_connect.driver.exceptions import OperationalError

    return (ClickHouseUnavailable, OperationalError)


def _is_unavailable(error: Exception) -> bool:
    from clickhouse_connect.driver.exceptions import StreamFailureError

    return not isinstance(error, StreamFailureError)  # an error inside a streamed result: the server answered


def unavailable_message(error: Exception) -> str:
    if isinstance(error, ClickHouseUnavailable):
        return f"{error}; the ledger waits in Kafka and is projected once ClickHouse is back"
    return "ClickHouse is unavailable (the HTTP request to it failed); retry later"


def queries_errors() -> tuple[type[Exception], ...]:
    """Caller-misuse errors the query layer raises before any I/O (bad ids, ranges): answered with 400."""
    return (ValueError,)


def _model_schemas(*models) -> dict[str, Any]:
    """JSON Schemas of pydantic models, their nested definitions hoisted into OpenAPI components."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _integer(description: str) -> dict[str, Any]:
    return {"type": "integer", "description": description}


def _object(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "required": sorted(properties), "properties": properties}
    if description:
        schema["description"] = description
    return schema


def _reference(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query_parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every /api route (kept in sync with `build_app` by a test)."""
    from schemas.ledger import LedgerEntry

    date_schema = {"type": "string", "format": "date"}
    period = _object(
        {
            "period_start": date_schema,
            "period_end": date_schema,
            "issued": _integer("earned and confirmed points"),
            "redeemed": _integer("points redeemed (positive)"),
            "expired": _integer("points expired (positive)"),
            "reversed": _integer("points reversed by refunds and cancellations (positive)"),
            "adjusted": _integer("admin adjustments (signed)"),
            "pending_issued": _integer("points awarded as pending (not yet available)"),
            "outstanding": _integer("sum of all available balances at the end of period_end"),
        },
        "Points status of one period, clipped to the requested range.",
    )
    components = _model_schemas(LedgerEntry, RuleSet)
    components.update(
        {
            "Error": _object({"error": {"type": "string", "description": "the reason"}}),
            "PeriodStatus": period,
            "PointsStatus": _object(
                {
                    "granularity": {"enum": ["day", "week", "month"]},
                    "date_from": date_schema,
                    "date_to": date_schema,
                    "store_id": {"type": ["string", "null"]},
                    "periods": {"type": "array", "items": _reference("PeriodStatus")},
                    "totals": _reference("PeriodStatus"),
                }
            ),
            "PointSource": _object(
                {
                    "key": {"type": ["string", "null"], "description": "null: entries without that detail"},
                    "points": _integer("positive points of kinds earned, confirmed and adjusted"),
                    "entries": _integer("entries with positive points"),
                }
            ),
            "TopEarner": _object(
                {
                    "customer_id": {"type": "string"},
                    "points_earned": _integer("earned and confirmed points in the range"),
                    "balance": _integer("current available balance"),
                }
            ),
            "LiabilityDay": _object(
                {
                    "day": date_schema,
                    "outstanding_points": _integer("sum of available balances at the end of the day"),
                    "outstanding_value": {"type": "string", "description": "decimal: points x point_value"},
                }
            ),
            "Dashboard": _object(
                {
                    "from": date_schema,
                    "to": date_schema,
                    "granularity": {"enum": ["day", "week", "month"]},
                    "by": {"enum": ["source", "rule", "product", "category"]},
                    "points_status": _reference("PointsStatus"),
                    "point_sources": {"type": "array", "items": _reference("PointSource")},
                    "point_sources_truncated": {
                        "type": "boolean",
                        "description": "more keys than sources_limit exist (the first ones by points are shown)",
                    },
                    "top_earners": {"type": "array", "items": _reference("TopEarner")},
                    "liability": {"type": "array", "items": _reference("LiabilityDay")},
                }
            ),
            "Balance": _object(
                {
                    "customer_id": {"type": "string"},
                    "balance": _integer("available points (negative when in debt)"),
                    "pending": _integer("points awarded but not yet available"),
                    "lifetime_earned": _integer("earned and confirmed points, ever"),
                    "lifetime_redeemed": _integer("points redeemed, ever (positive)"),
                    "debt": _integer("-balance when the balance is negative, else 0"),
                    "last_activity": {"type": ["string", "null"], "format": "date-time"},
                    "entries": _integer("ledger entries of the customer"),
                }
            ),
            "History": _object(
                {
                    "customer_id": {"type": "string"},
                    "entries": {"type": "array", "items": _reference("LedgerEntry")},
                }
            ),
            "Settings": _object({"ruleset": _reference("RuleSet")}),
            "Status": {
                "type": "object",
                "description": "counters of the running system; see docs/cli.md (`loyalty status --json`)",
                "additionalProperties": True,
            },
            "SqlRequest": _object({"sql": {"type": "string", "description": "one SELECT (or WITH ... SELECT)"}}),
            "ReplayRequest": {
                "type": "object",
                "required": ["rules"],
                "properties": {
                    "rules": {"type": "string", "description": "the new rule set, YAML text"},
                    "apply": {"type": "boolean", "default": False, "description": "post the compensations"},
                    "customer": {"type": "string", "description": "preview this customer alone (not with apply)"},
                    "since": {**date_schema, "description": "report only customers active since this day"},
                    "lag_max": {
                        "type": "integer",
                        "minimum": 0,
                        "default": lag_bound_messages,
                        "description": "apply: refuse while the worker lags by more input messages",
                    },
                    "processes": {"type": "integer", "minimum": 1, "description": "default: one per CPU"},
                    "progress_id": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9_-]{1,64}$",
                        "description": "an id of the caller's choosing: GET /api/replay/progress?id= tells how far "
                        "this replay is while the request waits",
                    },
                },
                "additionalProperties": False,
            },
            "ReplayProgress": _object(
                {
                    "phase": {"type": "string", "description": "what the replay or apply is doing now"},
                    "events": _integer("events replayed so far"),
                    "estimate": _integer("about how many messages are archived (the progress bar's 100%)"),
                    "done": {"type": "boolean", "description": "the report is (being) sent"},
                }
            ),
            "Report": {
                "type": "object",
                "description": "the replay or rebuild report; see docs/replay.md (`loyalty replay --json`, "
                "`loyalty projections rebuild --json`)",
                "additionalProperties": True,
            },
            "SqlResult": _object(
                {
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "array"}},
                    "truncated": {"type": "boolean"},
                    "rows_max": _integer("the most rows an answer holds"),
                }
            ),
        }
    )
    error = _reference("Error")
    bad_request = _json_response("a parameter is invalid; `error` says which and why", error)
    unauthorized = _json_response("missing or wrong bearer token", error)
    unavailable = _json_response("ClickHouse is unreachable; `error` says why (retry later)", error)
    refused = _json_response("refused now (worker lag, archive gaps, a failed swap); `error` says why", error)

    def operation(
        summary: str, ok: dict[str, Any], parameters=(), *, validated: bool = True, responses_extra=None, **extra
    ) -> dict:
        responses = {"200": ok, "401": unauthorized}
        if validated:
            responses["400"] = bad_request
            responses["503"] = unavailable
        responses.update(responses_extra or {})
        return {"summary": summary, "parameters": list(parameters), "responses": responses, **extra}

    customer_parameter = {
        "name": "customer_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the customer id of the events",
    }
    range_parameters = [
        _query_parameter("from", "first day (UTC), default: `to` minus 29 days", date_schema),
        _query_parameter("to", "last day (UTC, included), default: today", date_schema),
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "loyalty-engine API",
            "version": "1",
            "description": (
                "Read API of the running loyalty engine (`loyalty up`): status, balances, history, the dashboard "
                "sections, the rule set and read-only SQL; and the operators' replay and projection rebuild, "
                "which `loyalty up` adds. Every route except this document needs "
                "`Authorization: Bearer <token>` (the token is in `<data dir>/run.json`). No CORS headers are sent."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {}}}},
                }
            },
            "/api/status": {
                "get": operation(
                    "Consumer lag and counters of the running system",
                    _json_response("the counters", _reference("Status")),
                    validated=False,
                )
            },
            "/api/customers/{customer_id}/balance": {
                "get": operation(
                    "A customer's balance (zeros for an unknown customer)",
                    _json_response("the balance", _reference("Balance")),
                    [customer_parameter],
                )
            },
            "/api/customers/{customer_id}/history": {
                "get": operation(
                    "A customer's ledger entries in sequence order, one page",
                    _json_response("the page of entries", _reference("History")),
                    [
                        customer_parameter,
                        _query_parameter(
                            "limit",
                            "entries per page",
                            {"type": "integer", "minimum": 1, "maximum": history_page_size_max, "default": 200},
                        ),
                        _query_parameter("offset", "entries to skip", {"type": "integer", "minimum": 0, "default": 0}),
                    ],
                )
            },
            "/api/expiring": {
                "get": operation(
                    "Customers whose available points expire within N days under the active rule set's expiry, "
                    "soonest first (for reminder e-mails); empty when expiry is off",
                    _json_response(
                        "the expiry settings and the customers with points, balance, expires_at", {"type": "object"}
                    ),
                    [
                        _query_parameter(
                            "within_days",
                            "the horizon in days from now",
                            {"type": "integer", "minimum": 0, "maximum": 3650, "default": 30},
                        ),
                        _query_parameter(
                            "limit",
                            "customers to return",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        ),
                    ],
                )
            },
            "/api/customers/{customer_id}/expiring": {
                "get": operation(
                    "A customer's available points that expire within N days under the active rule set's expiry "
                    "(for reminder e-mails); `customers` is empty when nothing expires or expiry is off",
                    _json_response(
                        "the expiry settings and at most one row: points, balance, expires_at",
                        {"type": "object"},
                    ),
                    [
                        customer_parameter,
                        _query_parameter(
                            "within_days",
                            "the horizon in days from now",
                            {"type": "integer", "minimum": 0, "maximum": 3650, "default": 30},
                        ),
                    ],
                )
            },
            "/api/dashboard": {
                "get": operation(
                    "The dashboard sections for a date range",
                    _json_response("points status, point sources, top earners, liability", _reference("Dashboard")),
                    [
                        *range_parameters,
                        _query_parameter(
                            "granularity",
                            "period of points_status",
                            {"enum": ["day", "week", "month"], "default": "day"},
                        ),
                        _query_parameter(
                            "by",
                            "dimension of point_sources",
                            {"enum": ["source", "rule", "product", "category"], "default": "source"},
                        ),
                        _query_parameter(
                            "limit",
                            "top earners to return",
                            {"type": "integer", "minimum": 1, "maximum": top_earners_limit_max, "default": 10},
                        ),
                        _query_parameter(
                            "sources_limit",
                            "point sources to return (largest first)",
                            {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": point_sources_limit_max,
                                "default": point_sources_limit_default,
                            },
                        ),
                    ],
                )
            },
            "/api/settings": {
                "get": operation(
                    "The active rule set (read-only)",
                    _json_response("the rule set and its version", _reference("Settings")),
                    validated=False,
                )
            },
            "/api/replay": {
                "post": operation(
                    "Preview a new rule set on the archived history, one customer's history, or apply it",
                    _json_response(
                        "the dry-run report, the customer's preview, or the apply report", _reference("Report")
                    ),
                    validated=False,
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": _reference("ReplayRequest")}},
                    },
                    responses_extra={"400": bad_request, "409": refused},
                )
            },
            "/api/replay/progress": {
                "get": operation(
                    "How far a replay is (the one POST /api/replay named by its progress_id)",
                    _json_response("the replay's phase and events so far", _reference("ReplayProgress")),
                    [
                        {
                            "name": "id",
                            "in": "query",
                            "required": True,
                            "description": "the replay request's progress_id",
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        }
                    ],
                    validated=False,
                    responses_extra={
                        "400": bad_request,
                        "404": _json_response("no replay with this id (or no longer kept)", error),
                    },
                )
            },
            "/api/projections/rebuild": {
                "post": operation(
                    "Rebuild every derived projection from the ledger and swap it in",
                    _json_response("tables, rows before and after, days, seconds", _reference("Report")),
                    validated=False,
                    responses_extra={"409": refused},
                )
            },
            "/api/sql": {
                "post": operation(
                    "One read-only SELECT over the projections",
                    _json_response(f"columns and at most {RESULT_ROWS_MAX} rows", _reference("SqlResult")),
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": _reference("SqlRequest")}},
                    },
                )
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
