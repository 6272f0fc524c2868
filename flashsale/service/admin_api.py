"""Operators' endpoints (bearer admin token): create and steer sales, mint drill
tokens, the degraded-site switches, live stats and the audit."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from aiohttp import web

from flashsale.keys import ServiceKeys
from flashsale.service import waiting_room
from flashsale.service.errors import ApiError
from flashsale.service.http import bearer, read_json
from flashsale.service.metrics import stream_backlog, sum_published
from flashsale.service.sales import SWITCHES, SaleSettings, now_ms
from flashsale.service.state import STATE, ServiceState
from flashsale.service.tokens import mint
from flashsale.service.waiting_room import room_spec
from inventory import BucketedInventory

__all__ = ["admin_token_matches", "require_admin", "routes"]

logger = logging.getLogger("flashsale.service")
routes = web.RouteTableDef()

_SALE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
#: What an order id a client was given can look like (``<sale>.<random>``), generously.
_ORDER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,100}")
MAX_SKUS_PER_SALE = 1000
MAX_TOKENS_PER_CALL = 100_000
#: 9999-12-31T23:59:59.999Z. Opening times are printed as ISO dates on every sale view;
#: one outside 1970..9999 made each of them (stats, product pages) fail with a 500.
MAX_OPENS_AT_MS = 253_402_300_799_999


def admin_token_matches(state: ServiceState, token: str) -> bool:
    """True if ``token`` is the admin token (compared in constant time)."""
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 into surrogates,
    # which a plain encode() refuses (a 500 for a garbage token).
    given = token.encode("utf-8", "surrogateescape")
    admin = state.settings.admin_token
    return bool(admin) and hmac.compare_digest(given, admin.encode())


def require_admin(request: web.Request) -> ServiceState:
    state = request.app[STATE]
    if not admin_token_matches(state, bearer(request)):
        raise ApiError(
            401, "unauthorized", "admin endpoints need 'Authorization: Bearer <FLASHSALE_ADMIN_TOKEN>'"
        )
    return state


def _int(body: dict[str, Any], name: str, default: int | None, *, low: int = 0, high: int = 10**9) -> int:
    value = body.get(name, default)
    if value is None:
        raise ApiError(422, "invalid_request", f"{name} is required", field=name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(
            422, "invalid_request", f"{name} must be a whole number from {low} to {high}", field=name
        )
    return value


def _opens_at_ms(value: Any) -> int:
    if value is None:
        return now_ms()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_OPENS_AT_MS:
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                raise ApiError(
                    422,
                    "invalid_request",
                    "opens_at needs a time zone (e.g. 2026-11-11T00:00:00+08:00)",
                    field="opens_at",
                )
            ms = int(parsed.timestamp() * 1000)
            if 0 <= ms <= MAX_OPENS_AT_MS:
                return ms
    raise ApiError(
        422,
        "invalid_request",
        "opens_at is an ISO-8601 time with zone or epoch milliseconds, from 1970 to 9999",
        field="opens_at",
    )


async def _sale_or_404(state: ServiceState, sale: str) -> SaleSettings:
    settings = await state.sales.sale(sale, fresh=True) if _SALE_ID.fullmatch(sale) else None
    if settings is None:
        raise ApiError(404, "sale_not_found", f"no sale {sale!r}")
    return settings


@routes.post("/api/admin/sales")
async def create_sale(request: web.Request) -> web.Response:
    state = require_admin(request)
    body = await read_json(request)
    sale = body.get("sale")
    if not isinstance(sale, str) or not _SALE_ID.fullmatch(sale):
        raise ApiError(422, "invalid_request", "sale is 1-32 characters of a-z, 0-9 and '-'", field="sale")
    skus = body.get("skus")
    if not isinstance(skus, list) or not 1 <= len(skus) <= MAX_SKUS_PER_SALE:
        raise ApiError(
            422, "invalid_request", f"skus is a list of 1 to {MAX_SKUS_PER_SALE} SKUs", field="skus"
        )
    settings = SaleSettings(
        sale=sale,
        opens_at_ms=_opens_at_ms(body.get("opens_at")),
        early_access_ms=_int(body, "early_access_s", 0, high=7 * 86400) * 1000,
        hold_ttl_ms=int(_number(body, "hold_ttl_s", 1800.0, low=0.05, high=7 * 86400) * 1000),
        state="open" if body.get("open") is True else "scheduled",
        buckets=_int(body, "buckets", 1, low=1, high=64),
    )
    room = room_spec(body, settings.opens_at_ms)
    if BucketedInventory.parent_of(sale) is not None:
        raise ApiError(
            422, "invalid_request", "sale ids ending in -b<number> are kept for buckets", field="sale"
        )
    if settings.buckets > 1 and len(f"{sale}-b{settings.buckets - 1}") > 32:
        raise ApiError(
            422,
            "invalid_request",
            "sale id too long to add bucket suffixes (keep it under 28 characters)",
            field="sale",
        )
    # Validate everything before the first write: a refused sale leaves nothing behind.
    specs = []
    seen = set()
    for spec in skus:
        if not isinstance(spec, dict):
            raise ApiError(422, "invalid_request", "each SKU is an object", field="skus")
        sku = spec.get("sku")
        if (
            not isinstance(sku, str)
            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", sku)
            or sku in seen
        ):
            raise ApiError(
                422,
                "invalid_request",
                "each sku is a distinct id of 1-64 characters A-Z a-z 0-9 _ -",
                field="sku",
            )
        seen.add(sku)
        stock = _int(spec, "stock", None)
        specs.append(
            (
                sku,
                stock,
                _int(spec, "reserve", 0, high=stock),
                _int(spec, "limit_per_user", 0),
                _int(spec, "low_stock_line", 0),
            )
        )
    if await state.sales.sale(sale, fresh=True) is not None:
        raise ApiError(409, "sale_exists", f"sale {sale!r} already exists")
    taken = await state.redis.hmget(state.sales.skus_key, [s[0] for s in specs])
    clash = [s[0] for s, owner in zip(specs, taken) if owner is not None]
    if clash:
        raise ApiError(
            409, "sku_taken", f"SKU(s) already on another sale: {', '.join(clash[:10])}", skus=clash[:10]
        )
    await _refuse_unretired(state, settings)
    # This creation's generation: the Redis clock now, before its first entry is written, so
    # every row of it in PostgreSQL is stamped at or after it (rows of an earlier creation
    # of the id, before: see flashsale.fence.verify).
    seconds, micros = await state.redis.time()
    settings = replace(settings, generation=int(seconds) * 1000 + int(micros) // 1000)
    inv = state.engine(settings)
    for sku, stock, reserve, limit, low in specs:
        await inv.stock(sku, stock, reserve=reserve, limit_per_user=limit, low_stock_line=low)
    if room is not None:  # before the sale exists: no order slips past a room being set up
        await waiting_room.configure_room(state, settings, room)
        settings = replace(settings, room=1)
    await state.sales.create(
        settings, [s[0] for s in specs], [part.sale for part in state.engine_parts(settings)]
    )
    return web.json_response(await _sale_json(state, settings), status=201)


async def _refuse_unretired(state: ServiceState, settings: SaleSettings) -> None:
    """A sale id may be used again (a yearly ``d11``): each creation is a generation of its
    own. Refused (409) while the earlier creation is still there: its keys in Redis, or
    its generation in the fence's record not retired (``flashsale recover --forget``) —
    a sale that Redis lost without anyone retiring it must be recovered, not replaced."""
    sale = settings.sale
    for part in state.engine_parts(settings):
        # An empty events stream is no leftover: the worker re-creates one (with its group)
        # for every sale it still lists.
        kept = [k for k in part.keys.all() if k != part.keys.events]
        if await state.redis.exists(*kept) or await state.redis.xlen(part.keys.events):
            raise ApiError(
                409,
                "sale_keys_remain",
                f"keys of an earlier creation of sale {sale!r} are still in Redis ({part.keys.tag}:*): "
                f"remove them, then run `flashsale recover --forget {sale}`, before using the id again",
                sale=sale,
            )
    if state.pg is None:
        return
    from flashsale.fence.verify import newest_record  # asyncpg-side, loaded when a sale is made

    try:
        recorded = await asyncio.wait_for(newest_record(state.pg, state.settings.key_prefix, sale), 5.0)
    except Exception as exc:  # noqa: BLE001 - PostgreSQL down or not migrated: the fence checks later
        logger.warning(
            "sale_generation_unchecked", extra={"sale": sale, "error": f"{type(exc).__name__}: {exc}"}
        )
        return
    if recorded is not None and not recorded.forgotten:
        raise ApiError(
            409,
            "sale_not_retired",
            f"sale {sale!r} was created before and its creation was never retired: if it was removed "
            f"from Redis on purpose, run `flashsale recover --forget {sale}` first; if Redis lost it, "
            "run `flashsale recover`",
            sale=sale,
        )


def _number(body: dict[str, Any], name: str, default: float, *, low: float, high: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(422, "invalid_request", f"{name} must be a number from {low} to {high}", field=name)
    return float(value)


async def _sale_json(state: ServiceState, settings: SaleSettings) -> dict[str, Any]:
    snaps = await state.engine(settings).snapshots()
    return {
        **settings.to_json(),
        "skus": {
            sku: {
                "total": s.total,
                "available": s.available,
                "held": s.held,
                "sold": s.sold,
                "reserve": s.reserve,
                "limit_per_user": s.limit_per_user,
                "low_stock_line": s.low_stock_line,
                "state": s.state.value,
            }
            for sku, s in snaps.items()
        },
    }


@routes.get("/api/admin/sales/{sale}")
async def get_sale(request: web.Request) -> web.Response:
    state = require_admin(request)
    settings = await _sale_or_404(state, request.match_info["sale"])
    return web.json_response(await _sale_json(state, settings))


@routes.post("/api/admin/sales/{sale}/open")
async def open_sale(request: web.Request) -> web.Response:
    state = require_admin(request)
    settings = await _sale_or_404(state, request.match_info["sale"])
    updated = await state.sales.update(
        settings.sale, state="open", opens_at_ms=min(settings.opens_at_ms, now_ms())
    )
    assert updated is not None
    return web.json_response(updated.to_json())


@routes.post("/api/admin/sales/{sale}/close")
async def close_sale(request: web.Request) -> web.Response:
    state = require_admin(request)
    settings = await _sale_or_404(state, request.match_info["sale"])
    updated = await state.sales.update(settings.sale, state="closed")
    assert updated is not None
    return web.json_response(updated.to_json())


async def _stock_change(request: web.Request, *, release: bool) -> web.Response:
    state = require_admin(request)
    settings = await _sale_or_404(state, request.match_info["sale"])
    sku = request.match_info["sku"]
    body = await read_json(request) if request.can_read_body else {}
    inv = state.engine(settings)
    if release:
        units = body.get("units")
        snap = await inv.release_reserve(sku, None if units is None else _int(body, "units", None, low=1))
    else:
        snap = await inv.restock(sku, _int(body, "units", None, low=1))
    await state.sales.bump_epoch(settings.sale)
    state.sold_out.forget(settings.sale)
    state.sku_cache.pop(sku, None)
    return web.json_response(
        {
            "sku": sku,
            "total": snap.total,
            "available": snap.available,
            "held": snap.held,
            "sold": snap.sold,
            "reserve": snap.reserve,
            "state": snap.state.value,
        }
    )


@routes.post("/api/admin/sales/{sale}/skus/{sku}/restock")
async def restock(request: web.Request) -> web.Response:
    return await _stock_change(request, release=False)


@routes.post("/api/admin/sales/{sale}/skus/{sku}/release-reserve")
async def release_reserve(request: web.Request) -> web.Response:
    return await _stock_change(request, release=True)


@routes.get("/api/admin/switches")
async def get_switches(request: web.Request) -> web.Response:
    state = require_admin(request)
    return web.json_response(await state.sales.switches())


@routes.post("/api/admin/switches")
async def set_switches(request: web.Request) -> web.Response:
    state = require_admin(request)
    body = await read_json(request)
    unknown = set(body) - set(SWITCHES)
    if unknown or not all(isinstance(v, bool) for v in body.values()):
        raise ApiError(
            422, "invalid_request", f"switches are {', '.join(SWITCHES)}, each true (on) or false (off)"
        )
    return web.json_response(await state.sales.set_switches(body))


@routes.post("/api/admin/tokens")
async def mint_tokens(request: web.Request) -> web.Response:
    state = require_admin(request)
    body = await read_json(request)
    ttl_s = _int(body, "ttl_s", 3600, low=1, high=7 * 86400)
    member = body.get("member", False)
    if not isinstance(member, bool):
        raise ApiError(422, "invalid_request", "member is true or false", field="member")
    if "users" in body:
        users = body["users"]
        if (
            not isinstance(users, list)
            or not 1 <= len(users) <= MAX_TOKENS_PER_CALL
            or not all(isinstance(u, str) for u in users)
        ):
            raise ApiError(
                422,
                "invalid_request",
                f"users is a list of 1 to {MAX_TOKENS_PER_CALL} user ids",
                field="users",
            )
    else:
        prefix = body.get("prefix", "u")
        count = _int(body, "count", None, low=1, high=MAX_TOKENS_PER_CALL)
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", prefix):
            raise ApiError(
                422, "invalid_request", "prefix is 1-41 characters of A-Z a-z 0-9 _ -", field="prefix"
            )
        users = [f"{prefix}{i}" for i in range(count)]
    try:
        tokens = {u: mint(state.settings.token_secret, u, ttl_s=ttl_s, member=member) for u in users}
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc), field="users") from None
    return web.json_response({"tokens": tokens, "expires_in_s": ttl_s})


@routes.get("/api/admin/stats")
async def stats(request: web.Request) -> web.Response:
    state = require_admin(request)
    return web.json_response(await collect_stats(state))


async def collect_stats(state: ServiceState) -> dict[str, Any]:
    """Live numbers of the whole deployment: every process's counters, every sale's stock."""
    prefix = state.settings.key_prefix
    redis = state.redis
    published = await sum_published(redis, prefix)
    counts, p50, p99 = published.counts, published.p50_ms, published.p99_ms
    processes, in_flight = published.processes, published.in_flight
    if published.stale:
        await redis.srem(ServiceKeys(prefix).stats_procs, *published.stale)
    sales = {}
    for sale in await state.sales.all_sales():
        settings = await state.sales.sale(sale)
        if settings is None:
            continue
        parts = state.engine_parts(settings)
        sales[sale] = {
            **await _sale_json(state, settings),
            "holds_pending": sum([int(await redis.zcard(p.keys.deadlines)) for p in parts]),
            "backlog": sum([await stream_backlog(redis, p.keys.events) for p in parts]),
            "dead_letters": sum([int(await redis.xlen(p.keys.tag + ":dead")) for p in parts]),
        }
    writer_raw = await redis.hgetall(ServiceKeys(prefix).writer_stats)
    writer = {k.decode(): _num(v) for k, v in writer_raw.items()}
    return {
        "at": time.time(),
        "processes": processes,
        "orders": counts,
        "latency_ms": {"p50": p50, "p99": p99},
        "in_flight": in_flight,
        "sales": sales,
        "writer": writer,
    }


def _num(raw: bytes) -> float | str:
    text = raw.decode()
    try:
        return float(text)
    except ValueError:
        return text


@routes.post("/api/admin/audit")
async def audit(request: web.Request) -> web.Response:
    state = require_admin(request)
    body = await read_json(request) if request.can_read_body else {}
    acknowledged = body.get("acknowledged", [])
    if not isinstance(acknowledged, list) or not all(
        isinstance(o, str) and _ORDER_ID.fullmatch(o) for o in acknowledged
    ):
        # An id PostgreSQL cannot even compare (a NUL in it) made the audit a 500.
        raise ApiError(
            422,
            "invalid_request",
            "acknowledged is a list of order ids (1-100 characters of A-Z a-z 0-9 _ . @ -)",
            field="acknowledged",
        )
    wait_s = _number(body, "wait_s", 30.0, low=0, high=600)
    if state.pg is None:
        raise ApiError(
            409, "no_database", "the audit compares Redis with PostgreSQL; set FLASHSALE_DATABASE_URL"
        )
    from flashsale.pipeline.audit import run_audit  # the audit needs asyncpg; only loaded when asked

    report = await run_audit(
        state.redis,
        state.pg,
        prefix=state.settings.key_prefix,
        acknowledged=acknowledged,
        wait_drain_s=wait_s,
    )
    return web.json_response(report.to_json())
