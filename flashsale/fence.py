"""The fence: sales stop when Redis comes back without its data or with older data, and
stay stopped until ``flashsale recover`` has rebuilt the stock from PostgreSQL.

Why: Redis decides, PostgreSQL remembers. If Redis loses acknowledged writes (restarted
without its AOF, wiped, failed over to a lagging replica) while their orders already
reached PostgreSQL, Redis's counters say more units are available than really are —
selling on would oversell. The fence notices and refuses; :mod:`flashsale.recovery`
rebuilds.

How a loss is noticed (:func:`verify`). PostgreSQL is read first, then Redis: everything
in PostgreSQL came from Redis's streams, so an intact Redis is never behind what was read
first, and any of these means Redis went back in time:

* the **lineage marker** ``<prefix>:lineage`` (a token also recorded in PostgreSQL) is
  missing or different: Redis came back empty, or it is another dataset;
* a sale PostgreSQL has stock events for has **no stock** in Redis: the sale was lost;
* Redis has **fewer hold records** than PostgreSQL has orders for the sale (Redis never
  deletes a hold);
* Redis counts **fewer units sold** of a SKU than PostgreSQL has in paid orders (a sold
  counter never goes down);
* the sale stream's **last generated id** is older than the newest one PostgreSQL has
  committed (compared to the millisecond).

Where it runs. :class:`FenceGuard` lives in every service process (:func:`install`):

* at start-up it verifies before the process takes a request;
* it hooks the service's Redis client so that every **new connection** first learns the
  server's ``run_id``; a server it has not verified (a restart, a failover) is verified
  before the connection is used. Meanwhile, order, pay and cancel requests are answered
  503 ``sale_fenced`` ("verifying"), so nothing is sold from a Redis nobody has checked;
* a loss **fences** the sale: the sale's settings hash gets ``fenced = <reason>`` (every
  process, even one without the guard, then answers 503 ``sale_fenced``), the sale is put
  back in the SKU index so buyers get that answer rather than "unknown SKU", the event is
  logged in ``fence_log``, and the process keeps its own flag — which holds even if the
  settings hash vanishes again. Connections to the bad server are refused for a short
  grace so requests that were already past the check cannot reserve on it;
* every half second it polls the server's run id (an idle process also notices a
  restart), re-verifies while a fence stands, lifts its flag once ``flashsale recover``
  cleared the sale's ``fenced`` field and the data verifies, and records every sale's
  settings and SKUs in ``fence_sales`` (what recovery needs if Redis loses them too).

The order writer needs no guard: every write it makes is idempotent and a status only
moves up, so replaying an older stream into PostgreSQL changes nothing; recovery drains
the stream itself before rebuilding (see :mod:`flashsale.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from inventory import SaleKeys
from inventory._buckets import bucket_sale_id, parent_sale_id

from .errors import ApiError

__all__ = [
    "GUARD",
    "FenceGuard",
    "FenceUnavailable",
    "Loss",
    "SaleRecord",
    "Verdict",
    "ensure_lineage",
    "install",
    "lineage_key",
    "load_registry",
    "log_fence",
    "raise_fence",
    "record_sales",
    "verify",
]

logger = logging.getLogger("flashsale.fence")

#: Settings fields kept in ``fence_sales`` (the live ones, ``fenced`` and ``epoch``, are not).
_SETTINGS_FIELDS = ("opens_at_ms", "early_access_ms", "hold_ttl_ms", "state", "buckets")
_ORDER_PATHS = ("/pay", "/cancel")


class FenceUnavailable(RuntimeError):
    """PostgreSQL lacks the fence's tables (run ``flashsale migrate``)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lineage_key(prefix: str) -> str:
    return f"{prefix}:lineage"


def _sale_key(prefix: str, sale: str) -> str:
    return f"{prefix}:sale:{sale}"


def _stream_ms(stream_id: str | None) -> int:
    return int(stream_id.partition("-")[0]) if stream_id else 0


@dataclass(frozen=True, slots=True)
class SaleRecord:
    """A sale as ``fence_sales`` remembers it."""

    sale: str
    settings: dict[str, Any]
    skus: tuple[str, ...]
    forgotten: bool = False

    @property
    def buckets(self) -> int:
        return int(self.settings.get("buckets", 1) or 1)

    @property
    def engine_sales(self) -> list[str]:
        """The sale ids whose keys and streams hold the stock: the sale, or its buckets."""
        if self.buckets <= 1:
            return [self.sale]
        return [bucket_sale_id(self.sale, k) for k in range(self.buckets)]


