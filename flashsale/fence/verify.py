"""The fence: sales stop when Redis comes back without its data or with older data, and
stay stopped until ``flashsale recover`` has rebuilt the stock from PostgreSQL.

Why: Redis decides, PostgreSQL remembers. If Redis loses acknowledged writes (restarted
without its AOF, wiped, failed over to a lagging replica) while their orders already
reached PostgreSQL, Redis's counters say more units are available than really are —
selling on would oversell. The fence notices and refuses; :mod:`flashsale.fence.recovery`
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
  committed (compared to the millisecond);
* Redis holds an **earlier generation** of the sale than PostgreSQL recorded.

Generations. A sale id can be used again (a yearly ``d11``) once its last creation was
retired (``flashsale recover --forget d11``), and every creation is a generation of its own,
named by the instant it was created (ms of the Redis clock, the settings hash's
``generation`` field; 0 for sales from before generations). ``fence_sales`` keeps a row per
generation, and everything compared above is read for the generation recorded last: a row
of ``orders`` or ``stock_events`` belongs to the newest generation created at or before it
(:func:`flashsale.ledger.generation_of`). A generation newer than the one recorded is a sale created again:
it is recorded, then checked — unless the one before it was never retired, which is how a
Redis wiped and then given a new sale of the same id looks (a loss, until retired).

Where it runs. :class:`flashsale.service.fence_guard.FenceGuard` lives in every service process
(:func:`flashsale.service.fence_guard.install`):

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

One Redis server only. A run id, a lineage marker and a connection watch are one server's;
on a Redis Cluster each shard would need its own, which this module does not keep. So
:func:`verify` (and :func:`require_one_server`, which recovery and the guard ask first)
raise :class:`ClusterUnsupported` on a cluster client or on a node that says
``cluster_enabled:1`` — whose MOVED replies would otherwise read as keys that are gone —
rather than judge the part of the data one node holds (:data:`ON_A_CLUSTER` says what to do
there instead).

The order writer needs no guard: every write it makes is idempotent and a status only
moves up, so replaying an older stream into PostgreSQL changes nothing; recovery drains
the stream itself before rebuilding (see :mod:`flashsale.fence.recovery`).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT, FieldT

from flashsale.keys import ServiceKeys
from flashsale.ledger import newest_stock_event_ms, order_counts, paid_units
from flashsale.redis_client import RedisClient, as_text, reaches_cluster_node, says_cluster_node
from inventory import SaleKeys, StreamId, bucket_sale_id, parent_sale_id

__all__ = [
    "ON_A_CLUSTER",
    "ClusterUnsupported",
    "FenceUnavailable",
    "Loss",
    "SaleRecord",
    "Verdict",
    "ensure_lineage",
    "fallback_record",
    "generations_recorded",
    "lineage_key",
    "load_registry",
    "newest_record",
    "log_fence",
    "raise_fence",
    "record_sales",
    "require_one_server",
    "require_tables",
    "verify",
]

logger = logging.getLogger("flashsale.fence")

#: Settings fields kept in ``fence_sales`` (the live ones, ``fenced`` and ``epoch``, are not).
_SETTINGS_FIELDS = ("opens_at_ms", "early_access_ms", "hold_ttl_ms", "state", "buckets")


class FenceUnavailable(RuntimeError):
    """PostgreSQL lacks the fence's tables (run ``flashsale migrate``)."""


#: Why the fence and recovery stop short of a Redis Cluster, and what to do there instead.
ON_A_CLUSTER = (
    "the fence and recovery work on one Redis server only: they compare one server's run id "
    "and one lineage marker with PostgreSQL and rebuild through that server, so on a Redis "
    "Cluster they would check or rewrite only what one node holds. On a cluster, keep every "
    "shard from losing acknowledged reservations instead (appendfsync always, or WAIT/WAITAOF: "
    "docs/running-at-scale.md); if a shard lost data, close its sales "
    "(POST /api/admin/sales/<sale>/close) and run `flashsale audit` to see what was oversold or lost"
)


class ClusterUnsupported(RuntimeError):
    """The Redis is a Redis Cluster (or one of its nodes): see :data:`ON_A_CLUSTER`."""


async def require_one_server(redis: RedisClient, where: str = "the Redis named") -> None:
    """:class:`ClusterUnsupported` unless ``redis`` is one server, not a Redis Cluster nor a
    node of one (a node answers a plain client too, with MOVED for most keys)."""
    if isinstance(redis, RedisCluster):
        raise ClusterUnsupported(f"{where} is a Redis Cluster; {ON_A_CLUSTER}")
    if await reaches_cluster_node(redis):
        raise ClusterUnsupported(
            f"{where} is a node of a Redis Cluster (its INFO says cluster_enabled:1); {ON_A_CLUSTER}"
        )


