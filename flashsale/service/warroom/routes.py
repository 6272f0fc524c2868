"""The war room's routes: the live page operators watch during a sale (``GET /warroom``),
the one data endpoint it polls every second (``GET /api/admin/warroom``), the running
scenario's target curve (``/api/admin/warroom/target``), the alert thresholds and health,
and the operator controls — every control pressed through the war room is recorded in
the operator log (``operator_log``). What the page shows over time is ``history``'s; the
target curve's arithmetic is ``target``'s.

Everything sits behind the admin token. A browser cannot set headers on navigation, so
the page itself also takes the token as ``?token=``; the page keeps it in
sessionStorage and sends it as a Bearer header on every call it makes.

Redis keys: each module names its own (all ``{<prefix>:warroom}:*``, one hash tag, outside
every sale's hash slot).
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web
from redis.exceptions import RedisError

import inventory
from flashsale.service import admin_api, waiting_room
from flashsale.service.admin_api import admin_token_matches, collect_stats, require_admin
from flashsale.service.errors import ApiError, status_for
from flashsale.service.http import read_json
from flashsale.service.sales import now_ms
from flashsale.service.state import STATE, ServiceState
from flashsale.service.warroom import history, operator_log
from flashsale.service.warroom import target as target_curve
from flashsale.streams import oldest_waiting_ms

__all__ = ["AlertThresholds", "current_sale", "openapi_paths", "routes", "warroom_url"]

routes = web.RouteTableDef()

LAPSING_MS = 60_000  # "lapsing": holds whose payment deadline falls within this

_STATIC = {"warroom.js": "application/javascript", "warroom.css": "text/css"}
_TOKEN_KEY = "token"
# The page is code we ship: nothing inline, nothing from elsewhere, never framed.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True, slots=True)
class AlertThresholds:
    """Where a war-room panel turns red. Defaults are starting points, not measured SLOs:
    set them per drill from ``FLASHSALE_WARROOM_*``."""

    backlog: int = 10_000  # stream entries not yet in PostgreSQL, all sales together
    p99_ms: float = 250.0  # order latency p99 of the last second, worst process
    error_ratio: float = 0.01  # shed + unknown + fenced over all order answers, last 10 s
    #: Orders waiting this long with no writer commit in that time: the writer is stalled
    #: (the same 60 s as the FlashsaleWriterStalled alert rule).
    writer_stall_s: float = 60.0

    ENV = (
        (
            "FLASHSALE_WARROOM_BACKLOG",
            "backlog",
            "war room: backlog alert above this many entries (default 10000)",
        ),
        ("FLASHSALE_WARROOM_P99_MS", "p99_ms", "war room: latency alert above this p99 in ms (default 250)"),
        (
            "FLASHSALE_WARROOM_ERROR_RATIO",
            "error_ratio",
            "war room: error alert above this share of answers (default 0.01)",
        ),
        (
            "FLASHSALE_WARROOM_WRITER_STALL_S",
            "writer_stall_s",
            "war room: writer-stalled alert when orders wait this many seconds and no writer committed meanwhile (default 60)",
        ),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AlertThresholds:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, name, _doc in cls.ENV:
            raw = env.get(var)
            if not raw:
                continue
            try:
                value = int(raw) if name == "backlog" else float(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number; unset it for the default") from None
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{var}={raw!r} must be a finite number ≥ 0")
            values[name] = value
        return cls(**values)

    def to_json(self) -> dict[str, float]:
        return {
            "backlog": self.backlog,
            "p99_ms": self.p99_ms,
            "error_ratio": self.error_ratio,
            "writer_stall_s": self.writer_stall_s,
        }


# --------------------------------------------------------------------------- target curve


@routes.put("/api/admin/warroom/target")
async def put_target(request: web.Request) -> web.Response:
    """The rehearsal registers its scenario's target: cumulative orders created over time.
    ``points`` are [t_ms, orders] with t relative to ``origin_ms`` (epoch ms; default the
    sale's T0, else now). Orders count from this call on (the baseline is today's count)."""
    state = require_admin(request)
    body = await read_json(request)
    scenario = body.get("scenario", "")
    if not isinstance(scenario, str) or not 1 <= len(scenario) <= 100 or not scenario.isprintable():
        raise ApiError(
            422, "invalid_request", "scenario is a name of 1-100 printable characters", field="scenario"
        )
    points = target_curve.parse_points(body.get("points"))
    sale = body.get("sale")
    origin = body.get("origin_ms")
    if sale is not None:
        if not isinstance(sale, str):
            raise ApiError(422, "invalid_request", "sale is a sale id", field="sale")
        settings = await state.sales.sale(sale, fresh=True) if 1 <= len(sale) <= 32 else None
        if settings is None:
            raise ApiError(
                404, "sale_not_found", f"no sale {sale!r}: create it before registering its target"
            )
        origin = settings.opens_at_ms if origin is None else origin
    if origin is None:
        origin = now_ms()
    if not isinstance(origin, int) or isinstance(origin, bool) or not 0 <= origin <= 10**14:
        raise ApiError(422, "invalid_request", "origin_ms is epoch milliseconds", field="origin_ms")
    published = await history.published(state)
    target = {
        "scenario": scenario,
        "sale": sale,
        "origin_ms": origin,
        "points": points,
        "baseline_created": int(published["o"]["created"]) if published else 0,
        "registered_at_ms": now_ms(),
    }
    await target_curve.store(state, target)
    return web.json_response(target)


@routes.get("/api/admin/warroom/target")
async def get_target(request: web.Request) -> web.Response:
    state = require_admin(request)
    target = await target_curve.stored(state)
    if target is None:
        raise ApiError(404, "no_target", "no target curve registered: PUT /api/admin/warroom/target")
    return web.json_response(target)


@routes.delete("/api/admin/warroom/target")
async def delete_target(request: web.Request) -> web.Response:
    state = require_admin(request)
    return web.json_response({"deleted": await target_curve.forget(state)})


# --------------------------------------------------------------------------- controls

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _failure(exc: Exception) -> tuple[int, str]:
    """(status, stable code) the error middleware will answer for ``exc``."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(exc, inventory.InventoryError):
        return status_for(exc), exc.code
    if isinstance(exc, RedisError):
        return 503, "redis_unavailable"
    return 500, "internal_error"


