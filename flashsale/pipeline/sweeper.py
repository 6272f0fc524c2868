"""The hold-expiry sweeper: returns the units of unpaid holds to sale once their payment
deadline passes.

Each sweep asks every sale (from ``<prefix>:sales``) to expire its due holds through the
inventory engine's ``expire_due`` script, in bounded calls, until none is due; then it
sleeps for ``interval_s``. The script writes an ``expired`` entry to the sale's stream for
each hold it closes, so the order writer marks those orders expired in PostgreSQL.
Several sweepers may run at once: each hold is closed by exactly one script call.
It runs inside ``flashsale worker`` as its own task, or alone (``--sweeper-only``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.keys import ServiceKeys
from inventory import BucketedInventory, Inventory, InventoryError

__all__ = ["HoldSweeper", "SweeperStats"]

logger = logging.getLogger("flashsale.sweeper")
#: How often half-done bucket transfers (a crash mid-pull) are looked for and finished.
SETTLE_EVERY_S = 5.0

_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(slots=True)
class SweeperStats:
    sweeps: int = 0
    holds_expired: int = 0
    last_sweep_ms: float = 0.0


class HoldSweeper:
    """Expires due holds of every sale, every ``interval_s`` (see the module docstring).

    ``redis`` is a ``redis.asyncio.Redis`` client the caller owns and closes.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "fs",
        interval_s: float = 0.2,
        limit: int = 500,
        sales_refresh_s: float = 2.0,
    ) -> None:
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be 1..1000 holds per call")
        self.redis = redis
        self.prefix = prefix
        self.interval_s = interval_s
        self.limit = limit
        self.sales_refresh_s = sales_refresh_s
        self.stats = SweeperStats()
        self._sales: dict[str, Inventory] = {}
        # Sales split into buckets: their half-done transfers are settled here too.
        self._bucketed: dict[str, BucketedInventory] = {}
        self._skipped: set[str] = set()
        self._sales_checked = float("-inf")
        self._stop = asyncio.Event()
        self._settled_at = float("-inf")

    def _settle_due(self) -> bool:
        """Settle bucket transfers about once every SETTLE_EVERY_S, not on every sweep."""
        now = time.monotonic()
        if now - self._settled_at < SETTLE_EVERY_S:
            return False
        self._settled_at = now
        return True

    def stop(self) -> None:
        self._stop.set()

    async def sweep(self) -> int:
        """One sweep over every sale; returns the number of holds expired."""
        started = time.perf_counter()
        if time.monotonic() - self._sales_checked >= self.sales_refresh_s:
            await self._refresh_sales()
        expired = 0
        for sale, inventory in list(self._sales.items()):
            more = True
            while more and not self._stop.is_set():
                try:
                    batch = await inventory.expire_due(limit=self.limit)
                except InventoryError as exc:  # e.g. the outcome of this call is unknown
                    logger.warning("sweep_failed", extra={"sale": sale, "error": str(exc)})
                    break
                expired += len(batch.expired)
                more = batch.more
        if self._settle_due():
            for parent, engine in list(self._bucketed.items()):
                try:
                    settled = await engine.settle_transfers()
                except InventoryError as exc:
                    logger.warning("settle_failed", extra={"sale": parent, "error": str(exc)})
                    continue
                if settled:
                    logger.warning("bucket_transfers_settled", extra={"sale": parent, "transfers": settled})
        self.stats.sweeps += 1
        self.stats.holds_expired += expired
        self.stats.last_sweep_ms = (time.perf_counter() - started) * 1000
        if expired:
            logger.info(
                "holds_expired", extra={"holds": expired, "sweep_ms": round(self.stats.last_sweep_ms, 2)}
            )
        return expired

    async def run(self) -> None:
        """Sweep until :meth:`stop`; Redis outages are logged once and waited out."""
        logger.info("sweeper_started", extra={"interval_s": self.interval_s, "limit": self.limit})
        down_since: float | None = None
        while not self._stop.is_set():
            pause = self.interval_s
            try:
                await self.sweep()
                if down_since is not None:
                    logger.info(
                        "sweeper_redis_recovered", extra={"down_s": round(time.monotonic() - down_since, 3)}
                    )
                    down_since = None
            except (*_OUTAGE, ResponseError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning(
                        "sweeper_redis_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"}
                    )
                pause = max(pause, 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
        logger.info(
            "sweeper_stopped", extra={"sweeps": self.stats.sweeps, "holds_expired": self.stats.holds_expired}
        )

    async def _refresh_sales(self) -> None:
        members = await self.redis.smembers(ServiceKeys(self.prefix).sales)
        for raw in members:
            sale = raw.decode() if isinstance(raw, bytes) else str(raw)
            if sale in self._sales or sale in self._skipped:
                continue
            try:
                self._sales[sale] = Inventory(self.redis, sale, prefix=self.prefix, coalesce=False)
            except InventoryError:  # not a valid sale id: the engine never made holds for it
                self._skipped.add(sale)
                logger.warning("sweeper_skips_sale", extra={"sale": sale})
        buckets: dict[str, int] = {}
        for sale in self._sales:
            bucket_of = BucketedInventory.parent_of(sale)
            if bucket_of is not None:
                buckets[bucket_of[0]] = max(buckets.get(bucket_of[0], 0), bucket_of[1] + 1)
        for parent_sale, count in buckets.items():
            engine = self._bucketed.get(parent_sale)
            if engine is None or len(engine.buckets) != count:
                self._bucketed[parent_sale] = BucketedInventory(
                    self.redis, parent_sale, count, prefix=self.prefix, coalesce=False
                )
        self._sales_checked = time.monotonic()