@dataclass(frozen=True, slots=True)
class Loss:
    """One piece of evidence that Redis lost data of ``sale``."""

    sale: str  # the sale buyers order from
    engine_sale: str | None  # the bucket (or the sale itself) the evidence is about
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    run_id: str
    losses: tuple[Loss, ...]
    registry: dict[str, SaleRecord]
    checked: tuple[str, ...]  # engine sales compared
    parents: dict[str, str] = field(default_factory=dict)  # engine sale -> sale

    @property
    def ok(self) -> bool:
        return not self.losses

    def lost_sales(self) -> dict[str, str]:
        """Sale -> one line saying what was lost and what to do."""
        reasons: dict[str, list[str]] = defaultdict(list)
        for loss in self.losses:
            reasons[loss.sale].append(loss.reason)
        return {
            sale: "Redis lost data ("
            + "; ".join(found[:3])
            + "): run `flashsale recover` to rebuild it from PostgreSQL"
            for sale, found in reasons.items()
        }


# ------------------------------------------------------------------ PostgreSQL side
async def _require_tables(conn: Any) -> None:
    if not await conn.fetchval("SELECT to_regclass('fence_sales') IS NOT NULL"):
        raise FenceUnavailable("PostgreSQL has no fence tables: run `flashsale migrate`")


async def load_registry(conn: Any, prefix: str) -> dict[str, SaleRecord]:
    """Every sale recorded in ``fence_sales`` for ``prefix``."""
    await _require_tables(conn)
    rows = await conn.fetch(
        "SELECT sale, settings, skus, forgotten_at FROM fence_sales WHERE prefix = $1", prefix
    )
    return {
        r["sale"]: SaleRecord(
            r["sale"], json.loads(r["settings"]), tuple(r["skus"]), r["forgotten_at"] is not None
        )
        for r in rows
    }


@dataclass(slots=True)
class _PgFacts:
    lineage: str | None
    registry: dict[str, SaleRecord]
    stocked: dict[str, int]  # engine sale -> newest stock event's stream ms
    orders: dict[str, int]  # engine sale -> orders
    order_ms: dict[str, int]  # engine sale -> newest committed order change's stream ms
    paid: dict[tuple[str, str], int]  # (engine sale, sku) -> units in paid orders


async def _read_postgres(pool: Any, prefix: str) -> _PgFacts:
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            registry = await load_registry(conn, prefix)
            lineage = await conn.fetchval("SELECT token FROM fence_lineage WHERE prefix = $1", prefix)
            # PostgreSQL's orders carry no key prefix: a sale another prefix recorded is not
            # ours. One nobody recorded yet (Redis lost before a guard saw it) counts.
            other_engines: set[str] = set()
            for r in await conn.fetch("SELECT sale, settings FROM fence_sales WHERE prefix <> $1", prefix):
                other_engines.update(SaleRecord(r["sale"], json.loads(r["settings"]), ()).engine_sales)
            ours = {e for rec in registry.values() for e in rec.engine_sales}
            stocked = {
                r["sale"]: int(r["ms"])
                for r in await conn.fetch("SELECT sale, max(stream_ms) AS ms FROM stock_events GROUP BY sale")
                if r["sale"] in ours or r["sale"] not in other_engines
            }
            forgotten = {e for rec in registry.values() if rec.forgotten for e in rec.engine_sales}
            engines = sorted(
                (
                    {e for rec in registry.values() if not rec.forgotten for e in rec.engine_sales}
                    | set(stocked)
                )
                - forgotten
            )
            orders: dict[str, int] = {}
            order_ms: dict[str, int] = {}
            for r in await conn.fetch(
                "SELECT sale, count(*) AS n, max(split_part(last_stream_id, '-', 1)::bigint) AS ms "
                "FROM orders WHERE sale = ANY($1::text[]) GROUP BY sale",
                engines,
            ):
                orders[r["sale"]] = int(r["n"])
                order_ms[r["sale"]] = int(r["ms"])
            paid = {
                (r["sale"], r["sku"]): int(r["units"])
                for r in await conn.fetch(
                    "SELECT o.sale, l.sku, sum(l.qty) AS units FROM orders o JOIN order_lines l USING (order_id) "
                    "WHERE o.status = 'paid' AND o.sale = ANY($1::text[]) GROUP BY o.sale, l.sku",
                    engines,
                )
            }
    stocked = {s: ms for s, ms in stocked.items() if s not in forgotten}
    return _PgFacts(lineage, registry, stocked, orders, order_ms, paid)


