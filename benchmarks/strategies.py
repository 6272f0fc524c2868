"""The strategy comparison: six ways people hold stock under a surge, side by side.

N concurrent clients reserve one unit of one hot SKU until every client has been told
"sold out", through the same harness (``harness.closed_loop``) for each way:

1. PostgreSQL row lock: ``UPDATE … SET available = available - 1 WHERE … AND available > 0``;
2. PostgreSQL ``SELECT … FOR UPDATE`` then ``UPDATE`` in one transaction;
3. Redis check-then-act from the client: ``GET``, then ``DECR`` if it was positive — the
   classic oversell. Nothing is rigged: each client has its own connection and the only
   gap between the check and the act is the await every real client has;
4. Redis ``WATCH``/``MULTI`` optimistic transaction, retried on conflict;
5. one Lua call per reservation (``EVALSHA`` of a decrement-if-positive script);
6. the ``inventory`` engine: coalesced Lua with idempotency records and events.

After each run the units granted (counted by the clients that were told "yours") are
compared with the stock: the excess is **oversold**, and the store's own counters are read
to confirm the count. The stock of each run is sized from a short probe so that every
strategy runs for about the same time, however fast it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import asyncpg
from redis.exceptions import WatchError

from inventory import Inventory, SoldOut

from .harness import CpuMeter, LoadRun, PidTreeCpu, RedisCpu, closed_loop
from .report import Claim, Figure
from .servers import Servers
from .settings import BenchSettings

__all__ = [
    "DECR_IF_POSITIVE",
    "STRATEGIES",
    "CheckThenAct",
    "EngineHold",
    "LuaPerCall",
    "PgRowLock",
    "PgSelectForUpdate",
    "Strategy",
    "WatchMulti",
    "compare",
    "measure",
    "run_strategy",
    "with_engine_ratio",
]

SECTION = "strategies"

#: The trivial one-unit reservation script: the raw rate of "one Lua call per reservation".
DECR_IF_POSITIVE = """
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
if left > 0 then return redis.call('DECR', KEYS[1]) end
return -1
"""

#: Stock of the sizing probe: more than any strategy can sell in the probe.
_PROBE_STOCK = 100_000_000


class Strategy:
    """One way of holding stock. ``attempt`` returns True when it granted the client a unit."""

    name: ClassVar[str]
    claim: ClassVar[Claim]
    store: ClassVar[str]  # "redis" or "postgres"

    def __init__(self, servers: Servers, clients: int) -> None:
        self.servers = servers
        self.clients = clients
        self.stock = 0

    async def open(self) -> None: ...

    async def prepare(self, stock: int) -> None:
        """Start over with ``stock`` units of the hot SKU."""
        raise NotImplementedError

    async def attempt(self, client: int) -> bool:
        raise NotImplementedError

    async def store_granted(self) -> int:
        """Units the store itself says were taken."""
        raise NotImplementedError

    def meter(self) -> CpuMeter | None:
        return None

    def notes(self) -> list[str]:
        return []

    async def close(self) -> None: ...


class _RedisCounter(Strategy):
    """Stock as one integer key: what most hand-written Redis reservations do."""

    store = "redis"

    async def open(self) -> None:
        self.redis = self.servers.redis(max_connections=self.clients)
        self.key = self.servers.name(f"{type(self).__name__}:hot")

    async def prepare(self, stock: int) -> None:
        self.stock = stock
        await self.redis.set(self.key, stock)

    async def store_granted(self) -> int:
        return self.stock - int(await self.redis.get(self.key) or 0)

    def meter(self) -> CpuMeter | None:
        return RedisCpu(self.redis)

    async def close(self) -> None:
        await self.redis.delete(self.key)
        await self.redis.aclose()


class CheckThenAct(_RedisCounter):
    name = "Redis GET then DECR (client check-then-act)"
    claim = Claim.MAY_OVERSELL

    async def attempt(self, client: int) -> bool:
        left = int(await self.redis.get(self.key) or 0)
        if left <= 0:
            return False
        # The gap: other clients' GETs are answered while this DECR is on its way.
        await self.redis.decr(self.key)
        return True


class WatchMulti(_RedisCounter):
    name = "Redis WATCH/MULTI (optimistic)"
    claim = Claim.EXACT

    async def prepare(self, stock: int) -> None:
        await super().prepare(stock)
        self.conflicts = 0

    async def attempt(self, client: int) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.key)
                    left = int(await pipe.get(self.key) or 0)
                    if left <= 0:
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.decr(self.key)
                    await pipe.execute()
                    return True
                except WatchError:
                    self.conflicts += 1  # another client wrote first: read again

    def notes(self) -> list[str]:
        return [f"{self.conflicts:,} WATCH conflicts retried"]


class LuaPerCall(_RedisCounter):
    name = "Redis one Lua call per reservation"
    claim = Claim.EXACT

    async def open(self) -> None:
        await super().open()
        self.script = self.redis.register_script(DECR_IF_POSITIVE)

    async def attempt(self, client: int) -> bool:
        return int(await self.script(keys=[self.key])) >= 0


class EngineHold(Strategy):
    name = "inventory engine (coalesced Lua, idempotency, events)"
    claim = Claim.EXACT
    store = "redis"
    sku = "hot"

    def __init__(self, servers: Servers, clients: int, *, coalesce: bool = True) -> None:
        super().__init__(servers, clients)
        self.coalesce = coalesce
        self._ids = itertools.count()

    async def open(self) -> None:
        self.redis = self.servers.redis(max_connections=self.clients)
        self.sale = f"bench-{self.servers.token}-{'c' if self.coalesce else 'u'}"
        self.inventory = Inventory(self.redis, self.sale, coalesce=self.coalesce)

    async def prepare(self, stock: int) -> None:
        await self.inventory.aclose()
        await self.redis.delete(*self.inventory.keys.all())
        self.stock = stock
        await self.inventory.stock(self.sku, stock)

    async def attempt(self, client: int) -> bool:
        try:
            await self.inventory.reserve(f"u{client}", self.sku, request_id=f"r{next(self._ids)}")
        except SoldOut:
            return False
        return True

    async def store_granted(self) -> int:
        snap = await self.inventory.snapshot(self.sku)
        assert snap is not None
        return snap.held + snap.sold

    def meter(self) -> CpuMeter | None:
        return RedisCpu(self.redis)

    async def close(self) -> None:
        await self.inventory.aclose()
        await self.redis.delete(*self.inventory.keys.all())
        await self.redis.aclose()


class _PgStock(Strategy):
    """Stock as one row of a table, one pooled connection per client."""

    store = "postgres"

    async def open(self) -> None:
        self.table = self.servers.name(type(self).__name__.lower())
        self.pool: Any = await asyncpg.create_pool(
            self.servers.database_url, min_size=self.clients, max_size=self.clients
        )
        await self.pool.execute(
            f"CREATE TABLE {self.table} (sku text PRIMARY KEY, available integer NOT NULL)"
        )

    async def prepare(self, stock: int) -> None:
        self.stock = stock
        await self.pool.execute(f"DELETE FROM {self.table}")
        await self.pool.execute(f"INSERT INTO {self.table} VALUES ('hot', $1)", stock)

    async def store_granted(self) -> int:
        return self.stock - int(
            await self.pool.fetchval(f"SELECT available FROM {self.table} WHERE sku = 'hot'")
        )

    def meter(self) -> CpuMeter | None:
        return PidTreeCpu(self.servers.postgres_pid)

    async def close(self) -> None:
        try:
            await self.pool.execute(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            await self.pool.close()


class PgRowLock(_PgStock):
    name = "PostgreSQL UPDATE ... WHERE available > 0"
    claim = Claim.EXACT

    async def attempt(self, client: int) -> bool:
        left = await self.pool.fetchval(
            f"UPDATE {self.table} SET available = available - 1 "
            "WHERE sku = 'hot' AND available > 0 RETURNING available"
        )
        return left is not None


class PgSelectForUpdate(_PgStock):
    name = "PostgreSQL SELECT ... FOR UPDATE, then UPDATE"
    claim = Claim.EXACT

    async def attempt(self, client: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            left = await conn.fetchval(f"SELECT available FROM {self.table} WHERE sku = 'hot' FOR UPDATE")
            if left <= 0:
                return False
            await conn.execute(f"UPDATE {self.table} SET available = available - 1 WHERE sku = 'hot'")
            return True


#: In the order of the issue: the database ways, the hand-written Redis ways, the engine.
STRATEGIES: tuple[type[Strategy], ...] = (
    PgRowLock,
    PgSelectForUpdate,
    CheckThenAct,
    WatchMulti,
    LuaPerCall,
    EngineHold,
)


async def measure(strategy: Strategy, settings: BenchSettings) -> tuple[LoadRun, int]:
    """Size the stock with a short probe, then run until sold out.
    Returns the run and the store's count of units taken."""
    await strategy.prepare(_PROBE_STOCK)
    probe = await closed_loop(
        strategy.attempt, clients=strategy.clients, until_sold_out=False, seconds=settings.probe_s
    )
    if probe.errors:
        raise RuntimeError(f"{strategy.name}: the probe failed: {probe.first_error}")
    stock = max(strategy.clients * 4, round(probe.rate * settings.seconds))
    await strategy.prepare(stock)
    run = await closed_loop(
        strategy.attempt,
        clients=strategy.clients,
        until_sold_out=True,
        timeout_s=max(30.0, settings.seconds * 6),
        server=strategy.meter(),
    )
    return run, await strategy.store_granted()


