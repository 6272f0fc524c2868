"""Admission before inventory: the cheap refusals that protect Redis at the peak.

Everything here is per process and in memory — no round trip:

* a per-buyer cap on requests in progress (429 ``too_many_in_progress``): one buyer's
  thousand slow sockets hold that buyer's few turns, not everyone's;
* a per-buyer token bucket (bots and retry storms are refused with 429 ``rate_limited``),
  for at most ``max_keys`` buyers at once: past that, those seen least recently are forgotten;
* a global in-flight limit: past it, shed with 429 ``overloaded`` and ``Retry-After``,
  instead of queueing until every request times out. It is taken only once the buyer is
  known and the body is read (under a deadline): a slow client never holds it;
* the sold-out cache: once Redis said a SKU has nothing available, refuse it locally for
  a short while, and at once forget it when the sale's epoch moves (restock, reserve
  release) or the sale id is created again (its generation). The short expiry matters because lapsed and cancelled holds put units back
  on sale without an operator doing anything. A refusal from the cache runs no script,
  but it is not quite free: the order path first reads the buyer's own idempotency record
  (one HMGET per loop turn), so a retry whose first answer was lost still gets its hold.
  No header skips the cache;
* one load per key in flight (:class:`SharedLoads`): a thousand viewers of a product page
  whose cached answer just lapsed wait for one read of the stock, not a thousand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BuyerTurns", "InFlight", "RateLimiter", "SharedLoads", "SoldOutCache"]

T = TypeVar("T")


class RateLimiter:
    """Token bucket per key: ``rate`` tokens per second, at most ``burst`` saved."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 200_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens, now)
        return allowed

    def _prune(self, now: float) -> None:
        # Buckets that have refilled completely carry no information: drop them. When the
        # table is still over half full (more buyers at once than it keeps), keep only the
        # half seen most recently: the next prune is max_keys / 2 new buyers away (O(1) per
        # buyer, amortized, not a pass over the table each), and a buyer forgotten starts
        # again with a full bucket - lenient, never a refusal of everyone new.
        full_after = self.burst / self.rate
        kept = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        half = self.max_keys // 2
        if len(kept) > half:
            kept = dict(sorted(kept.items(), key=lambda item: item[1][1])[len(kept) - half :])
        self._buckets = kept


@dataclass
class InFlight:
    """Counts order requests in progress; refuses past ``limit``."""

    limit: int
    current: int = 0
    shed: int = 0

    def enter(self) -> bool:
        if self.current >= self.limit:
            self.shed += 1
            return False
        self.current += 1
        return True

    def leave(self) -> None:
        self.current -= 1


class BuyerTurns:
    """Requests in progress per buyer, at most ``limit`` each (0: no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: dict[str, int] = {}
        self.refused = 0

    def in_progress(self, user: str) -> int:
        return self._busy.get(user, 0)

    def take(self, user: str) -> bool:
        """One of ``user``'s turns (True), or False (and nothing taken) when they already
        have ``limit`` requests in progress. A turn taken is given back with :meth:`give_back`."""
        busy = self._busy.get(user, 0)
        if self.limit > 0 and busy >= self.limit:
            self.refused += 1
            return False
        self._busy[user] = busy + 1
        return True

    def give_back(self, user: str) -> None:
        left = self._busy[user] - 1
        if left:
            self._busy[user] = left
        else:
            del self._busy[user]  # memory stays bounded by requests in progress


class SharedLoads(Generic[T]):
    """Callers asking for the same key while a load of it is running share that load's
    result (or error) instead of starting their own. A caller that gives up (cancelled)
    does not cancel the load for the others."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[T]] = {}

    async def load(self, key: str, load: Callable[[], Awaitable[T]]) -> T:
        return await asyncio.shield(self.start(key, load))

    def start(self, key: str, load: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The load of ``key`` running now, started if none is: for a caller that does not
        wait for it (a refresh ahead of a lapse)."""
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(load())
            running.add_done_callback(lambda done: self._finished(key, done))
        return running

    async def settle(self) -> None:
        """Wait for every load running now (their errors are their callers')."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def forget(self, key: str) -> None:
        """The next caller starts a new load of ``key`` (what it reads changed); callers
        already waiting keep theirs."""
        self._running.pop(key, None)

    def _finished(self, key: str, done: asyncio.Future[T]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have given up before it ended


@dataclass
class SoldOutCache:
    ttl_s: float
    _until: dict[tuple[str, str], float] = field(default_factory=dict)
    _epochs: dict[str, tuple[int, int]] = field(default_factory=dict)
    hits: int = 0

    def observe_epoch(self, sale: str, epoch: int, generation: int = 0) -> None:
        """What the sale's stock is at now: its epoch, of which creation of the sale id (a
        sale id used again starts at epoch 0 once more). Anything else forgets the sale."""
        if self._epochs.get(sale) != (generation, epoch):
            self._epochs[sale] = (generation, epoch)
            for key in [k for k in self._until if k[0] == sale]:
                del self._until[key]

    def mark(self, sale: str, sku: str, now: float | None = None) -> None:
        self._until[(sale, sku)] = (time.monotonic() if now is None else now) + self.ttl_s

    def forget(self, sale: str) -> None:
        for key in [k for k in self._until if k[0] == sale]:
            del self._until[key]

    def is_sold_out(self, sale: str, sku: str, now: float | None = None) -> bool:
        until = self._until.get((sale, sku))
        if until is None:
            return False
        if until <= (time.monotonic() if now is None else now):
            del self._until[(sale, sku)]
            return False
        self.hits += 1
        return True