def _control(action: str, handler: Handler) -> Handler:
    """A war-room control: the admin endpoint's own handler (same validation, same answer),
    wrapped so every press — refused ones too — lands in the operator log. The answer
    carries ``X-Operator-Log: <entry id>; postgres=<written|pending|no_database>``."""

    async def pressed(request: web.Request) -> web.StreamResponse:
        state = require_admin(request)
        operator = operator_log.header_text(request, "X-Operator", 64) or "anonymous"
        note = operator_log.header_text(request, "X-Operator-Note", 500)

        async def log_press(status: int, outcome: str, result: Any) -> tuple[str, str]:
            at = now_ms()
            entry = {
                "id": f"{at:013d}-{uuid.uuid4().hex[:12]}",
                "at_ms": at,
                "operator": operator,
                "action": action,
                "sale": request.match_info.get("sale"),
                "sku": request.match_info.get("sku"),
                "params": await operator_log.params(request),
                "status": status,
                "outcome": outcome,
                "result": result,
                "note": note,
                "remote": request.remote,
                "user_agent": request.headers.get("User-Agent", "")[:200],
            }
            return entry["id"], await operator_log.record(state, entry)

        try:
            response = await handler(request)
        except Exception as exc:
            await log_press(*_failure(exc), None)
            raise
        assert isinstance(response, web.Response) and response.text is not None
        entry_id, postgres = await log_press(response.status, "ok", json.loads(response.text))
        response.headers["X-Operator-Log"] = f"{entry_id}; postgres={postgres}"
        return response

    return pressed


CONTROLS: dict[str, tuple[str, Handler]] = {
    "open_sale": ("/api/admin/warroom/sales/{sale}/open", admin_api.open_sale),
    "close_sale": ("/api/admin/warroom/sales/{sale}/close", admin_api.close_sale),
    "restock": ("/api/admin/warroom/sales/{sale}/skus/{sku}/restock", admin_api.restock),
    "release_reserve": (
        "/api/admin/warroom/sales/{sale}/skus/{sku}/release-reserve",
        admin_api.release_reserve,
    ),
    "switches": ("/api/admin/warroom/switches", admin_api.set_switches),
}
for _name, (_path, _handler) in CONTROLS.items():
    routes.post(_path)(_control(_name, _handler))


