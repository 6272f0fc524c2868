"""The war room: the live page operators watch during a sale (``GET /warroom``), the one
data endpoint it polls every second (``GET /api/admin/warroom``), the running scenario's
target curve, the alert thresholds, and the operator controls — every control pressed
through the war room is recorded in Redis and in PostgreSQL (the operator log).

Everything sits behind the admin token. A browser cannot set headers on navigation, so
the page itself also takes the token as ``?token=``; the page keeps it in
sessionStorage and sends it as a Bearer header on every call it makes.

Nothing here runs in the background: the history of per-second numbers is sampled when
someone asks for the page's data (whichever service process answers), so it exists from
the moment the first viewer opened the page or a rehearsal registered its target.

Redis keys (service-only, outside every sale's hash slot). They share one hash tag, so
the transactions over several of them (a sample and its progress point, a logged press
and its outbox entry) stay in one slot on a Redis Cluster:

``{<prefix>:warroom}:history``         list    one JSON sample per stats publish, newest first
``{<prefix>:warroom}:progress``        list    ``<t_ms>:<orders created>`` every 5 s, oldest first
``{<prefix>:warroom}:sampled:<t_ms>``  string  claim on one publish (SET NX, expires in a minute)
``{<prefix>:warroom}:stockouts``       hash    ``<sale>/<sku>`` -> JSON ``{"in", "at_ms", "exact",
                                               "first_ms"}``: in stock, or when seen sold out
``{<prefix>:warroom}:target``          string  JSON target curve of the running scenario
``{<prefix>:warroom}:log``             list    operator log entries (JSON), newest first, capped
``{<prefix>:warroom}:log:unwritten``   list    entries not yet in PostgreSQL (the outbox)
``{<prefix>:warroom}:log:refused``     list    entries PostgreSQL refused for good (kept, not lost)
``{<prefix>:warroom}:log:pg_error``    string  why the outbox is not draining (cleared on success)
``{<prefix>:warroom}:log:flushing``    string  short lock: one process drains the outbox at a time
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web
from redis.exceptions import RedisError

import inventory
from flashsale.keys import ServiceKeys
from flashsale.service import admin_api
from flashsale.service.admin_api import admin_token_matches, collect_stats, require_admin
from flashsale.service.errors import ApiError, status_for
from flashsale.service.http import read_json
from flashsale.service.metrics import OUTCOMES, read_published
from flashsale.service.sales import now_ms
from flashsale.service.state import STATE, ServiceState

__all__ = [
    "AlertThresholds",
    "OUTCOME_GROUPS",
    "error_ratio",
    "openapi_paths",
    "rate_series",
    "routes",
    "warroom_url",
]

log = logging.getLogger("flashsale.warroom")

routes = web.RouteTableDef()

#: How the page groups the service's order outcomes (metrics.OUTCOMES) into chart lines.
OUTCOME_GROUPS: dict[str, tuple[str, ...]] = {
    "created": ("created",),
    "sold_out": ("sold_out",),
    "limited": ("limit_exceeded", "rate_limited"),
    "shed": ("shed",),
    "unknown": ("unknown",),
    "other": ("replayed", "not_open", "invalid", "fenced"),
}
#: Answers that mean the service failed the buyer (not a refusal it meant to give).
ERROR_OUTCOMES = ("shed", "unknown", "fenced")

HISTORY_MAX = 3600  # samples kept in Redis (one per stats publish: an hour for one process)
HISTORY_WINDOW_MS = 300_000  # what the page gets: the last five minutes
PROGRESS_EVERY_MS = 5_000  # orders created, kept coarser and longer for the target chart
PROGRESS_MAX = 1440  # two hours of it
RATE_WINDOW_MS = 2_000  # orders/s over at least this long, so one late publish does not spike
ERROR_WINDOW_MS = 10_000  # the error ratio's window
LAPSING_MS = 60_000  # "lapsing": holds whose payment deadline falls within this
LOG_MAX = 1000  # operator log entries kept in Redis (PostgreSQL keeps them all)
LOG_SHOWN = 20
MAX_TARGET_POINTS = 10_000
PG_TIMEOUT_S = 2.0
FLUSH_EVERY_MS = 5_000

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
        return {"backlog": self.backlog, "p99_ms": self.p99_ms, "error_ratio": self.error_ratio}


# --------------------------------------------------------------------------- history


def _keys(prefix: str) -> dict[str, str]:
    key = ServiceKeys(prefix).warroom  # one hash tag: one slot (see the module docstring)
    return {
        "history": key("history"),
        "progress": key("progress"),
        "sampled": key("sampled"),
        "stockouts": key("stockouts"),
        "target": key("target"),
        "log": key("log"),
        "unwritten": key("log:unwritten"),
        "refused": key("log:refused"),
        "pg_error": key("log:pg_error"),
        "flushing": key("log:flushing"),
    }


async def _published(state: ServiceState) -> dict[str, Any] | None:
    """Every process's last published counters, each read with its own publish time so the
    counts and their time agree (collect_stats reads them too, but a sample needs the
    publish time: the rate is counts over the time between publishes, not between page
    polls)."""
    values = [raw for _key, raw in await read_published(state.redis, state.settings.key_prefix)]
    counts = dict.fromkeys(OUTCOMES, 0)
    at = 0.0
    p50 = p99 = 0.0
    seen = 0
    for raw in values:
        if raw is None:
            continue
        proc = json.loads(raw)
        seen += 1
        at = max(at, float(proc["at"]))
        for outcome, n in proc["counts"].items():
            counts[outcome] = counts.get(outcome, 0) + int(n)
        if proc["latency"]["n"]:
            p50 = max(p50, float(proc["latency"]["p50_ms"]))
            p99 = max(p99, float(proc["latency"]["p99_ms"]))
    if not seen:
        return None
    return {"t": int(at * 1000), "o": counts, "p50": p50, "p99": p99}


async def _sample(state: ServiceState, stats: dict[str, Any]) -> None:
    """Add a sample when a process published since the newest one. Viewers and processes
    poll concurrently: a publish is claimed with SET NX first, so only one of them
    records it (reading the newest sample and then pushing would race)."""
    published = await _published(state)
    if published is None:
        return
    keys = _keys(state.settings.key_prefix)
    key = keys["history"]
    async with state.redis.pipeline(transaction=False) as pipe:
        pipe.lindex(key, 0)
        pipe.lindex(keys["progress"], -1)
        newest, last_progress = await pipe.execute()
    if newest is not None and json.loads(newest)["t"] >= published["t"]:
        return
    if not await state.redis.set(f"{keys['sampled']}:{published['t']}", 1, nx=True, px=60_000):
        return
    sales = stats["sales"].values()
    published.update(
        bl=sum(int(s["backlog"]) for s in sales),
        dl=sum(int(s["dead_letters"]) for s in sales),
        hp=sum(int(s["holds_pending"]) for s in sales),
        wr=int(float(stats["writer"].get("entries_total", 0) or 0)),
    )
    progress_due = (
        last_progress is None or int(last_progress.split(b":")[0]) + PROGRESS_EVERY_MS <= published["t"]
    )
    async with state.redis.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(published, separators=(",", ":")))
        pipe.ltrim(key, 0, HISTORY_MAX - 1)
        if progress_due:
            pipe.rpush(keys["progress"], f"{published['t']}:{published['o']['created']}")
            pipe.ltrim(keys["progress"], -PROGRESS_MAX, -1)
        await pipe.execute()


async def _history(state: ServiceState, since_ms: int, processes: int) -> list[dict[str, Any]]:
    """Samples newer than ``since_ms``, oldest first, strictly increasing in time. Reads
    only about as many as the window can hold (one per process per second)."""
    wanted = min(HISTORY_MAX, max(1, processes) * (HISTORY_WINDOW_MS // 1000 + 10))
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["history"], 0, wanted - 1)
    out: list[dict[str, Any]] = []
    for item in reversed(raw):
        sample = json.loads(item)
        if sample["t"] < since_ms or (out and sample["t"] <= out[-1]["t"]):
            continue
        out.append(sample)
    return out


def _group_total(sample: dict[str, Any], outcomes: Sequence[str]) -> int:
    return sum(int(sample["o"].get(o, 0)) for o in outcomes)


def _window_start(samples: Sequence[dict[str, Any]], i: int, window_ms: int) -> int | None:
    """Index of the newest sample at least ``window_ms`` older than sample ``i``."""
    t = samples[i]["t"] - window_ms
    for j in range(i - 1, -1, -1):
        if samples[j]["t"] <= t:
            return j
    return None


def rate_series(
    samples: Sequence[dict[str, Any]],
    value: Callable[[dict[str, Any]], float],
    window_ms: int = RATE_WINDOW_MS,
) -> list[float | None]:
    """Per-second rate of a cumulative counter at each sample, over at least ``window_ms``
    (None until there is that much history). A counter that went down (a process
    restarted and its count began again) counts as no change, never as a negative rate."""
    out: list[float | None] = []
    for i in range(len(samples)):
        j = _window_start(samples, i, window_ms)
        if j is None:
            out.append(None)
            continue
        dt = (samples[i]["t"] - samples[j]["t"]) / 1000
        out.append(round(max(0.0, value(samples[i]) - value(samples[j])) / dt, 3))
    return out


def error_ratio(samples: Sequence[dict[str, Any]], window_ms: int = ERROR_WINDOW_MS) -> float:
    """Share of order answers in the last ``window_ms`` that were errors (shed, unknown,
    fenced): 0.0 with no answers. Uses the oldest sample when history is shorter."""
    if len(samples) < 2:
        return 0.0
    last = len(samples) - 1
    first = _window_start(samples, last, window_ms)
    first = 0 if first is None else first
    answers = _group_total(samples[last], OUTCOMES) - _group_total(samples[first], OUTCOMES)
    errors = _group_total(samples[last], ERROR_OUTCOMES) - _group_total(samples[first], ERROR_OUTCOMES)
    if answers <= 0:
        return 0.0
    return round(max(0, errors) / answers, 4)


def _history_json(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "window_ms": HISTORY_WINDOW_MS,
        "t_ms": [s["t"] for s in samples],
        "rates": {
            group: rate_series(samples, lambda s, g=outcomes: _group_total(s, g))  # type: ignore[misc]
            for group, outcomes in OUTCOME_GROUPS.items()
        },
        "created_total": [int(s["o"].get("created", 0)) for s in samples],
        "p50_ms": [s["p50"] for s in samples],
        "p99_ms": [s["p99"] for s in samples],
        "backlog": [s.get("bl", 0) for s in samples],
        "writer_rate": rate_series(samples, lambda s: float(s.get("wr", 0)), window_ms=5_000),
    }


# --------------------------------------------------------------------------- sold-out moments


async def _stockouts(state: ServiceState, sales: dict[str, Any], now: int) -> dict[str, dict[str, Any]]:
    """When each SKU sold out: ``at_ms`` the latest time (None while it is in stock again
    after a restock, a reserve release or lapsed holds), ``first_ms`` the first time.
    Exact to the page's refresh when the SKU was seen in stock before (``exact``); only
    "by then" when it was already sold out when first watched."""
    key = _keys(state.settings.key_prefix)["stockouts"]
    known = {k.decode(): json.loads(v) for k, v in (await state.redis.hgetall(key)).items()}
    changes: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    for sale, info in sales.items():
        for sku, snap in info["skus"].items():
            field = f"{sale}/{sku}"
            seen = known.get(field)
            if snap["available"] > 0:
                moment = {
                    "in": True,
                    "at_ms": None,
                    "exact": None,
                    "first_ms": seen["first_ms"] if seen else None,
                }
            elif seen is None or seen["in"]:
                first = seen["first_ms"] if seen and seen["first_ms"] else now
                moment = {"in": False, "at_ms": now, "exact": seen is not None, "first_ms": first}
            else:
                moment = seen
            if moment != seen:
                changes[field] = json.dumps(moment)
            out[field] = moment
    if changes:
        await state.redis.hset(key, mapping=changes)
    return out


# --------------------------------------------------------------------------- target curve


def _interpolate(points: Sequence[Sequence[float]], t: float) -> float:
    """The target at ``t`` (points go forward in time): 0 before the first point, the
    last value after the last one, a straight line in between."""
    if t < points[0][0]:
        return 0.0
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t <= t1:
            return float(v0) + (float(v1) - float(v0)) * (t - t0) / (t1 - t0)
    return float(points[-1][1])


def _parse_points(value: Any) -> list[list[float]]:
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_TARGET_POINTS:
        raise ApiError(
            422,
            "invalid_request",
            f"points is a list of 2 to {MAX_TARGET_POINTS} [t_ms, cumulative_orders] pairs",
            field="points",
        )
    points: list[list[float]] = []
    for p in value:
        ok = (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in p)
        )
        if not ok:
            raise ApiError(
                422, "invalid_request", "each point is [t_ms, cumulative_orders], two numbers", field="points"
            )
        t, v = p
        if not -86_400_000 <= t <= 30 * 86_400_000 or not 0 <= v <= 1e12:
            raise ApiError(
                422,
                "invalid_request",
                "t_ms is within a day before to 30 days after the origin; orders are 0 to 1e12",
                field="points",
            )
        if points and (t <= points[-1][0] or v < points[-1][1]):
            raise ApiError(
                422,
                "invalid_request",
                "points go forward in time and the cumulative orders never go down",
                field="points",
            )
        points.append([t, v])
    return points


def _target_json(target: dict[str, Any] | None, created_total: int, now: int) -> dict[str, Any] | None:
    if target is None:
        return None
    elapsed = now - target["origin_ms"]
    expected = _interpolate(target["points"], elapsed)
    actual = max(0, created_total - target["baseline_created"])
    return {
        **target,
        "elapsed_ms": elapsed,
        "expected_now": round(expected, 1),
        "actual_now": actual,
        "ratio": round(actual / expected, 3) if expected > 0 else None,
    }


async def _progress(
    state: ServiceState, target: dict[str, Any] | None, sales: dict[str, Any], created_now: int, now: int
) -> dict[str, Any] | None:
    """Orders created since the origin — the target's, else the T0 of the sale that opens
    first among those not closed — as [ms since origin, orders] points for the chart.
    With a target, counting starts when it was registered (at 0 orders, by definition)."""
    if target is not None:
        origin, baseline = int(target["origin_ms"]), int(target["baseline_created"])
        start = int(target["registered_at_ms"]) - origin
    else:
        live = [s["opens_at_ms"] for s in sales.values() if s["state"] != "closed"]
        if not live:
            return None
        origin, baseline, start = min(live), 0, 0
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["progress"], 0, PROGRESS_MAX - 1)
    points: list[list[int]] = [[start, baseline]] if target is not None else []
    for item in raw:
        t, created = (int(x) for x in item.split(b":"))
        if t - origin <= start and target is None:
            baseline = created  # the count at T0: earlier sales' orders are not this one's
        if t - origin > start:
            points.append([t - origin, created])
    points.append([now - origin, created_now])
    return {
        "origin_ms": origin,
        "baseline": baseline,
        "points": [[t, max(0, c - baseline)] for t, c in points],
    }


async def _target(state: ServiceState) -> dict[str, Any] | None:
    raw = await state.redis.get(_keys(state.settings.key_prefix)["target"])
    return None if raw is None else dict(json.loads(raw))


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
    points = _parse_points(body.get("points"))
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
    published = await _published(state)
    target = {
        "scenario": scenario,
        "sale": sale,
        "origin_ms": origin,
        "points": points,
        "baseline_created": int(published["o"]["created"]) if published else 0,
        "registered_at_ms": now_ms(),
    }
    await state.redis.set(_keys(state.settings.key_prefix)["target"], json.dumps(target))
    return web.json_response(target)


@routes.get("/api/admin/warroom/target")
async def get_target(request: web.Request) -> web.Response:
    state = require_admin(request)
    target = await _target(state)
    if target is None:
        raise ApiError(404, "no_target", "no target curve registered: PUT /api/admin/warroom/target")
    return web.json_response(target)


@routes.delete("/api/admin/warroom/target")
async def delete_target(request: web.Request) -> web.Response:
    state = require_admin(request)
    deleted = await state.redis.delete(_keys(state.settings.key_prefix)["target"])
    return web.json_response({"deleted": bool(deleted)})


# --------------------------------------------------------------------------- operator log


def _clean(value: Any) -> Any:
    """PostgreSQL text and jsonb refuse NUL: strip it anywhere in an entry, so a hostile
    header or body can never wedge the outbox."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _header_text(request: web.Request, name: str, limit: int) -> str:
    """A percent-encoded header (the page sends names and notes with encodeURIComponent)."""
    raw = request.headers.get(name, "")
    text = unquote(raw, errors="replace")
    if len(text) > limit or not text.isprintable():
        raise ApiError(
            422,
            "invalid_request",
            f"{name} is at most {limit} printable characters, percent-encoded",
            field=name,
        )
    return text


