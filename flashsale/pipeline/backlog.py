"""The order writer's side of the sale streams: this worker as one consumer of the
writers' group on every sale's stream, and the backlog it works through there.

It joins the group on every sale listed in ``<prefix>:sales``, reads new entries, re-reads
its own pending ones, takes over entries another consumer left idle (XAUTOCLAIM), counts
deliveries, acknowledges what was committed, dead-letters what never can be (the entry's
fields plus ``dead_*`` fields, acknowledged in the same MULTI), and trims each stream with
``XTRIM MINID`` below the oldest entry any group has not acknowledged (never MAXLEN, which
can drop entries not yet written). What to do when is the writer loop's (``writer.py``).

On a Redis Cluster (a ``RedisCluster`` client) each sale's stream lives in its sale's hash
slot, and one XREADGROUP may only name streams of one slot: new entries are read with one
XREADGROUP per slot, all sent in one pipeline (one round trip per shard). A cluster cannot
BLOCK on several shards at once, so an idle cluster read waits ``block_ms`` and asks again.
Everything else is per stream (XAUTOCLAIM, XACK, XTRIM), and a dead letter's MULTI stays
in its sale's slot.

A stream deleted under the writer (an operator removing a sale, a sale id used again,
Redis restarted empty) is gone: :func:`stream_gone` recognises Redis's answers about it,
the stream is forgotten, and the next :meth:`SaleBacklog.join_sales` creates it and the
group again, as for a new sale.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from flashsale.keys import ServiceKeys
from flashsale.pipeline.entries import StreamEntry, change_count, entry_fields
from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.redis_client import as_text
from flashsale.streams import GROUP, dead_letter_key, ensure_group, events_key
from inventory import StreamId

__all__ = ["SaleBacklog", "stream_gone", "trim_floor"]


#: The holds a reservation call's entry carries at most, as the service makes them: the
#: library's default ``max_batch``. New entries are read in slices that hold at most the
#: changes still wanted at that size, and reading goes on while slices come and fewer than
#: ``batch`` changes are in hand: about ``batch`` changes a read (at most one entry more per
#: stream), whether the entries carry one change or 64. Reading ``batch`` entries at once
#: held up to 64 times ``batch`` holds.
ENTRY_HOLDS = 64


def _entries_for(changes: int) -> int:
    """Entries (per stream) of the next slice: at most ``changes`` changes at :data:`ENTRY_HOLDS` each."""
    return max(1, changes // ENTRY_HOLDS)


def stream_gone(exc: ResponseError) -> bool:
    """Redis's answer about a stream (or its group) that is not there any more: ``NOGROUP``
    from the group commands, ``no such key`` from XINFO, and ``UNBLOCKED the stream key no
    longer exists`` to a read that was blocked on it."""
    text = str(exc)
    return "NOGROUP" in text or text.startswith("UNBLOCKED") or "no such key" in text.lower()


class SaleBacklog:
    """Every sale's stream as this consumer (``settings.consumer``) of the writers' group
    sees it; see the module docstring. ``redis`` is a ``redis.asyncio.Redis`` or
    ``RedisCluster`` (decoded replies or bytes), the caller's to close."""

    def __init__(self, redis: Any, settings: WorkerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.streams: dict[str, str] = {}  # stream key -> sale
        # Cluster only: the streams grouped by hash slot, one XREADGROUP each (None: regroup).
        self._on_cluster = isinstance(redis, RedisCluster)
        self._slot_reads: list[dict[str, str]] | None = None

    @property
    def sales(self) -> list[str]:
        return sorted(self.streams.values())

    # -- membership
    async def join_sales(self) -> list[tuple[str, str]]:
        """Join the writers' group on every sale listed in ``<prefix>:sales`` not joined
        yet (creating the stream if need be); returns the (sale, stream) pairs joined now."""
        prefix = self.settings.prefix
        joined = []
        for sale in sorted(as_text(m) for m in await self.redis.smembers(ServiceKeys(prefix).sales)):
            key = events_key(prefix, sale)
            if key not in self.streams:
                await ensure_group(self.redis, key)
                self.streams[key] = sale
                self._slot_reads = None
                joined.append((sale, key))
        return joined

    def forget(self, key: str | None = None) -> None:
        """Forget one stream (or all): it or its group is gone; join again to recreate it."""
        if key is None:
            self.streams.clear()
        else:
            self.streams.pop(key, None)
        self._slot_reads = None

    # -- reading
    def _entries(self, reply: Any) -> list[StreamEntry]:
        out: list[StreamEntry] = []
        for key, items in reply or []:
            key = as_text(key)
            sale = self.streams[key]
            out.extend(StreamEntry(sale, key, as_text(i), entry_fields(f)) for i, f in items)
        return out

    async def read_new(self) -> list[StreamEntry]:
        """Entries no consumer has read yet, about ``batch`` changes of them (see
        :func:`_entries_for`); waits ``block_ms`` when there are none."""
        if not self.streams:
            await asyncio.sleep(self.settings.block_ms / 1000)
            return []
        s = self.settings
        read = self._read_per_slot if self._on_cluster else self._read_together
        entries = await read(_entries_for(s.batch), s.block_ms)
        changes = sum(change_count(e) for e in entries)
        lingered = s.linger_ms <= 0
        while entries and changes < s.batch:
            more = await read(_entries_for(s.batch - changes), None)
            if not more:
                if lingered:
                    break
                # A short read: wait a moment so the next transaction carries more than a few rows.
                await asyncio.sleep(s.linger_ms / 1000)
                lingered = True
                continue
            entries += more
            changes += sum(change_count(e) for e in more)
        return entries

    async def _read_together(self, count: int, block: int | None) -> list[StreamEntry]:
        """One server: every stream in one XREADGROUP (``count`` per stream)."""
        streams = {key: ">" for key in self.streams}
        return self._entries(
            await self.redis.xreadgroup(GROUP, self.settings.consumer, streams, count=count, block=block)
        )

    async def _read_per_slot(self, count: int, block: int | None) -> list[StreamEntry]:
        """A cluster: one XREADGROUP per hash slot (``count`` per stream, as above), in one
        pipeline that redis-py sends to the shards in parallel. BLOCK would hold one shard's
        answer while the others have entries, so when nothing is new anywhere the read
        waits ``block`` ms instead (a cancelled blocking read could also drop entries Redis
        had already delivered to this consumer)."""
        if self._slot_reads is None:
            by_slot: dict[int, dict[str, str]] = {}
            for key in self.streams:
                by_slot.setdefault(self.redis.keyslot(key), {})[key] = ">"
            self._slot_reads = list(by_slot.values())
        async with self.redis.pipeline(transaction=False) as pipe:
            for streams in self._slot_reads:
                pipe.xreadgroup(GROUP, self.settings.consumer, streams, count=count)
            replies = await pipe.execute()
        entries = [entry for reply in replies for entry in self._entries(reply)]
        if not entries and block:
            await asyncio.sleep(block / 1000)
        return entries

    async def read_own_pending(self, key: str, after: str) -> list[StreamEntry]:
        """Up to a batch of the entries this consumer read before (a previous run) but never
        acknowledged, after ``after`` (``"0"``: from the first)."""
        reply = await self.redis.xreadgroup(
            GROUP, self.settings.consumer, {key: after}, count=self.settings.batch
        )
        return self._entries(reply)

    async def claim_idle(self, key: str, start: str) -> tuple[str, list[StreamEntry]]:
        """XAUTOCLAIM up to a batch of ``key``'s entries idle longer than ``claim_idle_ms``
        (a dead consumer's), from ``start``; returns (where to go on, "0-0" at the end; entries)."""
        s = self.settings
        reply = await self.redis.xautoclaim(key, GROUP, s.consumer, s.claim_idle_ms, start, count=s.batch)
        sale = self.streams[key]
        entries = [StreamEntry(sale, key, as_text(i), entry_fields(f)) for i, f in reply[1] if i is not None]
        return as_text(reply[0]), entries

    async def delivery_counts(self, entries: list[StreamEntry]) -> list[int]:
        """How often each entry was delivered (0: no longer pending)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.xpending_range(e.key, GROUP, e.stream_id, e.stream_id, 1)
            replies = await pipe.execute()
        return [int(r[0]["times_delivered"]) if r else 0 for r in replies]

    # -- settling
    async def ack(self, entries: list[StreamEntry]) -> None:
        """XACK ``entries`` (committed to PostgreSQL), one pipeline for every stream."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.key, []).append(e.stream_id)
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in by_stream.items():
                pipe.xack(key, GROUP, *ids)
            await pipe.execute()

    async def dead_letter(
        self, entry: StreamEntry, error: str, *, deliveries: int | None, attempts: int | None = None
    ) -> str:
        """Move ``entry`` to its sale's dead-letter stream with why (``dead_*`` fields) and
        acknowledge it, in one MULTI; returns the error as recorded."""
        meta = {
            "dead_stream_id": entry.stream_id,
            "dead_error": error[:1000],
            "dead_consumer": self.settings.consumer,
            "dead_at": str(int(time.time() * 1000)),
        }
        if deliveries is not None:
            meta["dead_deliveries"] = str(deliveries)
        if attempts is not None:
            meta["dead_attempts"] = str(attempts)
        body = {**(entry.fields or {}), **meta}
        async with self.redis.pipeline(transaction=True) as pipe:  # dead-letter and ack together
            pipe.xadd(dead_letter_key(self.settings.prefix, entry.sale), body)
            pipe.xack(entry.key, GROUP, entry.stream_id)
            await pipe.execute()
        return meta["dead_error"]

    # -- upkeep
    async def forget_idle_consumers(self, key: str) -> None:
        """Remove consumers that own nothing and were idle far longer than the claim time
        (workers that died and whose entries were taken over): XINFO stays readable."""
        limit = self.settings.claim_idle_ms * 10
        for c in await self.redis.xinfo_consumers(key, GROUP):
            name = as_text(c["name"])
            if name != self.settings.consumer and int(c["pending"]) == 0 and int(c["idle"]) > limit:
                await self.redis.xgroup_delconsumer(key, GROUP, name)

    async def trim(self) -> int:
        """XTRIM MINID each stream to its oldest entry not acknowledged by every group;
        returns the entries removed. A stream found deleted is forgotten (see above)."""
        trimmed = 0
        for key in list(self.streams):
            try:
                floor = await trim_floor(self.redis, key)
            except ResponseError as exc:
                if not stream_gone(exc):
                    raise
                self.forget(key)
                continue
            if floor is not None:
                trimmed += int(await self.redis.xtrim(key, minid=floor, approximate=False))
        return trimmed


async def trim_floor(redis: Any, key: str) -> str | None:
    """The lowest id any group has not acknowledged yet: everything below it is committed.

    Read the groups first, then each group's oldest pending entry: entries delivered after
    the first read are above the last-delivered id read first, so the floor never passes
    an uncommitted entry.
    """
    groups = await redis.xinfo_groups(key)
    if not groups:
        return None
    floor: StreamId | None = None
    for g in groups:
        candidates = [StreamId.parse(g["last-delivered-id"]).next()]
        summary = await redis.xpending(key, as_text(g["name"]))
        if summary and int(summary["pending"]) > 0 and summary["min"] is not None:
            candidates.append(StreamId.parse(summary["min"]))
        low = min(candidates)
        floor = low if floor is None else min(floor, low)
    assert floor is not None
    return str(floor)