@routes.get("/api/admin/warroom/log")
async def log_entries(request: web.Request) -> web.Response:
    """The operator log as Redis keeps it (newest first, last operator_log.LOG_MAX entries)."""
    state = require_admin(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= operator_log.LOG_MAX:
        raise ApiError(422, "invalid_request", f"limit is 1 to {operator_log.LOG_MAX}", field="limit")
    return web.json_response({"entries": await operator_log.entries(state, limit)})


# --------------------------------------------------------------------------- the data endpoint


async def _holds(state: ServiceState, sale: str, now: int) -> tuple[int, int]:
    """(lapsing within LAPSING_MS, overdue: past their deadline, waiting for the sweep),
    added up over the sale's buckets: a bucketed sale keeps its holds in its buckets (on
    a Redis Cluster, on several shards: the pipeline asks each shard once)."""
    settings = await state.sales.sale(sale)
    parts = state.engine_parts(settings) if settings is not None else [state.inventory(sale)]
    async with state.redis.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.zcount(part.keys.deadlines, now + 1, now + LAPSING_MS)
            pipe.zcount(part.keys.deadlines, "-inf", now)
        counts = [int(n) for n in await pipe.execute()]
    return sum(counts[0::2]), sum(counts[1::2])


async def writer_stalled_s(state: ServiceState, stats: dict[str, Any], now: int) -> float:
    """For how long orders have waited with no order writer committing: the time since the
    last commit or since the oldest order still waiting, whichever is shorter (a writer that
    never committed counts as long ago); 0.0 when nothing waits. A writer that commits, even
    slowly, keeps it near 0; one that is not running lets it grow as long as orders wait."""
    oldest: int | None = None
    for sale in stats["sales"]:
        settings = await state.sales.sale(sale)
        parts = state.engine_parts(settings) if settings is not None else [state.inventory(sale)]
        for part in parts:
            since = await oldest_waiting_ms(state.redis, part.keys.events)
            if since is not None:
                oldest = since if oldest is None else min(oldest, since)
    if oldest is None:
        return 0.0
    last_commit = int(float(stats["writer"].get("last_commit_ms", 0) or 0))
    return max(0.0, (now - max(oldest, last_commit)) / 1000)


def _phase(sale: dict[str, Any], now: int) -> str:
    if sale["fenced"]:
        return "fenced"
    if sale["state"] == "closed":
        return "closed"
    if sale["state"] == "open" or now >= sale["opens_at_ms"]:
        return "open"
    return "countdown"


def _alerts(
    stats: dict[str, Any], ratio: float, thresholds: AlertThresholds, *, stalled_s: float = 0.0
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    backlog = sum(int(s["backlog"]) for s in stats["sales"].values())
    dead = sum(int(s["dead_letters"]) for s in stats["sales"].values())
    p99 = float(stats["latency_ms"]["p99"])
    alerts: dict[str, dict[str, Any]] = {
        "backlog": {"value": backlog, "limit": thresholds.backlog, "firing": backlog > thresholds.backlog},
        "p99_ms": {"value": p99, "limit": thresholds.p99_ms, "firing": p99 > thresholds.p99_ms},
        "error_ratio": {
            "value": ratio,
            "limit": thresholds.error_ratio,
            "firing": ratio > thresholds.error_ratio,
        },
        "dead_letters": {"value": dead, "limit": 0, "firing": dead > 0},
        "writer_stalled_s": {
            "value": round(stalled_s, 1),
            "limit": thresholds.writer_stall_s,
            "firing": stalled_s > thresholds.writer_stall_s,
        },
    }
    reasons = []
    if alerts["writer_stalled_s"]["firing"]:
        reasons.append(
            f"no order writer has committed for {stalled_s:.0f} s while {backlog} stream entries wait to "
            f"reach PostgreSQL (limit {thresholds.writer_stall_s:g} s): is `flashsale worker` running?"
        )
    if alerts["p99_ms"]["firing"]:
        reasons.append(f"order latency p99 {p99:.0f} ms is above {thresholds.p99_ms:g} ms")
    if alerts["error_ratio"]["firing"]:
        reasons.append(
            f"{ratio:.1%} of order answers in the last 10 s were errors (shed, unknown, fenced); limit {thresholds.error_ratio:.1%}"
        )
    if alerts["backlog"]["firing"]:
        reasons.append(f"{backlog} orders waiting to reach PostgreSQL (limit {thresholds.backlog})")
    if alerts["dead_letters"]["firing"]:
        reasons.append(f"{dead} dead-lettered stream entries need a person")
    for name, sale in stats["sales"].items():
        if sale["fenced"]:
            reasons.append(f"sale {name} is fenced: {sale['fenced']}")
    return alerts, reasons


def current_sale(sales: Mapping[str, Any]) -> str | None:
    """The sale the page opens on: the most recent one — the latest T0 among the sales not
    closed (one still counting down to its T0 included: the drill about to start), else
    the latest T0 of all. None without a sale. Old sales never closed stay pickable in
    the page's list, but they are not what an operator opening the page came for."""
    if not sales:
        return None
    live = [name for name, sale in sales.items() if sale["state"] != "closed"]
    return max(live or sales, key=lambda name: (int(sales[name]["opens_at_ms"]), name))


def _stock_left(target: Mapping[str, Any] | None, sales: Mapping[str, Any]) -> int:
    """Units left for sale now: in the target's sale, else in every sale not closed."""
    if target is not None and target.get("sale") in sales:
        counted = [sales[target["sale"]]]
    else:
        counted = [sale for sale in sales.values() if sale["state"] != "closed"]
    return sum(int(sku["available"]) for sale in counted for sku in sale["skus"].values())


@routes.get("/api/admin/warroom")
async def warroom_data(request: web.Request) -> web.Response:
    """Everything the page shows, in one answer: /api/admin/stats plus per-second history,
    sold-out moments, holds lapsing, the target curve, thresholds, alerts and the log."""
    state = require_admin(request)
    try:
        thresholds = AlertThresholds.from_env()
    except ValueError as exc:
        raise ApiError(500, "bad_configuration", str(exc)) from None
    stats = await collect_stats(state)
    await history.sample(state, stats)
    now = now_ms()
    samples = await history.recent(state, now - history.HISTORY_WINDOW_MS, int(stats["processes"]))
    stockouts = await history.stockouts(state, stats["sales"], now)
    sales: dict[str, Any] = {}
    for name, sale in stats["sales"].items():
        lapsing, overdue = await _holds(state, name, now)
        skus = {
            sku: {
                **snap,
                "sold_out_at_ms": stockouts[f"{name}/{sku}"]["at_ms"],
                "sold_out_exact": stockouts[f"{name}/{sku}"]["exact"],
                "first_sold_out_at_ms": stockouts[f"{name}/{sku}"]["first_ms"],
            }
            for sku, snap in sale["skus"].items()
        }
        sales[name] = {
            **sale,
            "skus": skus,
            "phase": _phase(sale, now),
            "countdown_ms": sale["opens_at_ms"] - now,
            "holds_lapsing": lapsing,
            "holds_overdue": overdue,
        }
        if sale.get("room"):  # behind its waiting room: the room's queue, waits and tellings
            sales[name]["waiting_room"] = await waiting_room.room_view(state, name)
    ratio = history.error_ratio(samples)
    alerts, reasons = _alerts(stats, ratio, thresholds, stalled_s=await writer_stalled_s(state, stats, now))
    past = history.history_json(samples)
    rates_now = {
        group: next((v for v in reversed(series) if v is not None), 0.0)
        for group, series in past["rates"].items()
    }
    await operator_log.maybe_flush(state)
    target = await target_curve.stored(state)
    created_now = int(stats["orders"].get("created", 0))
    shown = current_sale(stats["sales"])
    body = {
        **stats,
        "now_ms": now,
        "sales": sales,
        "switches": await state.sales.switches(),
        "history": past,
        "rates_now": rates_now,
        "error_ratio": ratio,
        "current_sale": shown,
        "target": target_curve.target_json(target, created_now, now, _stock_left(target, stats["sales"])),
        "progress": await target_curve.progress(
            state, target, stats["sales"].get(shown) if shown else None, created_now, now
        ),
        "thresholds": thresholds.to_json(),
        "alerts": alerts,
        "health": {"status": "alert" if reasons else "healthy", "reasons": reasons},
        "log": await operator_log.log_json(state),
        "lapsing_window_ms": LAPSING_MS,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- the page


_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flashsale war room — admin token needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/warroom/warroom.css"></head>
<body class="login" data-page="login" data-rejected="{rejected}">
<main class="login-box">
<h1>flashsale war room</h1>
<p id="login-why">{why}</p>
<form method="get" action="/warroom">
<label for="token">Admin token (<code>FLASHSALE_ADMIN_TOKEN</code>)</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Open the war room</button>
</form>
<p class="hint"><code>flashsale rehearse</code> prints a ready-made link when it starts.</p>
</main>
<script src="/warroom/warroom.js"></script>
</body></html>
"""


def _static(name: str) -> str:
    return (resources.files("flashsale.service.warroom") / "static" / name).read_text(encoding="utf-8")


@routes.get("/warroom")
async def page(request: web.Request) -> web.Response:
    """The page, for a browser: the admin token as ``?token=`` (or a Bearer header).
    Without it, a small form asks for the token (401)."""
    state = request.app[STATE]
    token = request.query.get(_TOKEN_KEY, "")
    header = request.headers.get("Authorization", "")
    if not token and header.lower().startswith("bearer "):
        token = header[7:].strip()
    if not admin_token_matches(state, token):
        rejected = bool(token)
        why = (
            "That admin token was not accepted. Check FLASHSALE_ADMIN_TOKEN on the service."
            if rejected
            else "This page shows live sale numbers and operator controls: it needs the service's admin token."
        )
        html = _LOGIN.format(rejected="1" if rejected else "", why=why)
        return web.Response(text=html, status=401, content_type="text/html", headers=_PAGE_HEADERS)
    return web.Response(text=_static("warroom.html"), content_type="text/html", headers=_PAGE_HEADERS)


@routes.get("/warroom/{name}")
async def asset(request: web.Request) -> web.Response:
    """The page's script and style sheet (code, no secrets: served without the token)."""
    name = request.match_info["name"]
    if name not in _STATIC:
        raise ApiError(404, "not_found", f"no war-room file {name!r}")
    return web.Response(
        text=_static(name),
        content_type=_STATIC[name],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def warroom_url(base_url: str, admin_token: str, sale: str | None = None) -> str:
    """The link to print for a person (``flashsale rehearse``): the page with its token."""
    url = f"{base_url.rstrip('/')}/warroom?token={quote(admin_token, safe='')}"
    return url + (f"&sale={quote(sale, safe='')}" if sale else "")


def openapi_paths() -> dict[str, Any]:
    """The war room's routes for /openapi.json (flashsale.service.openapi merges them)."""
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    error = {"$ref": "#/components/schemas/Error"}

    def answer(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}

    def refused(*codes: str) -> dict[str, Any]:
        return {
            c: {"description": "refused", "content": {"application/json": {"schema": error}}} for c in codes
        }

    def param(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

    control_headers = [
        {
            "name": "X-Operator",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 64},
        },
        {
            "name": "X-Operator-Note",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 500},
        },
    ]
    paths: dict[str, Any] = {
        "/warroom": {
            "get": {
                "summary": "The war-room page (admin token as ?token=)",
                "parameters": [
                    {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the page", "content": {"text/html": {}}},
                    "401": {"description": "token form", "content": {"text/html": {}}},
                },
            }
        },
        "/warroom/{name}": {
            "get": {
                "summary": "The page's script and style sheet",
                "parameters": [param("name")],
                "responses": {"200": {"description": "file"}, **refused("404")},
            }
        },
        "/api/admin/warroom": {
            "get": {
                "summary": "Everything the war room shows",
                "security": admin,
                "responses": {"200": answer("stats, history, alerts, target, log"), **refused("401")},
            }
        },
        "/api/admin/warroom/log": {
            "get": {
                "summary": "The operator log",
                "security": admin,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": operator_log.LOG_MAX},
                    }
                ],
                "responses": {"200": answer("entries, newest first"), **refused("401", "422")},
            }
        },
        "/api/admin/warroom/target": {
            "put": {
                "summary": "Register the running scenario's target curve",
                "security": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": answer("the stored target"), **refused("401", "404", "413", "422")},
            },
            "get": {
                "summary": "The registered target curve",
                "security": admin,
                "responses": {"200": answer("the target"), **refused("401", "404")},
            },
            "delete": {
                "summary": "Forget the target curve",
                "security": admin,
                "responses": {"200": answer("deleted"), **refused("401")},
            },
        },
    }
    for _action, (path, _h) in CONTROLS.items():
        params = [param(p) for p in re.findall(r"{(\w+)}", path)] + control_headers
        paths[path] = {
            "post": {
                "summary": f"War-room control ({_action}), recorded in the operator log",
                "security": admin,
                "parameters": params,
                "responses": {
                    "200": answer("the admin endpoint's answer"),
                    **refused("401", "404", "409", "413", "422"),
                },
            }
        }
    return paths