def lineage_key(prefix: str) -> str:
    return ServiceKeys(prefix).lineage


@dataclass(frozen=True, slots=True)
class SaleRecord:
    """A sale as ``fence_sales`` remembers it."""

    sale: str
    settings: dict[str, Any]
    skus: tuple[str, ...]
    forgotten: bool = False
    generation: int = 0  # when this creation of the sale was made (ms, Redis clock)

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
    advice: str = "run `flashsale recover` to rebuild it from PostgreSQL"


@dataclass(frozen=True, slots=True)
class Verdict:
    run_id: str
    losses: tuple[Loss, ...]
    registry: dict[str, SaleRecord]
    checked: tuple[str, ...]  # engine sales compared
    parents: dict[str, str] = field(default_factory=dict)  # engine sale -> sale
    #: sale -> the generation Redis holds (None: no settings hash), for the sales looked at
    generations: dict[str, int | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.losses

    def lost_sales(self) -> dict[str, str]:
        """Sale -> one line saying what was lost and what to do."""
        reasons: dict[str, list[str]] = defaultdict(list)
        advice: dict[str, str] = {}
        for loss in self.losses:
            reasons[loss.sale].append(loss.reason)
            advice.setdefault(loss.sale, loss.advice)
        return {
            sale: "Redis lost data (" + "; ".join(found[:3]) + "): " + advice[sale]
            for sale, found in reasons.items()
        }


# ------------------------------------------------------------------ PostgreSQL side
async def require_tables(conn: Any) -> None:
    if not await conn.fetchval("SELECT to_regclass('fence_sales') IS NOT NULL"):
        raise FenceUnavailable("PostgreSQL has no fence tables: run `flashsale migrate`")


async def load_registry(conn: Any, prefix: str) -> dict[str, SaleRecord]:
    """Every sale recorded in ``fence_sales`` for ``prefix``: its newest generation."""
    await require_tables(conn)
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (sale) {_RECORD_COLUMNS} FROM fence_sales WHERE prefix = $1 "
        "ORDER BY sale, generation DESC",
        prefix,
    )
    return {r["sale"]: _record(r) for r in rows}


async def newest_record(pool: Any, prefix: str, sale: str) -> SaleRecord | None:
    """The generation of ``sale`` the fence recorded last (retired or not), or None."""
    async with pool.acquire() as conn:
        await require_tables(conn)
        row = await conn.fetchrow(
            f"SELECT {_RECORD_COLUMNS} FROM fence_sales WHERE prefix = $1 AND sale = $2 "
            "ORDER BY generation DESC LIMIT 1",
            prefix,
            sale,
        )
    return None if row is None else _record(row)


_RECORD_COLUMNS = "sale, generation, settings, skus, forgotten_at"


def _record(row: Any) -> SaleRecord:
    return SaleRecord(
        row["sale"],
        json.loads(row["settings"]),
        tuple(row["skus"]),
        row["forgotten_at"] is not None,
        int(row["generation"]),
    )


