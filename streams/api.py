"""The HTTP API of the running system (status, balances, history, dashboard), served by the ClickHouse owner.

In embedded mode one process owns the chDB directory, so the CLI's `status`, `balance`, `history` and
`dashboard` ask this server, and analysts send read-only SQL to `POST /api/sql` (checked and bounded by
`streams.sql_guard`). Every /api route needs the bearer token; parameters are validated and a bad one is
answered with 400 and the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

from projections import queries
from streams.rules.ruleset import RuleSet
from streams.sql_guard import RESULT_ROWS_MAX, run_read_only_sql

log = logging.getLogger("loyalty.api")

history_page_size_max = 1000
top_earners_limit_max = 100
dashboard_range_days_max = 3660


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


def _date_param(request: web.Request, name: str, default: date) -> date:
    raw = request.query.get(name)
    if raw is None or raw == "":
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
    date_from = _date_param(request, "from", date_to - timedelta(days=29))
    if date_from > date_to:
        raise BadRequest("from: must not be after to")
    if (date_to - date_from).days > dashboard_range_days_max:
        raise BadRequest(f"the range may span at most {dashboard_range_days_max} days")
    return date_from, date_to


def build_app(context: ApiContext) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path.startswith("/api/"):
            header = request.headers.get("Authorization", "")
            supplied = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            if not supplied or not hmac.compare_digest(supplied, context.token):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        try:
            return await handler(request)
        except BadRequest as error:
            return web.json_response({"error": str(error)}, status=400)
        except queries_errors() as error:
            return web.json_response({"error": str(error)}, status=400)

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

    async def dashboard(request: web.Request) -> web.Response:
        date_from, date_to = _range(request)
        granularity = request.query.get("granularity", "day")
        if granularity not in ("day", "week", "month"):
            raise BadRequest("granularity: must be day, week or month")
        by = request.query.get("by", "source")
        if by not in ("source", "rule", "product", "category"):
            raise BadRequest("by: must be source, rule, product or category")
        limit = _int_param(request, "limit", 10, 1, top_earners_limit_max)
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
                "point_sources": _jsonable(sources),
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

    app = web.Application(middlewares=[guard], client_max_size=1024 * 1024)
    app.router.add_get("/healthz", health)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/customers/{customer_id}/balance", balance)
    app.router.add_get("/api/customers/{customer_id}/history", history)
    app.router.add_get("/api/dashboard", dashboard)
    app.router.add_get("/api/settings", settings)
    app.router.add_post("/api/sql", sql)
    return app


def queries_errors() -> tuple[type[Exception], ...]:
    """Caller-misuse errors the query layer raises before any I/O (bad ids, ranges): answered with 400."""
    return (ValueError,)
