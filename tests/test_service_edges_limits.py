"""The per-buyer rate limits when full: more buyers at once than the limiter keeps
(``max_keys``; 200,000 per process for orders and for waiting-room polls). A waiting room
of a million buyers polling over four processes is such a crowd.

The limiter used to drop only buckets that had refilled; with every bucket in use none had,
so each new buyer scanned the whole table again (an O(n) rebuild per request: ~10 ms of one
core at 200,000 buyers) and the table grew without bound. Full now means: forget the
buyers seen least recently, half the table at a time, so a new buyer costs O(1) amortized;
a forgotten buyer starts again with a full bucket (lenient, never a refusal of everyone new).
Deterministic: the limiter is given its clock."""

from __future__ import annotations

from flashsale.service.admission import RateLimiter


class CountingLimiter(RateLimiter):
    """A RateLimiter that counts its prunes (each one a pass over the whole table)."""

    prunes = 0

    def _prune(self, now: float) -> None:
        self.prunes += 1
        super()._prune(now)


def test_a_full_limiter_stays_bounded_and_a_new_buyer_costs_o1_amortized() -> None:
    limiter = CountingLimiter(rate=1.0, burst=2, max_keys=100)
    for i in range(100):  # every bucket in use at the same instant: none has refilled
        assert limiter.allow(f"buyer{i}", now=0.0)
    for i in range(100, 1100):
        assert limiter.allow(f"buyer{i}", now=0.0), "a new buyer is never refused for the crowd"
        assert len(limiter._buckets) <= 100
    assert limiter.prunes <= 1000 // 50 + 1, f"{limiter.prunes} passes over the table for 1,000 buyers"


def test_a_full_limiter_forgets_the_buyers_seen_least_recently() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=10)
    for i in range(10):
        assert limiter.allow(f"buyer{i}", now=i / 100)
    assert not limiter.allow("buyer9", now=0.095), "buyer9 spent its burst"
    assert limiter.allow("newcomer", now=0.1)  # full: the least recently seen half goes
    assert not limiter.allow("buyer9", now=0.1), "the most recent buyers are still limited"
    assert limiter.allow("buyer0", now=0.1), "buyer0, forgotten, starts with a full bucket"


def test_buckets_that_refilled_are_dropped_first() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=10)
    for i in range(9):
        limiter.allow(f"old{i}", now=0.0)
    limiter.allow("recent", now=5.0)
    limiter.allow("newcomer", now=5.5)  # full: the old ones have refilled (1 s), so they go
    assert sorted(limiter._buckets) == ["newcomer", "recent"]
    assert not limiter.allow("recent", now=5.5)