async def generations_recorded(pool: Any, prefix: str, sales: Iterable[str]) -> dict[str, list[int]]:
    """Sale -> every generation ``fence_sales`` recorded of it, oldest first (empty when
    PostgreSQL has no fence tables: nothing was recorded)."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass('fence_sales') IS NOT NULL"):
            return {}
        rows = await conn.fetch(
            "SELECT sale, generation FROM fence_sales WHERE prefix = $1 AND sale = ANY($2::text[]) "
            "ORDER BY sale, generation",
            prefix,
            sorted(set(sales)),
        )
    found: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        found[r["sale"]].append(int(r["generation"]))
    return dict(found)


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
            # Each engine sale is read from its recorded generation on (0: all of it).
            since = {
                e: rec.generation for rec in registry.values() if not rec.forgotten for e in rec.engine_sales
            }
            forgotten = {e for rec in registry.values() if rec.forgotten for e in rec.engine_sales}
            ours = set(since) | forgotten
            stocked = {
                sale: ms
                for sale, ms in (await newest_stock_event_ms(conn, since)).items()
                if sale in ours or sale not in other_engines
            }
            engines = sorted(set(since) | (set(stocked) - forgotten))
            counts = await order_counts(conn, engines, since)
            orders = {sale: n for sale, (n, _) in counts.items()}
            order_ms = {sale: ms for sale, (_, ms) in counts.items()}
            paid = await paid_units(conn, engines, since)
    stocked = {s: ms for s, ms in stocked.items() if s not in forgotten}
    return _PgFacts(lineage, registry, stocked, orders, order_ms, paid)


def _parent_of(engine: str, registry: dict[str, SaleRecord]) -> str:
    for rec in registry.values():
        if engine in rec.engine_sales:
            return rec.sale
    parsed = parent_sale_id(engine)
    return parsed[0] if parsed else engine


# ------------------------------------------------------------------- verification
async def verify(redis: RedisClient, pool: Any, *, prefix: str = "fs") -> Verdict:
    """Compare Redis with what PostgreSQL has committed; see the module docstring.

    ``redis`` is a ``redis.asyncio.Redis`` (bytes or decoded replies) that is *not* hooked
    by a guard, ``pool`` an asyncpg pool. Raises :class:`ClusterUnsupported` on a Redis
    Cluster or one of its nodes, :class:`FenceUnavailable` without the
    fence's tables, and the drivers' errors when a server does not answer.
    """
    if isinstance(redis, RedisCluster):
        raise ClusterUnsupported(f"the Redis verified is a Redis Cluster; {ON_A_CLUSTER}")
    pg = await _read_postgres(pool, prefix)
    engines = sorted(
        set(pg.stocked) | {e for rec in pg.registry.values() if not rec.forgotten for e in rec.engine_sales}
    )
    parents = {e: _parent_of(e, pg.registry) for e in engines}
    sales = sorted(set(parents.values()))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.info("server")
        pipe.get(lineage_key(prefix))
        for sale in sales:
            pipe.hmget(ServiceKeys(prefix).sale(sale), ["generation", "opens_at_ms"])
        for engine in engines:
            keys = SaleKeys(prefix, engine)
            pipe.hgetall(keys.stock)
            pipe.hlen(keys.holds)
            pipe.xinfo_stream(keys.events)
        pipe.info("cluster")
        replies = await pipe.execute(raise_on_error=False)
    if isinstance(replies[0], Exception):
        raise replies[0]
    if says_cluster_node(replies[-1]):  # its MOVED replies would read as keys that are gone
        raise ClusterUnsupported(f"the Redis verified is a node of a Redis Cluster; {ON_A_CLUSTER}")
    run_id = as_text(replies[0]["run_id"])
    token = None if replies[1] is None or isinstance(replies[1], Exception) else as_text(replies[1])
    losses: list[Loss] = []
    knows_sales = bool(engines)
    if pg.lineage is not None and knows_sales and token != pg.lineage:
        why = (
            "Redis came back without its data: the lineage marker is missing"
            if token is None
            else f"Redis holds another dataset: lineage {token[:8]}…, PostgreSQL expects {pg.lineage[:8]}…"
        )
        losses += [Loss(sale, None, why) for sale in sorted(set(parents.values()))]
    generations: dict[str, int | None] = {}
    for sale, reply in zip(sales, replies[2 : 2 + len(sales)]):
        if isinstance(reply, Exception) or (reply[0] is None and reply[1] is None):
            generations[sale] = None  # no settings hash
        else:
            generations[sale] = int(reply[0] or 0)  # a sale from before generations: 0
    skipped = set()
    for sale, held in generations.items():
        record = pg.registry.get(sale)
        recorded = record.generation if record is not None else 0
        if held is None or held == recorded:
            continue
        skipped.add(sale)  # compared once the fence has recorded the generation Redis holds
        if held < recorded:
            losses.append(
                Loss(
                    sale,
                    None,
                    f"Redis holds an earlier creation of {sale} (generation {held}), "
                    f"PostgreSQL recorded generation {recorded}",
                )
            )
        elif record is not None:  # a new creation over one never retired: how a wipe looks
            losses.append(
                Loss(
                    sale,
                    None,
                    f"{sale} was created again (generation {held}) while its generation {recorded} "
                    "was never retired",
                    advice=f"if that one was removed on purpose, run `flashsale recover --forget {sale}`",
                )
            )
    offset = 2 + len(sales)
    for i, engine in enumerate(engines):
        stock_raw, holds, stream = replies[offset + 3 * i : offset + 3 + 3 * i]
        sale = parents[engine]
        if sale in skipped:
            continue
        stock: dict[str, dict[str, int]] = defaultdict(dict)
        if not isinstance(stock_raw, Exception):
            for name, value in stock_raw.items():
                sku, _, counter = as_text(name).rpartition(":")
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
        last = None if isinstance(stream, Exception) else as_text(stream.get("last-generated-id") or "0-0")
        if committed and (StreamId.parse(last).ms if last else 0) < committed:
            losses.append(
                Loss(
                    sale,
                    engine,
                    f"{engine}: Redis's stream ends at {last or 'nothing'}, "
                    f"PostgreSQL has committed entries from {committed}-*",
                )
            )
    checked = tuple(e for e in engines if parents[e] not in skipped)
    return Verdict(run_id, tuple(losses), pg.registry, checked, parents, generations)


# ---------------------------------------------------------------------- recording
async def ensure_lineage(redis: RedisClient, pool: Any, *, prefix: str = "fs") -> str:
    """Make sure Redis and PostgreSQL share one lineage token; return it. Only call it on a
    Redis that verified (or was just rebuilt): it writes PostgreSQL's token into Redis."""
    async with pool.acquire() as conn:
        await require_tables(conn)
        known = await conn.fetchval("SELECT token FROM fence_lineage WHERE prefix = $1", prefix)
        if known is None:
            current = await redis.get(lineage_key(prefix))
            candidate = as_text(current) if current is not None else secrets.token_hex(16)
            await conn.execute(
                "INSERT INTO fence_lineage (prefix, token) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                prefix,
                candidate,
            )
            known = await conn.fetchval("SELECT token FROM fence_lineage WHERE prefix = $1", prefix)
    await redis.set(lineage_key(prefix), known)
    return str(known)


