"""What one service process holds: clients, caches and counters, reachable from every
handler through one typed application key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from flashsale.redis_client import ConnectWatch
from flashsale.service.admission import BuyerTurns, InFlight, RateLimiter, SharedLoads, SoldOutCache
from flashsale.service.deadlines import Deadlines
from flashsale.service.identity import Identity
from flashsale.service.metrics import ServiceMetrics
from flashsale.service.sales import SaleBook, SaleSettings
from flashsale.settings import Settings
from inventory import BucketedInventory, Inventory, WaitingRoom

__all__ = ["ServiceState", "STATE"]


@dataclass
class ServiceState:
    settings: Settings
    redis: Any
    sales: SaleBook
    metrics: ServiceMetrics
    rate: RateLimiter
    in_flight: InFlight
    sold_out: SoldOutCache
    buyers: BuyerTurns
    identity: Identity
    room_polls: RateLimiter
    pg: Any = None  # asyncpg pool, when a database is configured
    #: Sees every connection ``redis`` opens (one server; None on a cluster): the fence guard's hook.
    redis_watch: ConnectWatch | None = None
    _inventories: dict[str, Inventory] = field(default_factory=dict)
    _bucketed: dict[str, BucketedInventory] = field(default_factory=dict)
    sku_cache: dict[str, tuple[float, Any]] = field(default_factory=dict)
    page_loads: SharedLoads[dict[str, Any]] = field(default_factory=SharedLoads)
    rooms: dict[str, WaitingRoom] = field(default_factory=dict)  # sale -> its waiting room
    #: How long an order waits on Redis (twice the Redis timeout: room for the one re-send)
    #: and on the rest of its body: one timer each for all requests (flashsale.service.deadlines).
    redis_deadline: Deadlines = field(init=False)
    read_deadline: Deadlines = field(init=False)
    #: How long a look-up waits on PostgreSQL for an order Redis no longer has (a connection
    #: from the pool, a connect, the query): as long as an order waits on Redis.
    archive_deadline: Deadlines = field(init=False)

    def __post_init__(self) -> None:
        self.redis_deadline = Deadlines(self.settings.redis_timeout_s * 2)
        self.read_deadline = Deadlines(self.settings.read_timeout_s)
        self.archive_deadline = Deadlines(self.settings.redis_timeout_s * 2)

    def inventory(self, sale: str, hold_ttl_ms: int | None = None) -> Inventory:
        """The engine for one sale (one per sale per process, so reservations coalesce)."""
        inv = self._inventories.get(sale)
        if inv is None:
            inv = self._inventories[sale] = Inventory(self.redis, sale, prefix=self.settings.key_prefix)
        if hold_ttl_ms is not None and inv.hold_ttl_ms != hold_ttl_ms:
            inv.hold_ttl_ms = hold_ttl_ms
        return inv

    def engine(self, sale: SaleSettings) -> Inventory | BucketedInventory:
        """The engine a sale's orders go through: one Inventory, or its buckets."""
        if sale.buckets <= 1:
            return self.inventory(sale.sale, sale.hold_ttl_ms)
        engine = self._bucketed.get(sale.sale)
        if engine is None or len(engine.buckets) != sale.buckets:  # the id created again, split otherwise
            engine = self._bucketed[sale.sale] = BucketedInventory(
                self.redis, sale.sale, sale.buckets, prefix=self.settings.key_prefix
            )
        if engine.hold_ttl_ms != sale.hold_ttl_ms:
            engine.hold_ttl_ms = sale.hold_ttl_ms
        return engine

    def engine_parts(self, sale: SaleSettings) -> list[Inventory]:
        """The plain engines behind a sale: its buckets, or the one Inventory (each has
        its own holds, deadlines and event stream)."""
        engine = self.engine(sale)
        return list(engine.buckets) if isinstance(engine, BucketedInventory) else [engine]

    def probe_inventory(self) -> Inventory:
        """Any engine instance, for probes that only need the scripts."""
        return next(iter(self._inventories.values()), None) or self.inventory("probe")

    async def aclose(self) -> None:
        await self.sales.settle()  # a read started ahead of a lapse: not left behind the loop
        for inv in self._inventories.values():
            await inv.aclose()
        for engine in self._bucketed.values():
            await engine.aclose()


STATE = web.AppKey("flashsale_state", ServiceState)