async def _insert(state: ServiceState, entry: dict[str, Any]) -> None:
    await state.pg.execute(
        """
        INSERT INTO operator_log
            (entry_id, at, operator, action, sale, sku, params, status, outcome, result, note, remote, user_agent)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10::jsonb, $11, $12, $13)
        ON CONFLICT (entry_id) DO NOTHING
        """,
        entry["id"],
        datetime.fromtimestamp(entry["at_ms"] / 1000, UTC),
        entry["operator"],
        entry["action"],
        entry["sale"],
        entry["sku"],
        json.dumps(entry["params"]),
        entry["status"],
        entry["outcome"],
        None if entry["result"] is None else json.dumps(entry["result"]),
        entry["note"],
        entry["remote"],
        entry["user_agent"],
        timeout=PG_TIMEOUT_S,
    )


def _refused_for_good(exc: BaseException) -> bool:
    """True when retrying cannot help: the entry itself is bad (PostgreSQL refused the row,
    or it cannot even be encoded). A missing table is not that — the migrations have not
    run yet and the entry waits for them — nor is an outage."""
    import asyncpg

    from flashsale.pgpool import is_transient

    if isinstance(exc, asyncpg.exceptions.UndefinedTableError) or is_transient(exc):
        return False
    return isinstance(exc, (asyncpg.PostgresError, ValueError, KeyError, TypeError))


