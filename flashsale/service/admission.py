"""Admission before inventory: the cheap refusals that protect Redis at the peak.

Everything here is per process and in memory — no round trip:

* a per-buyer token bucket (bots and retry storms are refused with 429 ``rate_limited``);
* a global in-flight limit: past it, shed with 503 ``overloaded`` and ``Retry-After``,
  instead of queueing until every request times out;
* the sold-out cache: once Redis said a SKU has nothing available, refuse it locally for
  a short while, and at once forget it when the sale's epoch moves (restock, reserve
  release). The short expiry matters because lapsed and cancelled holds put units back
  on sale without an operator doing anything. A refusal from the cache runs no script,
  but it is not quite free: the order path first reads the buyer's own idempotency record
  (one HMGET per loop turn), so a retry whose first answer was lost still gets its hold.
  No header skips the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["RateLimiter", "InFlight", "SoldOutCache"]


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
        # Buckets that have refilled completely carry no information: drop them.
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


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


@dataclass
class SoldOutCache:
    ttl_s: float
    _until: dict[tuple[str, str], float] = field(default_factory=dict)
    _epochs: dict[str, int] = field(default_factory=dict)
    hits: int = 0

    def observe_epoch(self, sale: str, epoch: int) -> None:
        if self._epochs.get(sale) != epoch:
            self._epochs[sale] = epoch
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