def _figure(strategy: Strategy, run: LoadRun, store_granted: int) -> Figure:
    notes = strategy.notes()
    if run.timed_out:
        notes.append("cut by the time limit before selling out")
    return run.figure(
        section=SECTION,
        name=strategy.name,
        notes=notes,
        claim=strategy.claim,
        stock=strategy.stock,
        oversold=max(0, run.granted - strategy.stock),
        store_granted=store_granted,
    )


async def run_strategy(kind: type[Strategy], servers: Servers, settings: BenchSettings) -> Figure:
    strategy = kind(servers, settings.clients)
    await strategy.open()
    try:
        run, store_granted = await measure(strategy, settings)
    finally:
        await strategy.close()
    return _figure(strategy, run, store_granted)


def with_engine_ratio(figures: Sequence[Figure]) -> list[Figure]:
    """Each figure's rate as a ratio of the engine's (wrong strategies get none)."""
    engine = next((f for f in figures if f.name == EngineHold.name), None)
    if engine is None or engine.rate <= 0:
        return list(figures)
    out = []
    for f in figures:
        if f.wrong:
            out.append(f)
        else:
            out.append(replace(f, ratio=f.rate / engine.rate, ratio_to="engine"))
    return out


async def compare(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """The whole comparison, every strategy in one run, in the issue's order."""
    figures = [await run_strategy(kind, servers, settings) for kind in STRATEGIES]
    return with_engine_ratio(figures)