async def flush_outbox(state: ServiceState, limit: int = 200) -> int:
    """Write waiting operator-log entries to PostgreSQL; return how many are still waiting.
    An entry leaves the outbox only after its row is committed (or PostgreSQL refused it
    for good: it then moves to the refused list, and the error is logged)."""
    keys = _keys(state.settings.key_prefix)
    redis = state.redis
    waiting = await redis.lrange(keys["unwritten"], 0, limit - 1)
    for raw in waiting:
        try:
            await _insert(state, json.loads(raw))
        except Exception as exc:  # noqa: BLE001 — classified just below
            if not _refused_for_good(exc):
                await redis.set(keys["pg_error"], f"{type(exc).__name__}: {exc}"[:300])
                break
            log.error("operator log entry refused by PostgreSQL, kept in %s: %s", keys["refused"], exc)
            async with redis.pipeline(transaction=True) as pipe:
                pipe.rpush(keys["refused"], raw)
                pipe.lrem(keys["unwritten"], 1, raw)
                await pipe.execute()
            continue
        await redis.lrem(keys["unwritten"], 1, raw)
    else:
        await redis.delete(keys["pg_error"])
    return int(await redis.llen(keys["unwritten"]))


async def record(state: ServiceState, entry: dict[str, Any]) -> str:
    """Log one control press: Redis first (the page's log and the outbox, one
    transaction), then PostgreSQL. Returns where it stands in PostgreSQL: ``written``,
    ``pending`` (in the outbox, written when PostgreSQL and the migrations are there) or
    ``no_database``."""
    entry = _clean(entry)
    keys = _keys(state.settings.key_prefix)
    raw = json.dumps(entry, separators=(",", ":"))
    in_redis = True
    try:
        async with state.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(keys["log"], raw)
            pipe.ltrim(keys["log"], 0, LOG_MAX - 1)
            if state.pg is not None:
                pipe.rpush(keys["unwritten"], raw)
            await pipe.execute()
    except RedisError as exc:
        in_redis = False
        log.error("operator log: Redis did not take entry %s (%s): %s", entry["id"], exc, raw)
    if state.pg is None:
        return "no_database"
    if not in_redis:  # no outbox to retry from: one direct attempt
        try:
            await _insert(state, entry)
            return "written"
        except Exception as exc:  # noqa: BLE001
            log.error(
                "operator log entry %s reached neither Redis nor PostgreSQL (%s): %s", entry["id"], exc, raw
            )
            return "lost"
    try:
        await flush_outbox(state)
        still = await state.redis.lpos(keys["unwritten"], raw)
    except RedisError:
        return "pending"
    return "pending" if still is not None else "written"


