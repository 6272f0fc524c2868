"""The sale book: which sales exist, their settings (opening time T0, members' early
access, hold TTL, open/closed, fenced), the SKU → sale index, and the degraded-site
switches — stored in Redis so every service process sees the same, cached locally for
a fraction of a second (``ttl_s``: the staleness bound of every cached read here) so the
hot path does not pay a round trip for them. When an entry has lapsed, the callers that
arrive while it is being read again share that one read (at the peak: one read, not one
per order arriving during its round trip).

A sale's settings and its SKU index (what every order reads) are read again ahead of
their lapse: a caller past half of ``ttl_s`` gets the cached answer at once and starts the
read in the background, so at the peak no order waits for a round trip when an entry
lapses (every order arriving during that round trip used to wait for it, twice a
``ttl_s``). Nothing older than ``ttl_s`` is answered: an entry nobody asked for in time
lapses as before, and its next caller waits for the read.

Redis keys (outside any sale's hash slot: they are read by the service only, never by
the reservation scripts):

``<prefix>:sales``          set   sale ids (the worker discovers the event streams here)
``<prefix>:sale:<sale>``    hash  the sale's settings (below) and ``epoch``, bumped on
                                  every restock / reserve release so processes drop
                                  their sold-out caches at once, and ``generation``:
                                  which creation of the sale id this is
``<prefix>:skus``           hash  sku -> sale (a SKU belongs to one sale)
``<prefix>:switches``       hash  endpoint switches of the degraded-site plan
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from flashsale.keys import ServiceKeys
from flashsale.service.admission import SharedLoads

__all__ = ["SaleSettings", "SaleBook", "SWITCHES"]

#: Non-essential endpoints an operator can switch off under load (the degraded site).
SWITCHES = ("browse", "order_lookup")
#: What SaleBook._cached answers for an entry that is missing or has lapsed.
_LAPSED: Any = object()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class SaleSettings:
    sale: str
    opens_at_ms: int
    early_access_ms: int = 0
    hold_ttl_ms: int = 30 * 60 * 1000
    state: str = "scheduled"  # scheduled (opens at T0) | open | closed
    fenced: str = ""  # non-empty: sales refused until `flashsale recover` (the reason)
    epoch: int = 0
    buckets: int = 1  # > 1: stock split over that many hash slots (inventory.BucketedInventory)
    #: When this creation of the sale was made (ms, Redis clock): a sale id used again is a
    #: new generation (see flashsale.fence.verify); 0 for sales from before generations.
    generation: int = 0
    room: int = 0  # 1: orders need a waiting-room ticket (flashsale.service.waiting_room)

    def opens_for(self, member: bool) -> int:
        return self.opens_at_ms - (self.early_access_ms if member else 0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["opens_at"] = iso(self.opens_at_ms)
        return out

    @classmethod
    def from_hash(cls, sale: str, raw: dict[bytes, bytes]) -> SaleSettings:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            sale=sale,
            opens_at_ms=int(f.get("opens_at_ms", 0)),
            early_access_ms=int(f.get("early_access_ms", 0)),
            hold_ttl_ms=int(f.get("hold_ttl_ms", 1_800_000)),
            state=f.get("state", "scheduled"),
            fenced=f.get("fenced", ""),
            epoch=int(f.get("epoch", 0)),
            buckets=int(f.get("buckets", 1)),
            generation=int(f.get("generation", 0)),
            room=int(f.get("room", 0)),
        )


@functools.lru_cache(maxsize=256)
def iso(ms: int) -> str:
    """``ms`` (epoch milliseconds, UTC) as ISO 8601: ``2026-12-03T06:12:41.123Z``. Holds
    made by one script call share their pay-by instant (one Redis clock reading, one
    TTL), so an order's ``pay_by`` is mostly a look-up of its batch's."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_second(second: int) -> str:
    # Orders placed in the same second have their pay-by deadlines in the same second:
    # the formatting of that second is done once, not once per order.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class SaleBook:
    """Reads and writes sale settings; caches reads for ``ttl_s``."""

    def __init__(
        self, redis: Any, prefix: str, *, ttl_s: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = ServiceKeys(prefix)
        self.ttl_s = ttl_s
        self._clock = clock
        #: How long before its lapse an entry asked for is read again (see the module docstring).
        self._ahead_s = ttl_s / 2
        #: Bumped whenever this process changes the book: a read that started before a
        #: change does not overwrite what was cached after it.
        self._changes = 0
        self._sales: dict[str, tuple[float, SaleSettings | None]] = {}
        # A SKU can change sale (its sale removed, the SKU put on sale again), so the
        # index is cached like the settings: for ttl_s at most.
        self._sku_sale: dict[str, tuple[float, str]] = {}
        self._switches: tuple[float, dict[str, bool]] = (0.0, {})
        # The reads in flight, shared by whoever asks meanwhile (entries leave when done).
        self._sale_loads: SharedLoads[SaleSettings | None] = SharedLoads()
        self._sku_loads: SharedLoads[str | None] = SharedLoads()

    def sale_key(self, sale: str) -> str:
        return ServiceKeys(self.prefix).sale(sale)

    @property
    def sales_key(self) -> str:
        return ServiceKeys(self.prefix).sales

    @property
    def skus_key(self) -> str:
        return ServiceKeys(self.prefix).skus

    @property
    def switches_key(self) -> str:
        return ServiceKeys(self.prefix).switches

    def cached_sale(self, sale: str) -> SaleSettings | None:
        """The sale's settings if this process holds them now (read ahead of their lapse
        as :meth:`sale` does), else None: then ask :meth:`sale`. The order path's way
        to skip a coroutine per order: ``book.cached_sale(s) or await book.sale(s)``."""
        cached = self._cached(self._sales, sale, self._sale_loads, self._read_sale)
        return None if cached is _LAPSED else cached

    def cached_sale_of_sku(self, sku: str) -> str | None:
        """The SKU's sale if this process holds it now, else None (as :meth:`cached_sale`)."""
        cached = self._cached(self._sku_sale, sku, self._sku_loads, self._read_sale_of_sku)
        return None if cached is _LAPSED else cached

    async def sale(self, sale: str, *, fresh: bool = False) -> SaleSettings | None:
        """The sale's settings, at most ``ttl_s`` old; ``fresh``: read now (after a write),
        never from a read started earlier."""
        if not fresh:
            cached = self._cached(self._sales, sale, self._sale_loads, self._read_sale)
            if cached is not _LAPSED:
                return cached  # type: ignore[no-any-return]
            return await self._sale_loads.load(sale, lambda: self._read_sale(sale))
        return await self._read_sale(sale)

    def _cached(
        self,
        entries: dict[str, tuple[float, Any]],
        key: str,
        loads: SharedLoads[Any],
        read: Callable[[str], Awaitable[Any]],
    ) -> Any:
        """The cached answer for ``key``, or ``_LAPSED``; past the refresh point, ``read``
        starts again in the background (see the module docstring)."""
        cached = entries.get(key)
        if cached is None:
            return _LAPSED
        left = cached[0] - self._clock()
        if left <= 0:
            return _LAPSED
        if left < self._ahead_s:
            loads.start(key, lambda: read(key))
        return cached[1]

    async def _read_sale(self, sale: str) -> SaleSettings | None:
        now, changes = self._clock(), self._changes
        raw = await self.redis.hgetall(self.sale_key(sale))
        settings = SaleSettings.from_hash(sale, raw) if raw else None
        # Never cache made-up sale ids: memory stays bounded.
        if settings is not None and changes == self._changes:
            self._sales[sale] = (now + self.ttl_s, settings)
        return settings

    async def sale_of_sku(self, sku: str) -> str | None:
        cached = self._cached(self._sku_sale, sku, self._sku_loads, self._read_sale_of_sku)
        if cached is not _LAPSED:
            return cached  # type: ignore[no-any-return]
        return await self._sku_loads.load(sku, lambda: self._read_sale_of_sku(sku))

    async def _read_sale_of_sku(self, sku: str) -> str | None:
        now, changes = self._clock(), self._changes
        raw = await self.redis.hget(self.skus_key, sku)
        if raw is None:  # never cache made-up SKUs: memory stays bounded
            self._sku_sale.pop(sku, None)
            return None
        sale: str = raw.decode()
        if changes == self._changes:
            self._sku_sale[sku] = (now + self.ttl_s, sale)
        return sale

    async def settle(self) -> None:
        """Wait for the reads in flight (those started ahead of a lapse included)."""
        await asyncio.gather(self._sale_loads.settle(), self._sku_loads.settle())

    async def all_sales(self) -> list[str]:
        return sorted(s.decode() for s in await self.redis.smembers(self.sales_key))

    async def switches(self) -> dict[str, bool]:
        now = time.monotonic()
        if self._switches[0] > now:
            return self._switches[1]
        raw = await self.redis.hgetall(self.switches_key)
        values = {name: raw.get(name.encode(), b"1") == b"1" for name in SWITCHES}
        self._switches = (now + self.ttl_s, values)
        return values

    async def set_switches(self, values: dict[str, bool]) -> dict[str, bool]:
        if values:
            await self.redis.hset(self.switches_key, mapping={k: int(v) for k, v in values.items()})
        self._switches = (0.0, {})
        return await self.switches()

    async def create(
        self, settings: SaleSettings, skus: list[str], engine_sales: list[str] | None = None
    ) -> None:
        """Register a sale and claim its SKUs. The caller checked nothing is taken.

        ``engine_sales`` are the sale ids whose event streams the order writer must drain:
        the sale itself, or its buckets (``<sale>-b<k>``). The keys live in different hash
        slots, so they are written one by one (a Redis Cluster refuses a transaction over
        them); the settings hash goes last, and it is what makes the sale exist."""
        await self.redis.hset(self.skus_key, mapping={sku: settings.sale for sku in skus})
        await self.redis.sadd(self.sales_key, settings.sale, *(engine_sales or []))
        await self.redis.hset(
            self.sale_key(settings.sale),
            mapping={
                "opens_at_ms": settings.opens_at_ms,
                "early_access_ms": settings.early_access_ms,
                "hold_ttl_ms": settings.hold_ttl_ms,
                "state": settings.state,
                "fenced": settings.fenced,
                "epoch": 0,
                "buckets": settings.buckets,
                "generation": settings.generation,
                "room": settings.room,
            },
        )
        self._forget_sale(settings.sale)
        for sku in skus:  # this process knows at once; the others within ttl_s
            self._sku_sale.pop(sku, None)
            self._sku_loads.forget(sku)

    async def update(self, sale: str, **fields: Any) -> SaleSettings | None:
        await self.redis.hset(self.sale_key(sale), mapping=fields)
        self._forget_sale(sale)
        return await self.sale(sale, fresh=True)

    async def bump_epoch(self, sale: str) -> None:
        """Stock came back (restock, reserve release): every process drops its sold-out cache."""
        await self.redis.hincrby(self.sale_key(sale), "epoch", 1)
        self._forget_sale(sale)

    def _forget_sale(self, sale: str) -> None:
        """The sale changed: its next reader reads it again (not a read started before)."""
        self._changes += 1
        self._sales.pop(sale, None)
        self._sale_loads.forget(sale)