def _parent_of(engine: str, registry: dict[str, SaleRecord]) -> str:
    for rec in registry.values():
        if engine in rec.engine_sales:
            return rec.sale
    parsed = parent_sale_id(engine)
    return parsed[0] if parsed else engine


# ------------------------------------------------------------------- verification
async def verify(redis: Any, pool: Any, *, prefix: str = "fs") -> Verdict:
    """Compare Redis with what PostgreSQL has committed; see the module docstring.

    ``redis`` is a ``redis.asyncio.Redis`` (bytes or decoded replies) that is *not* hooked
    by a guard, ``pool`` an asyncpg pool. Raises :class:`FenceUnavailable` without the
    fence's tables, and the drivers' errors when a server does not answer.
    """
    pg = await _read_postgres(pool, prefix)
    engines = sorted(
        set(pg.stocked) | {e for rec in pg.registry.values() if not rec.forgotten for e in rec.engine_sales}
    )
    parents = {e: _parent_of(e, pg.registry) for e in engines}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.info("server")
        pipe.get(lineage_key(prefix))
        for engine in engines:
            keys = SaleKeys(prefix, engine)
            pipe.hgetall(keys.stock)
            pipe.hlen(keys.holds)
            pipe.xinfo_stream(keys.events)
        replies = await pipe.execute(raise_on_error=False)
    if isinstance(replies[0], Exception):
        raise replies[0]
    run_id = _text(replies[0]["run_id"])
    token = None if replies[1] is None or isinstance(replies[1], Exception) else _text(replies[1])
    losses: list[Loss] = []
    knows_sales = bool(engines)
    if pg.lineage is not None and knows_sales and token != pg.lineage:
        why = (
            "Redis came back without its data: the lineage marker is missing"
            if token is None
            else f"Redis holds another dataset: lineage {token[:8]}…, PostgreSQL expects {pg.lineage[:8]}…"
        )
        losses += [Loss(sale, None, why) for sale in sorted(set(parents.values()))]
    for i, engine in enumerate(engines):
        stock_raw, holds, stream = replies[2 + 3 * i : 5 + 3 * i]
        sale = parents[engine]
        stock: dict[str, dict[str, int]] = defaultdict(dict)
        if not isinstance(stock_raw, Exception):
            for name, value in stock_raw.items():
                sku, _, counter = _text(name).rpartition(":")
                stock[sku][counter] = int(value)
        if engine in pg.stocked and not stock:
            losses.append(
                Loss(sale, engine, f"Redis has no stock for {engine}, PostgreSQL has its stock events")
            )
            continue
        in_pg = pg.orders.get(engine, 0)
        in_redis = 0 if isinstance(holds, Exception) else int(holds)
        if in_redis < in_pg:
            losses.append(
                Loss(
                    sale, engine, f"{engine}: Redis holds {in_redis} orders, PostgreSQL has committed {in_pg}"
                )
            )
        for (paid_sale, sku), units in pg.paid.items():
            sold = stock.get(sku, {}).get("sold", 0)
            if paid_sale == engine and sold < units:
                losses.append(
                    Loss(
                        sale, engine, f"{engine}/{sku}: Redis counts {sold} sold, PostgreSQL has {units} paid"
                    )
                )
        committed = max(pg.stocked.get(engine, 0), pg.order_ms.get(engine, 0))
        last = None if isinstance(stream, Exception) else _text(stream.get("last-generated-id") or "0-0")
        if committed and _stream_ms(last) < committed:
            losses.append(
                Loss(
                    sale,
                    engine,
                    f"{engine}: Redis's stream ends at {last or 'nothing'}, "
                    f"PostgreSQL has committed entries from {committed}-*",
                )
            )
    return Verdict(run_id, tuple(losses), pg.registry, tuple(engines), parents)