async def _log_json(state: ServiceState) -> dict[str, Any]:
    keys = _keys(state.settings.key_prefix)
    async with state.redis.pipeline(transaction=False) as pipe:
        pipe.lrange(keys["log"], 0, LOG_SHOWN - 1)
        pipe.llen(keys["unwritten"])
        pipe.get(keys["pg_error"])
        pipe.llen(keys["refused"])
        entries, unwritten, pg_error, refused = await pipe.execute()
    if state.pg is None:
        postgres = "no_database"
    elif unwritten:
        postgres = "pending"
    else:
        postgres = "ok"
    return {
        "entries": [json.loads(e) for e in entries],
        "unwritten": int(unwritten),
        "refused": int(refused),
        "postgres": postgres,
        "postgres_error": pg_error.decode() if pg_error else None,
    }


async def _maybe_flush(state: ServiceState) -> None:
    """Retry the outbox now and then while the page is watched (at most one process every
    few seconds, so a PostgreSQL outage is not hammered)."""
    if state.pg is None:
        return
    keys = _keys(state.settings.key_prefix)
    if not await state.redis.llen(keys["unwritten"]):
        return
    if await state.redis.set(keys["flushing"], "1", nx=True, px=FLUSH_EVERY_MS):
        await flush_outbox(state)


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
        operator = _header_text(request, "X-Operator", 64) or "anonymous"
        note = _header_text(request, "X-Operator-Note", 500)

        async def log_press(status: int, outcome: str, result: Any) -> tuple[str, str]:
            at = now_ms()
            entry = {
                "id": f"{at:013d}-{uuid.uuid4().hex[:12]}",
                "at_ms": at,
                "operator": operator,
                "action": action,
                "sale": request.match_info.get("sale"),
                "sku": request.match_info.get("sku"),
                "params": await _params(request),
                "status": status,
                "outcome": outcome,
                "result": result,
                "note": note,
                "remote": request.remote,
                "user_agent": request.headers.get("User-Agent", "")[:200],
            }
            return entry["id"], await record(state, entry)

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


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON a browser can read")


