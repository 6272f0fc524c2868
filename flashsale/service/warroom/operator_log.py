"""The operator log: every control pressed in the war room — who, when, what was asked,
the answer — kept in Redis at once and written to PostgreSQL (table ``operator_log``)
through an outbox in Redis, so an outage or a database the migrations have not reached
yet delays an entry, never loses it.

Redis keys (``flashsale.keys.ServiceKeys.warroom``: one hash tag, so a logged press and its
outbox entry are written in one transaction, also on a Redis Cluster):

``{<prefix>:warroom}:log``             list    operator log entries (JSON), newest first, capped
``{<prefix>:warroom}:log:unwritten``   list    entries not yet in PostgreSQL (the outbox)
``{<prefix>:warroom}:log:refused``     list    entries PostgreSQL refused for good (kept, not lost)
``{<prefix>:warroom}:log:pg_error``    string  why the outbox is not draining (cleared on success)
``{<prefix>:warroom}:log:flushing``    string  short lock: one process drains the outbox at a time
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from redis.exceptions import RedisError

from flashsale.keys import ServiceKeys
from flashsale.service.errors import ApiError
from flashsale.service.state import ServiceState

__all__ = [
    "FLUSH_EVERY_MS",
    "LOG_MAX",
    "entries",
    "flush_outbox",
    "header_text",
    "log_json",
    "maybe_flush",
    "params",
    "record",
]

log = logging.getLogger("flashsale.warroom")

LOG_MAX = 1000  # operator log entries kept in Redis (PostgreSQL keeps them all)
LOG_SHOWN = 20
PG_TIMEOUT_S = 2.0
FLUSH_EVERY_MS = 5_000


def _keys(prefix: str) -> dict[str, str]:
    """``log`` and ``log:<name>`` for the outbox and its state."""
    key = ServiceKeys(prefix).warroom
    return {"log": key("log")} | {
        n: key(f"log:{n}") for n in ("unwritten", "refused", "pg_error", "flushing")
    }


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


def header_text(request: web.Request, name: str, limit: int) -> str:
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


async def log_json(state: ServiceState) -> dict[str, Any]:
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


async def maybe_flush(state: ServiceState) -> None:
    """Retry the outbox now and then while the page is watched (at most one process every
    few seconds, so a PostgreSQL outage is not hammered)."""
    if state.pg is None:
        return
    keys = _keys(state.settings.key_prefix)
    if not await state.redis.llen(keys["unwritten"]):
        return
    if await state.redis.set(keys["flushing"], "1", nx=True, px=FLUSH_EVERY_MS):
        await flush_outbox(state)


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


async def params(request: web.Request) -> dict[str, Any]:
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


async def entries(state: ServiceState, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` entries as Redis keeps them (newest first)."""
    raw = await state.redis.lrange(_keys(state.settings.key_prefix)["log"], 0, limit - 1)
    return [json.loads(e) for e in raw]