# ---------------------------------------------------------------------- recording
async def ensure_lineage(redis: Any, pool: Any, *, prefix: str = "fs") -> str:
    """Make sure Redis and PostgreSQL share one lineage token; return it. Only call it on a
    Redis that verified (or was just rebuilt): it writes PostgreSQL's token into Redis."""
    async with pool.acquire() as conn:
        await _require_tables(conn)
        known = await conn.fetchval("SELECT token FROM fence_lineage WHERE prefix = $1", prefix)
        if known is None:
            current = await redis.get(lineage_key(prefix))
            candidate = _text(current) if current is not None else secrets.token_hex(16)
            await conn.execute(
                "INSERT INTO fence_lineage (prefix, token) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                prefix,
                candidate,
            )
            known = await conn.fetchval("SELECT token FROM fence_lineage WHERE prefix = $1", prefix)
    await redis.set(lineage_key(prefix), known)
    return str(known)


async def _read_sale(redis: Any, prefix: str, sale: str) -> SaleRecord | None:
    raw = await redis.hgetall(_sale_key(prefix, sale))
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    settings: dict[str, Any] = {}
    for name in _SETTINGS_FIELDS:
        if name in fields:
            settings[name] = fields[name] if name == "state" else int(fields[name])
    record = SaleRecord(sale, settings, ())
    skus: set[str] = set()
    for engine in record.engine_sales:
        for name in await redis.hkeys(SaleKeys(prefix, engine).stock):
            skus.add(_text(name).rpartition(":")[0])
    return SaleRecord(sale, settings, tuple(sorted(skus)))


async def record_sales(
    redis: Any, pool: Any, *, prefix: str = "fs", known: dict[str, SaleRecord] | None = None
) -> dict[str, SaleRecord]:
    """Record in ``fence_sales`` every sale Redis lists whose settings or SKUs changed since
    ``known``; returns the sales as now recorded. Only call it on a Redis that verified."""
    known = dict(known or {})
    members = sorted(_text(m) for m in await redis.smembers(f"{prefix}:sales"))
    changed: list[SaleRecord] = []
    for sale in members:
        record = await _read_sale(redis, prefix, sale)
        if record is None or not record.skus:
            continue  # a bucket's id (no settings of its own) or a sale being created
        old = known.get(sale)
        if old is None or old.settings != record.settings or old.skus != record.skus:
            changed.append(record)
    if changed:
        async with pool.acquire() as conn:
            await _require_tables(conn)
            await conn.executemany(
                "INSERT INTO fence_sales (prefix, sale, settings, skus) VALUES ($1, $2, $3::jsonb, $4::text[]) "
                "ON CONFLICT (prefix, sale) DO UPDATE SET settings = excluded.settings, skus = excluded.skus, "
                "recorded_at = now()",
                [(prefix, r.sale, json.dumps(r.settings), list(r.skus)) for r in changed],
            )
        for r in changed:
            known[r.sale] = r
    return known


async def log_fence(
    pool: Any,
    *,
    prefix: str,
    sale: str | None,
    action: str,
    reason: str,
    detail: dict[str, Any] | None = None,
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO fence_log (prefix, sale, action, reason, detail) VALUES ($1, $2, $3, $4, $5::jsonb)",
            prefix,
            sale,
            action,
            reason,
            json.dumps(detail or {}),
        )


async def raise_fence(redis: Any, pool: Any, *, prefix: str, record: SaleRecord, reason: str) -> bool:
    """Fence ``record``'s sale in Redis (and log it once). If Redis lost the sale's settings,
    they are put back from the record — fenced — together with its SKU index entries, so
    buyers are told why instead of "unknown SKU". Returns True if this call raised it."""
    key = _sale_key(prefix, record.sale)
    current = await redis.hget(key, "fenced")
    if current is not None and _text(current):
        return False
    exists = await redis.exists(key)
    mapping: dict[str, Any] = {"fenced": reason}
    if not exists:
        mapping.update(
            {
                name: record.settings.get(name, default)
                for name, default in (
                    ("opens_at_ms", 0),
                    ("early_access_ms", 0),
                    ("hold_ttl_ms", 1_800_000),
                    ("state", "open"),
                    ("buckets", 1),
                )
            }
        )
        mapping["epoch"] = 0
    if record.skus:
        await redis.hset(f"{prefix}:skus", mapping=dict.fromkeys(record.skus, record.sale))
    await redis.sadd(f"{prefix}:sales", record.sale, *(e for e in record.engine_sales if e != record.sale))
    await redis.hset(key, mapping=mapping)
    await log_fence(
        pool,
        prefix=prefix,
        sale=record.sale,
        action="fenced",
        reason=reason,
        detail={"settings_restored": not exists},
    )
    logger.error("sale_fenced", extra={"sale": record.sale, "reason": reason})
    return True


