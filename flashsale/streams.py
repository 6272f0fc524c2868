"""The sale event streams as every wing sees them: the writers' consumer group, the
dead-letter stream beside each events stream, how to make the group, and the backlog
(what has not yet reached PostgreSQL). The entry format itself is inventory's contract.

The backlog (for metrics) counts entries, not orders: a reservation call appends one entry
for every hold it made. Redis 6.2's XINFO GROUPS has no ``lag``, so :func:`stream_backlog`
reports ``pending`` exactly (XPENDING) and ``undelivered`` exactly when it is zero or
when Redis ≥ 7 reports ``lag``; otherwise as the upper bound ``XLEN - pending``, which is
close because the worker trims acknowledged entries every ``trim_interval_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from flashsale.keys import ServiceKeys
from flashsale.redis_client import RedisClient, as_text

__all__ = [
    "GROUP",
    "Backlog",
    "dead_letter_key",
    "ensure_group",
    "events_key",
    "oldest_waiting_ms",
    "stream_backlog",
    "stream_drained",
]


#: The consumer group every order writer joins.
GROUP = "writers"


# --------------------------------------------------------------------- stream keys
def events_key(prefix: str, sale: str) -> str:
    return ServiceKeys(prefix).events(sale)


def dead_letter_key(prefix: str, sale: str) -> str:
    """The sale's dead-letter stream (same hash slot as its events)."""
    return ServiceKeys(prefix).dead_letters(sale)


async def ensure_group(redis: RedisClient, key: str) -> None:
    """Create the writers' group at the stream's start (and the stream if missing)."""
    try:
        await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass(frozen=True, slots=True)
class Backlog:
    """Entries of one stream not yet committed to PostgreSQL (see the module docstring)."""

    key: str
    length: int  # XLEN
    pending: int  # delivered to a writer, not acknowledged
    undelivered: int  # not yet read by any writer (an upper bound unless ``exact``)
    exact: bool

    @property
    def total(self) -> int:
        return self.pending + self.undelivered


async def stream_backlog(redis: RedisClient, key: str, *, count_up_to: int = 0) -> Backlog:
    """Entries of ``key`` not yet committed by the writers' group. ``count_up_to`` > 0 counts
    undelivered entries one by one (XRANGE, at most that many) when Redis reports no lag,
    so the answer is exact below that bound — at the cost of reading them."""
    length = int(await redis.xlen(key))
    ours = None
    if length:
        try:
            ours = next((g for g in await redis.xinfo_groups(key) if as_text(g["name"]) == GROUP), None)
        except ResponseError:  # no such key
            ours = None
    if ours is None:  # no writer ever joined: everything is undelivered
        return Backlog(key, length, 0, length, True)
    pending = int(ours["pending"])
    lag = ours.get("lag")
    if lag is not None:  # Redis >= 7
        return Backlog(key, length, pending, int(lag), True)
    after = "(" + as_text(ours["last-delivered-id"])
    counted = len(await redis.xrange(key, after, "+", count=max(count_up_to, 1)) or ())
    if counted < max(count_up_to, 1):
        return Backlog(key, length, pending, counted, True)
    return Backlog(key, length, pending, max(length - pending, counted), False)


async def oldest_waiting_ms(redis: RedisClient, key: str) -> int | None:
    """When the oldest entry of ``key`` not yet committed by the writers' group was added
    (Redis time, ms: a stream id starts with it) — the first pending one, else the first
    not yet delivered; None when nothing waits."""
    try:
        groups = await redis.xinfo_groups(key)
    except ResponseError:  # no such stream
        return None
    ours = next((g for g in groups if as_text(g["name"]) == GROUP), None)
    first: Any = None
    if ours is not None and int(ours["pending"]):
        first = (await redis.xpending(key, GROUP))["min"]
    else:
        start = "-" if ours is None else "(" + as_text(ours["last-delivered-id"])
        entries = await redis.xrange(key, start, "+", count=1)
        first = entries[0][0] if entries else None
    return None if first is None else int(as_text(first).split("-")[0])


async def stream_drained(redis: RedisClient, key: str) -> bool:
    """True when every entry of the stream has been committed (or dead-lettered)."""
    backlog = await stream_backlog(redis, key)
    return backlog.total == 0