async def _read_sale(redis: RedisClient, prefix: str, sale: str) -> SaleRecord | None:
    raw = await redis.hgetall(ServiceKeys(prefix).sale(sale))
    if not raw:
        return None
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    settings: dict[str, Any] = {}
    for name in _SETTINGS_FIELDS:
        if name in fields:
            settings[name] = fields[name] if name == "state" else int(fields[name])
    generation = int(fields.get("generation") or 0)
    record = SaleRecord(sale, settings, (), generation=generation)
    skus: set[str] = set()
    for engine in record.engine_sales:
        for field_name in await redis.hkeys(SaleKeys(prefix, engine).stock):
            skus.add(as_text(field_name).rpartition(":")[0])
    return SaleRecord(sale, settings, tuple(sorted(skus)), generation=generation)


async def record_sales(
    redis: RedisClient, pool: Any, *, prefix: str = "fs", known: dict[str, SaleRecord] | None = None
) -> dict[str, SaleRecord]:
    """Record in ``fence_sales`` every sale Redis lists whose settings or SKUs changed since
    ``known`` (a sale created again: a row for its new generation); returns the sales as
    now recorded. Only call it on a Redis that verified."""
    known = dict(known or {})
    members = sorted(as_text(m) for m in await redis.smembers(ServiceKeys(prefix).sales))
    changed: list[SaleRecord] = []
    for sale in members:
        record = await _read_sale(redis, prefix, sale)
        if record is None or not record.skus:
            continue  # a bucket's id (no settings of its own) or a sale being created
        old = known.get(sale)
        if (
            old is None
            or old.generation != record.generation
            or old.settings != record.settings
            or old.skus != record.skus
        ):
            changed.append(record)
    if changed:
        async with pool.acquire() as conn:
            await require_tables(conn)
            for r in changed:
                # A new generation is recorded only over retired ones: a sale created again
                # over a creation nobody retired is what a wiped Redis given a new sale
                # looks like, and verify() reports it instead of letting it pass.
                recorded = await conn.fetchval(
                    "INSERT INTO fence_sales (prefix, sale, generation, settings, skus) "
                    "SELECT $1, $2, $3, $4::jsonb, $5::text[] WHERE NOT EXISTS (SELECT 1 FROM fence_sales "
                    "WHERE prefix = $1 AND sale = $2 AND generation <> $3 AND forgotten_at IS NULL) "
                    "ON CONFLICT (prefix, sale, generation) DO UPDATE SET settings = excluded.settings, "
                    "skus = excluded.skus, recorded_at = now() RETURNING true",
                    prefix,
                    r.sale,
                    r.generation,
                    json.dumps(r.settings),
                    list(r.skus),
                )
                if recorded:
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


async def raise_fence(redis: RedisClient, pool: Any, *, prefix: str, record: SaleRecord, reason: str) -> bool:
    """Fence ``record``'s sale in Redis (and log it once). If Redis lost the sale's settings,
    they are put back from the record — fenced — together with its SKU index entries, so
    buyers are told why instead of "unknown SKU". Returns True if this call raised it."""
    key = ServiceKeys(prefix).sale(record.sale)
    current = await redis.hget(key, "fenced")
    if current is not None and as_text(current):
        return False
    exists = await redis.exists(key)
    mapping: dict[FieldT, EncodableT] = {"fenced": reason}
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
        mapping["generation"] = record.generation
    if record.skus:
        await redis.hset(ServiceKeys(prefix).skus, mapping=dict.fromkeys(record.skus, record.sale))
    await redis.sadd(
        ServiceKeys(prefix).sales, record.sale, *(e for e in record.engine_sales if e != record.sale)
    )
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


def fallback_record(sale: str, engines: Iterable[str]) -> SaleRecord:
    """A sale PostgreSQL has orders for but ``fence_sales`` never recorded (Redis was lost
    before a guard saw it): enough to fence it; recovery fills in the rest."""
    engines = list(engines)
    buckets = len(engines) if any(parent_sale_id(e) for e in engines) else 1
    return SaleRecord(sale, {"buckets": buckets, "state": "open"}, ())