def _fallback_record(sale: str, engines: Iterable[str]) -> SaleRecord:
    """A sale PostgreSQL has orders for but ``fence_sales`` never recorded (Redis was lost
    before a guard saw it): enough to fence it; recovery fills in the rest."""
    engines = list(engines)
    buckets = len(engines) if any(parent_sale_id(e) for e in engines) else 1
    return SaleRecord(sale, {"buckets": buckets, "state": "open"}, ())


# ------------------------------------------------------------------------- guard
async def _server_run_id(conn: Any) -> str:
    await conn.send_command("INFO", "server", check_health=False)
    raw = _text(await conn.read_response())
    for line in raw.splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip()
    return ""


class FenceGuard:
    """The fence in one service process; see the module docstring."""

    def __init__(
        self,
        *,
        service_redis: Any,
        pool: Any,
        redis_url: str,
        prefix: str = "fs",
        timeout_s: float = 2.0,
        poll_s: float = 0.5,
        record_s: float = 2.0,
        verify_s: float = 30.0,
    ) -> None:
        self.service_redis = service_redis
        self.pool = pool
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.record_s = record_s
        self.verify_s = verify_s
        self._lineage: str | None = None  # the token this process last saw verified
        #: Grace after a bad server is found, during which its connections are refused: long
        #: enough for any request that got past the check before the fence to give up.
        self.refuse_s = 2 * timeout_s + 1
        self.redis = Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.fenced: dict[str, str] = {}  # sale -> reason (this process's own flag)
        self.verifying: str | None = None
        self.registry: dict[str, SaleRecord] = {}
        self.last_verdict: Verdict | None = None
        self._sku_sale: dict[str, str] = {}
        self._verified_run_id: str | None = None
        self._bad_run_id: str | None = None
        self._unverified_run_id: str | None = None  # a server seen while PostgreSQL could not answer
        self.verify_timeout_s = max(5.0, 4 * timeout_s)
        self._refuse_until = 0.0
        self._check: tuple[str, asyncio.Task[bool]] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()

    # -- what the middleware asks
    @property
    def active(self) -> bool:
        return bool(self.fenced) or self.verifying is not None

    def refusal(self, sale: str | None) -> str | None:
        """Why orders for ``sale`` are refused now, or None."""
        if self.verifying is not None:
            return self.verifying
        if sale is None:
            return None
        return self.fenced.get(sale)

    def sale_of_sku(self, sku: str) -> str | None:
        return self._sku_sale.get(sku)

    # -- life
    async def start(self) -> None:
        """Verify Redis, hook the service's client, start polling."""
        self._hook(self._on_connect)
        try:
            run_id = _text((await self.redis.info("server"))["run_id"])
            await self._verify_server(run_id, wait=True)
        except Exception as exc:  # noqa: BLE001 - Redis or PostgreSQL down at start: keep polling
            self._warn("start", f"could not verify Redis at start-up: {type(exc).__name__}: {exc}")
        self._loop_task = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        self._hook(None)
        tasks = [t for t in (self._loop_task, self._check[1] if self._check else None) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.redis.aclose()

    def _hook(self, func: Callable[[Any], Awaitable[None]] | None) -> None:
        pool = self.service_redis.connection_pool
        if func is None:
            pool.connection_kwargs.pop("redis_connect_func", None)
        else:
            pool.connection_kwargs["redis_connect_func"] = func
        for getter in ("_get_free_connections", "_get_in_use_connections"):
            for conn in getattr(pool, getter, lambda: ())():
                conn.redis_connect_func = func

    # -- verification
    async def _on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        run_id = await _server_run_id(conn)
        if run_id in (self._verified_run_id, self._unverified_run_id):
            return
        if run_id == self._bad_run_id:
            if time.monotonic() < self._refuse_until:
                raise RedisConnectionError(
                    "Redis lost data; sales are fenced until `flashsale recover` rebuilds it"
                )
            return
        if not await self._verify_server(run_id, wait=True) and time.monotonic() < self._refuse_until:
            raise RedisConnectionError(
                "Redis lost data; sales are fenced until `flashsale recover` rebuilds it"
            )

    async def _verify_server(self, run_id: str, *, wait: bool) -> bool:
        """Verify a server not seen before (single flight per run id). True if it is fine."""
        check = self._check
        done = check is not None and check[1].done()
        stale = (
            check is None
            or check[0] != run_id
            or run_id == self._unverified_run_id
            or (done and (check[1].cancelled() or check[1].exception() is not None))
        )
        if stale and not (check is not None and check[0] == run_id and not done):
            if run_id != self._unverified_run_id:  # a server already selling unverified is not paused
                self.verifying = (
                    f"Redis restarted (server {run_id[:8]}); checking its data against "
                    "PostgreSQL before selling on"
                )
            check = self._check = (run_id, asyncio.ensure_future(self._verify_now(new_server=run_id)))
        assert check is not None
        task = check[1]
        if not wait:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            raise RedisConnectionError("Redis is being verified against PostgreSQL; retry shortly") from None
        except RedisError:
            raise
        except Exception as exc:  # PostgreSQL down, say: the connection must not be used unverified
            raise RedisConnectionError(
                f"Redis could not be verified ({type(exc).__name__}: {exc}); retry shortly"
            ) from exc

    async def _verify_now(self, *, new_server: str | None = None) -> bool:
        try:
            verdict = await asyncio.wait_for(
                verify(self.redis, self.pool, prefix=self.prefix), self.verify_timeout_s
            )
        except RedisError:
            raise  # Redis itself is not answering: nothing is sold from it anyway
        except Exception as exc:  # noqa: BLE001 - PostgreSQL down, slow, or not migrated
            # Orders never wait on PostgreSQL: without it the guard cannot verify, so it
            # lets sales go on (a fence needs evidence) and tries again at every poll.
            self._warn(
                "unverified",
                f"cannot verify Redis against PostgreSQL ({type(exc).__name__}: {exc}); "
                "selling on unverified until PostgreSQL answers",
            )
            if new_server is not None:
                self._unverified_run_id = new_server
            self.verifying = None
            return True
        self._warned.discard("unverified")
        self._unverified_run_id = None
        self.last_verdict = verdict
        self.registry = verdict.registry
        self._sku_sale = {sku: rec.sale for rec in verdict.registry.values() for sku in rec.skus}
        lost = verdict.lost_sales()
        for sale, reason in lost.items():
            record = verdict.registry.get(sale) or _fallback_record(
                sale, [e for e, p in verdict.parents.items() if p == sale]
            )
            self.fenced.setdefault(sale, reason)
            with contextlib.suppress(RedisError, OSError):
                await raise_fence(self.redis, self.pool, prefix=self.prefix, record=record, reason=reason)
        for sale in [s for s in self.fenced if s not in lost]:
            still = await self.redis.hget(_sale_key(self.prefix, sale), "fenced")
            if not still:  # recovered: `flashsale recover` cleared it and the data verifies
                logger.warning("fence_lifted", extra={"sale": sale})
                del self.fenced[sale]
        if verdict.ok:
            self._verified_run_id = verdict.run_id
            self._bad_run_id = None
        elif verdict.run_id != self._bad_run_id:
            self._bad_run_id = verdict.run_id
            if new_server is not None:
                self._refuse_until = time.monotonic() + self.refuse_s
        self.verifying = None
        return verdict.ok

    async def _poll_forever(self) -> None:
        next_record = next_verify = 0.0
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                # The run id shows a restart or a failover; the lineage marker shows data gone
                # from the same server (FLUSHALL, a restore): both cost one round trip.
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.info("server")
                    pipe.get(lineage_key(self.prefix))
                    info, lineage = await pipe.execute()
                run_id = _text(info["run_id"])
                now = time.monotonic()
                if run_id not in (self._verified_run_id, self._bad_run_id) or self.verifying:
                    # A new server, or one PostgreSQL could not be asked about yet.
                    await self._verify_server(run_id, wait=True)
                    next_verify = now + (self.poll_s if self.fenced else self.verify_s)
                elif (
                    self.fenced
                    or now >= next_verify
                    or (self._lineage is not None and lineage != self._lineage)
                ):
                    # While fenced: every poll, so the fence lifts as soon as recovery is done.
                    await self._verify_now()
                    next_verify = now + (self.poll_s if self.fenced else self.verify_s)
                if run_id == self._verified_run_id and not self.fenced and now >= next_record:
                    self.registry = await record_sales(
                        self.redis, self.pool, prefix=self.prefix, known=self.registry
                    )
                    self._sku_sale = {sku: rec.sale for rec in self.registry.values() for sku in rec.skus}
                    if self.registry:
                        self._lineage = await ensure_lineage(self.redis, self.pool, prefix=self.prefix)
                    next_record = now + self.record_s
                self._warned.discard("poll")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage: try again next time
                self._warn("poll", f"{type(exc).__name__}: {exc}")

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning("fence_check_failed", extra={"error": message})


# -------------------------------------------------------------- the service hook
GUARD = web.AppKey("flashsale_fence_guard", FenceGuard)


async def _order_sale(request: web.Request, guard: FenceGuard) -> str | None:
    """The sale an order, pay or cancel request is for (None when it cannot be told)."""
    if request.path == "/api/orders":
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(body, dict):
            return None
        lines = body.get("lines")
        skus = (
            [line.get("sku") for line in lines if isinstance(line, dict)]
            if isinstance(lines, list)
            else [body.get("sku")]
        )
        for sku in skus:
            if isinstance(sku, str) and (sale := guard.sale_of_sku(sku)) is not None:
                return sale
        return None
    order_id = request.match_info.get("order_id", "")
    engine = order_id.partition(".")[0]
    parsed = parent_sale_id(engine)
    return parsed[0] if parsed and parsed[0] in guard.registry else engine


@web.middleware
async def fence_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer 503 ``sale_fenced`` to orders, payments and cancellations of a fenced sale."""
    guard = request.app.get(GUARD)
    if guard is None or not guard.active or request.method != "POST":
        return await handler(request)
    path = request.path
    if path != "/api/orders" and not (path.startswith("/api/orders/") and path.endswith(_ORDER_PATHS)):
        return await handler(request)
    sale = await _order_sale(request, guard)
    reason = guard.refusal(sale)
    if reason is None:
        return await handler(request)
    raise ApiError(503, "sale_fenced", f"sales are paused: {reason}", headers={"Retry-After": "5"}, sale=sale)


async def _guard_context(app: web.Application, options: dict[str, float]) -> AsyncIterator[None]:
    from .state import STATE

    state = app[STATE]
    if state.settings.redis_cluster:
        # verify() reads one server's INFO and one lineage key for the whole store: on a
        # Redis Cluster it would need doing per shard, which it does not do yet.
        logger.warning("fence_disabled", extra={"why": "a Redis Cluster: the fence checks one server only"})
        yield
        return
    if state.pg is None:
        logger.warning(
            "fence_disabled",
            extra={"why": "no database (FLASHSALE_DATABASE_URL): a Redis data loss cannot be detected"},
        )
        yield
        return
    guard = FenceGuard(
        service_redis=state.redis,
        pool=state.pg,
        redis_url=state.settings.redis_url,
        prefix=state.settings.key_prefix,
        timeout_s=state.settings.redis_timeout_s,
        **options,
    )
    try:
        async with state.pg.acquire() as conn:
            await _require_tables(conn)
    except FenceUnavailable as exc:
        logger.warning("fence_disabled", extra={"why": str(exc)})
        await guard.redis.aclose()
        yield
        return
    except Exception as exc:  # noqa: BLE001 - PostgreSQL down at start-up: orders do not wait on it
        logger.warning("fence_unverified", extra={"why": f"{type(exc).__name__}: {exc}"})
    await guard.start()
    app[GUARD] = guard
    try:
        yield
    finally:
        await guard.stop()


_GUARD_OPTIONS = web.AppKey("flashsale_fence_options", dict)


async def _app_guard_context(app: web.Application) -> AsyncIterator[None]:
    async for _ in _guard_context(app, app[_GUARD_OPTIONS]):
        yield


def install(app: web.Application, **guard_options: float) -> None:
    """Put the fence into an app built by :func:`flashsale.app.create_app` (which does it
    already; call it again before the app starts to tune the guard's timers:
    ``poll_s``, ``record_s``, ``verify_s``). The app's own resources context comes first."""
    if installed(app):
        app[_GUARD_OPTIONS].update(guard_options)
        return
    app[_GUARD_OPTIONS] = dict(guard_options)
    app.middlewares.append(fence_middleware)
    app.cleanup_ctx.append(_app_guard_context)


def uninstall(app: web.Application) -> None:
    """Take the fence out again, before the app starts: only for showing what happens
    without it (the drills' counterfactual)."""
    if installed(app):
        app.middlewares.remove(fence_middleware)
        app.cleanup_ctx.remove(_app_guard_context)


def installed(app: web.Application) -> bool:
    """True if :func:`install` ran on ``app`` (the drill checks the service has the fence)."""
    return fence_middleware in app.middlewares