#: Deepest JSON kept as it is in the log; deeper bodies are kept as text (recursing over a
#: body nested thousands deep failed the log after the action had been applied).
PARAMS_MAX_DEPTH = 32


def _depth(value: Any) -> int:
    """How deep ``value`` nests (iterative: no recursion for a hostile body to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


async def _params(request: web.Request) -> dict[str, Any]:
    """What the operator asked for: the body the handler already read (aiohttp keeps it).
    Anything but a small, shallow, plain JSON object is kept as text, so the log stays JSON
    that PostgreSQL and a browser accept (no NaN or Infinity). Never raises: the press is
    logged whatever its body was."""
    try:
        raw = await request.read()
    except web.HTTPException:
        return {"unreadable": "body too large"}
    except Exception:  # noqa: BLE001 - a body aiohttp could not take apart (encoding, framing)
        return {"unreadable": "body not readable"}
    if not raw:
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constants) if len(raw) <= 4096 else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict) and _depth(body) <= PARAMS_MAX_DEPTH:
        return body
    return {"unreadable": raw[:200].decode("utf-8", "replace")}


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
async def operator_log(request: web.Request) -> web.Response:
    """The operator log as Redis keeps it (newest first, last LOG_MAX entries)."""
    state = require_admin(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= LOG_MAX:
        raise ApiError(422, "invalid_request", f"limit is 1 to {LOG_MAX}", field="limit")
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["log"], 0, limit - 1)
    return web.json_response({"entries": [json.loads(e) for e in raw]})


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


def _phase(sale: dict[str, Any], now: int) -> str:
    if sale["fenced"]:
        return "fenced"
    if sale["state"] == "closed":
        return "closed"
    if sale["state"] == "open" or now >= sale["opens_at_ms"]:
        return "open"
    return "countdown"


def _alerts(
    stats: dict[str, Any], ratio: float, thresholds: AlertThresholds
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
    }
    reasons = []
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
    await _sample(state, stats)
    now = now_ms()
    samples = await _history(state, now - HISTORY_WINDOW_MS, int(stats["processes"]))
    stockouts = await _stockouts(state, stats["sales"], now)
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
    ratio = error_ratio(samples)
    alerts, reasons = _alerts(stats, ratio, thresholds)
    history = _history_json(samples)
    rates_now = {
        group: next((v for v in reversed(series) if v is not None), 0.0)
        for group, series in history["rates"].items()
    }
    await _maybe_flush(state)
    target = await _target(state)
    created_now = int(stats["orders"].get("created", 0))
    body = {
        **stats,
        "now_ms": now,
        "sales": sales,
        "switches": await state.sales.switches(),
        "history": history,
        "rates_now": rates_now,
        "error_ratio": ratio,
        "target": _target_json(target, created_now, now),
        "progress": await _progress(state, target, stats["sales"], created_now, now),
        "thresholds": thresholds.to_json(),
        "alerts": alerts,
        "health": {"status": "alert" if reasons else "healthy", "reasons": reasons},
        "log": await _log_json(state),
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
                        "schema": {"type": "integer", "minimum": 1, "maximum": LOG_MAX},
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
