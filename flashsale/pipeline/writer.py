"""The order writer: drains every sale's event stream into PostgreSQL at the pace
PostgreSQL can take, without losing or doubling an order. This module is its loop — what
happens when, outages, stopping, stats; the streams side is :mod:`.backlog`, the entries
:mod:`.entries`, the SQL :mod:`.order_sql`, the settings :mod:`.worker_settings`.

How it stays correct
--------------------
* One consumer group, ``writers``, on every sale's stream ``{<prefix>:<sale>}:events``;
  sales are discovered from the set ``<prefix>:sales`` and re-checked periodically.
* A batch is written in one statement (so one transaction), keyed on the order id: a
  replayed entry updates nothing (:mod:`.order_sql`).
* XACK only after COMMIT. On start the worker first re-reads its own pending entries
  (``XREADGROUP … 0``); every ``claim_interval_s`` it takes over entries another consumer
  (or itself) left unacknowledged for ``claim_idle_ms`` (XAUTOCLAIM, Redis 6.2).
* PostgreSQL down or restarting: the batch is retried with backoff and every pooled
  connection is replaced (they all went stale); nothing is acknowledged meanwhile. The
  same wait applies to any refusal that is not about the values (no such table, a
  read-only server after a failover): such errors never send entries to dead letters.
* An entry may record several changes (a reservation call's ``reserved_batch``: one per
  hold); it is read, acknowledged and dead-lettered as one, its changes written with the
  others of the batch.
* A bad entry never blocks the others. One that cannot be parsed, or with a change whose
  values PostgreSQL refuses (SQLSTATE class 22/23) even alone — the batch is split in
  halves down to single changes to find it — ``max_attempts`` times, or that was delivered
  ``max_deliveries`` times without being committed (it keeps crashing workers) goes to the
  dead-letter stream ``{<prefix>:<sale>}:dead`` with the error, acknowledged in the same
  MULTI; once, however many of its changes were refused.
* The streams are trimmed with ``XTRIM MINID`` every ``trim_interval_s``, below what every
  group has acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.keys import ServiceKeys
from flashsale.pgpool import forget_connections, is_data_error, is_transient
from flashsale.pipeline.backlog import SaleBacklog, stream_gone
from flashsale.pipeline.entries import EntryError, OrderChange, StockChange, StreamEntry, parse_entry
from flashsale.pipeline.order_sql import write_changes
from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.streams import GROUP

__all__ = ["OrderWriter", "WriterStats"]


logger = logging.getLogger("flashsale.worker")

# A cluster whose slots are not all served (a shard down, a failover in progress) answers
# CLUSTERDOWN / TRYAGAIN: an outage to wait out like a lost connection, not a bug.
_REDIS_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError)


@dataclass(slots=True)
class WriterStats:
    """Counters for metrics and progress logs (monotonic, since the worker started)."""

    entries_read: int = 0
    entries_committed: int = 0  # written (or found already written) and acknowledged
    rows_written: int = 0  # order, line and stock-event rows inserted or changed
    orders_written: int = 0
    batches: int = 0
    dead_letters: int = 0
    reclaimed: int = 0  # entries taken over from idle consumers
    retries: int = 0  # batch attempts that failed transiently (PostgreSQL unavailable)
    split_batches: int = 0  # batches split to find a bad entry
    trimmed: int = 0  # entries removed by XTRIM MINID
    last_batch_size: int = 0
    last_batch_ms: float = 0.0
    last_commit_at: float = 0.0  # time.time() of the last commit


#: (field in ``<prefix>:writer:stats``, WriterStats attribute) of the summed counters.
_PUBLISHED_COUNTERS = (
    ("entries_total", "entries_committed"),
    ("rows_total", "rows_written"),
    ("orders_total", "orders_written"),
    ("batches_total", "batches"),
    ("dead_letters_total", "dead_letters"),
    ("reclaimed_total", "reclaimed"),
    ("retries_total", "retries"),
    ("trimmed_total", "trimmed"),
)


class _Stopped(Exception):
    """Stop was requested while PostgreSQL was unavailable: leave the batch pending."""


class OrderWriter:
    """Drains the sale streams into PostgreSQL; see the module docstring.

    ``redis`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` (decoded replies or bytes);
    ``pool`` an asyncpg pool (:func:`flashsale.pgpool.create_pool`). Both are the caller's
    to close.
    """

    def __init__(self, redis: Any, pool: asyncpg.Pool, settings: WorkerSettings) -> None:
        self.redis = redis
        self.pool = pool
        self.settings = settings
        self.stats = WriterStats()
        self.backlog = SaleBacklog(redis, settings)
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()  # the loop is over: the stats publisher ends too
        self._stop_deadline = float("inf")
        self._pg_down_since: float | None = None
        self._redis_down_since: float | None = None
        self._published = WriterStats()

    # -- public
    @property
    def sales(self) -> list[str]:
        return self.backlog.sales

    def stop(self) -> None:
        """Finish the current batch, then return from :meth:`run`."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self.settings.stop_grace_s
            self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop`. Redis and PostgreSQL outages are waited out."""
        self._finished.clear()
        publisher = asyncio.ensure_future(self._publish_forever())
        try:
            await self._run()
        finally:
            # Ended by an event, not by cancel(): on Python 3.11 a cancel that arrives in the
            # loop iteration a redis-py reply does is lost (redis-py reads through
            # asyncio.wait_for, CPython gh-86296), the publisher's loop then never ends, and
            # neither did the worker after "writer_stopped" (issue 12, item 9).
            self._finished.set()
            await publisher
            with contextlib.suppress(*_REDIS_OUTAGE, ResponseError):
                await self.publish_stats()

    async def _run(self) -> None:
        s = self.settings
        _log("writer_started", consumer=s.consumer, group=GROUP, batch=s.batch, method=s.write_method)
        next_sales = next_claim = next_trim = next_progress = 0.0
        reported = (0, 0)
        pending_done: set[str] = set()  # streams whose own pending entries were re-read
        # One batch is written while the next is read and parsed (PostgreSQL works on its own
        # core meanwhile); never more than one, so entries are acknowledged in read order.
        in_flight: asyncio.Future[None] | None = None

        async def settle() -> None:
            nonlocal in_flight
            if in_flight is not None:
                done, in_flight = in_flight, None
                await self._within_grace(done)

        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_sales:
                    await self.refresh_sales()
                    next_sales = now + s.sales_refresh_s
                for key in [k for k in self.backlog.streams if k not in pending_done]:
                    await settle()  # its entries are pending too: do not read them twice
                    await self.drain_own_pending(key)  # first, before anything new
                    pending_done.add(key)
                if now >= next_claim and s.claim_interval_s > 0:
                    await settle()
                    await self.reclaim()
                    next_claim = now + s.claim_interval_s
                if now >= next_trim and s.trim_interval_s > 0:
                    await self.trim()
                    next_trim = now + s.trim_interval_s
                entries = await self.backlog.read_new()
                await settle()
                if entries:
                    in_flight = asyncio.ensure_future(self.commit(entries))
                self._redis_recovered()
            except _Stopped:
                break
            except _REDIS_OUTAGE as exc:
                # An XACK may have been lost with the connection after its commit: once Redis
                # answers again, re-read this consumer's own pending entries first (they are
                # written again idempotently) instead of leaving them to XAUTOCLAIM's idle time.
                pending_done.clear()
                await self._redis_outage(exc)
            except ResponseError as exc:
                if not stream_gone(exc):
                    raise
                # The stream or group vanished (Redis restarted empty, key deleted, even under
                # a blocked read): forget every stream and join again now, as for new sales.
                _log("group_missing", level=logging.WARNING, error=str(exc))
                self.backlog.forget()
                pending_done.clear()
                next_sales = 0.0
            if now >= next_progress and s.progress_interval_s > 0:
                moved = (self.stats.entries_read, self.stats.dead_letters)
                if moved != reported:
                    _log("progress", **_stats_fields(self.stats))
                    reported = moved
                next_progress = now + s.progress_interval_s
        with contextlib.suppress(_Stopped, *_REDIS_OUTAGE):
            await settle()  # finish the batch in hand (or give up on it after stop_grace_s)
        _log("writer_stopped", **_stats_fields(self.stats))

    async def _within_grace(self, batch: asyncio.Future[None]) -> None:
        """Await the batch being written; once told to stop, give up on it at the stop
        deadline (raise :class:`_Stopped`, its entries stay pending for the next worker) —
        PostgreSQL frozen or a lock held means no error comes to end it otherwise."""
        if not batch.done():
            stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([batch, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not batch.done():
                    await asyncio.wait({batch}, timeout=max(self._stop_deadline - time.monotonic(), 0))
            finally:
                stopping.cancel()
            if not batch.done():
                batch.cancel()  # not awaited: closing the pool ends it if the cancel is lost
                batch.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
                _log("stopping_with_batch_pending", level=logging.WARNING)
                raise _Stopped
        await batch

    async def refresh_sales(self) -> None:
        """Join the writers' group on every sale listed in ``<prefix>:sales``."""
        for sale, key in await self.backlog.join_sales():
            _log("sale_joined", sale=sale, stream=key)

    async def drain_own_pending(self, key: str) -> None:
        """Write the entries this consumer read before (a previous run) but never acknowledged."""
        after = "0"
        while not self._stop.is_set():
            entries = await self.backlog.read_own_pending(key, after)
            if not entries:
                return
            after = entries[-1].stream_id
            _log("pending_reread", stream=key, entries=len(entries))
            await self.commit(entries, check_deliveries=True)

    async def reclaim(self) -> None:
        """XAUTOCLAIM entries idle longer than ``claim_idle_ms`` (a dead consumer's) and write them."""
        for key in list(self.backlog.streams):
            start = "0-0"
            while not self._stop.is_set():
                start, entries = await self.backlog.claim_idle(key, start)
                if entries:
                    self.stats.reclaimed += len(entries)
                    _log("reclaimed", stream=key, entries=len(entries))
                    await self.commit(entries, check_deliveries=True)
                if start == "0-0":
                    break
            await self.backlog.forget_idle_consumers(key)

    async def trim(self) -> None:
        """XTRIM MINID each stream to its oldest entry not acknowledged by every group."""
        self.stats.trimmed += await self.backlog.trim()

    async def commit(self, entries: list[StreamEntry], *, check_deliveries: bool = False) -> None:
        """Write ``entries`` to PostgreSQL, dead-letter the ones that cannot be, then XACK.
        A transaction takes about ``batch`` changes: whole entries, so a reservation call's
        entry of many holds is never split between two."""
        started = time.perf_counter()
        self.stats.entries_read += len(entries)
        if check_deliveries:
            entries = await self._dead_letter_redelivered(entries)
        good: list[tuple[StreamEntry, OrderChange | StockChange]] = []  # one item per change
        parsed: list[StreamEntry] = []  # the entries of those changes, each once
        for entry in entries:
            try:
                changes = parse_entry(entry)
            except EntryError as exc:
                await self._dead_letter(entry, exc, deliveries=None)
                continue
            good.extend((entry, change) for change in changes)
            parsed.append(entry)
            if len(good) >= self.settings.batch:
                await self._write_and_ack(good, parsed)
                good, parsed = [], []
        if good:
            await self._write_and_ack(good, parsed)
        self.stats.batches += 1
        self.stats.last_batch_size = len(entries)
        self.stats.last_batch_ms = (time.perf_counter() - started) * 1000
        self.stats.last_commit_at = time.time()

    async def publish_stats(self) -> None:
        """Add what changed since the last call to the hash ``<prefix>:writer:stats`` that
        the service's /metrics and admin stats read (shared by every worker)."""
        now, before = self.stats, self._published
        key = ServiceKeys(self.settings.prefix).writer_stats
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, attr in _PUBLISHED_COUNTERS:
                delta = getattr(now, attr) - getattr(before, attr)
                if delta:
                    pipe.hincrby(key, name, delta)
            if now.batches != before.batches:
                pipe.hset(
                    key,
                    mapping={
                        "last_batch_ms": round(now.last_batch_ms, 3),
                        "last_batch_size": now.last_batch_size,
                        "last_commit_ms": int(now.last_commit_at * 1000),
                    },
                )
            await pipe.execute()
        self._published = dataclasses.replace(now)

    async def _publish_forever(self, interval_s: float = 1.0) -> None:
        """:meth:`publish_stats` every ``interval_s`` until the loop is over."""
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), interval_s)
            if self._finished.is_set():
                return  # run() publishes the last figures itself
            with contextlib.suppress(*_REDIS_OUTAGE, ResponseError):  # best effort
                await self.publish_stats()

    # -- writing
    async def _write_and_ack(
        self, items: list[tuple[StreamEntry, OrderChange | StockChange]], entries: list[StreamEntry]
    ) -> None:
        """Write the changes ``items``, then acknowledge each of ``entries`` (theirs) once,
        but those dead-lettered meanwhile (their dead letter acknowledged them)."""
        dead: set[tuple[str, str]] = set()
        await self._write_isolating(items, dead)
        await self._ack([e for e in entries if (e.key, e.stream_id) not in dead])

    async def _write_isolating(
        self, items: list[tuple[StreamEntry, OrderChange | StockChange]], dead: set[tuple[str, str]]
    ) -> None:
        """Write a batch of changes; if the data is refused, split it in halves to find the
        bad changes and dead-letter their entries, each once: the (stream, id) pairs go in
        ``dead``. A dead-lettered entry's other changes are still written (before or after):
        every write is an idempotent upsert keyed on the order id or the stream id
        (:mod:`.order_sql`), so whatever is written again when the entry is replayed by hand
        changes nothing, and PostgreSQL meanwhile keeps every hold but the refused one."""
        try:
            await self._write_with_retry([c for _, c in items])
            return
        except asyncpg.PostgresError as exc:  # the values were refused (see _write_with_retry)
            if len(items) > 1:
                self.stats.split_batches += 1
                _log("batch_split", level=logging.WARNING, changes=len(items), error=_describe(exc))
                mid = len(items) // 2
                await self._write_isolating(items[:mid], dead)
                await self._write_isolating(items[mid:], dead)
                return
            failure = exc
        entry, change = items[0]
        if (entry.key, entry.stream_id) in dead:
            return  # another change of the entry was refused: it is set aside already
        for attempt in range(2, self.settings.max_attempts + 1):
            await asyncio.sleep(0.05 * attempt)  # a failure alone may still have been a fluke
            try:
                await self._write_with_retry([change])
                return
            except asyncpg.PostgresError as exc:
                failure = exc
        await self._dead_letter(entry, failure, deliveries=None, attempts=self.settings.max_attempts)
        dead.add((entry.key, entry.stream_id))

    async def _write_with_retry(self, changes: list[OrderChange | StockChange]) -> None:
        """Write, waiting out anything that is not the data's fault; raise only when
        PostgreSQL refused the values themselves (then the caller looks for the bad entry)."""
        delay = 0.05
        while True:
            try:
                async with self.pool.acquire() as conn:
                    rows = await write_changes(conn, changes, self.settings.write_method)
                self.stats.rows_written += rows.total
                self.stats.orders_written += rows.orders
                if self._pg_down_since is not None:
                    _log(
                        "postgres_recovered",
                        down_s=round(time.monotonic() - self._pg_down_since, 3),
                        retries=self.stats.retries,
                    )
                    self._pg_down_since = None
                return
            except Exception as exc:
                if is_data_error(exc):
                    raise
                self.stats.retries += 1
                if self._pg_down_since is None:
                    self._pg_down_since = time.monotonic()
                    if is_transient(exc):
                        _log("postgres_unavailable", level=logging.WARNING, error=_describe(exc))
                    else:  # no table, read-only server, permissions, a bug: not the entries' fault
                        _log(
                            "postgres_refuses_writes",
                            level=logging.ERROR,
                            error=_describe(exc),
                            hint="entries stay pending until this is fixed (is the schema migrated?)",
                        )
                if is_transient(exc):
                    await forget_connections(self.pool)  # every pooled connection is stale now
                if self._stop.is_set() and time.monotonic() > self._stop_deadline:
                    _log("stopping_with_batch_pending", level=logging.WARNING, entries=len(changes))
                    raise _Stopped from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _ack(self, entries: list[StreamEntry]) -> None:
        await self.backlog.ack(entries)
        self.stats.entries_committed += len(entries)

    # -- dead letters
    async def _dead_letter_redelivered(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        keep: list[StreamEntry] = []
        for entry, count in zip(entries, await self.backlog.delivery_counts(entries)):
            if count > self.settings.max_deliveries:
                reason = EntryError(
                    f"delivered {count} times without being committed (does it crash the worker?)"
                )
                await self._dead_letter(entry, reason, deliveries=count)
            else:
                keep.append(entry)
        return keep

    async def _dead_letter(
        self, entry: StreamEntry, error: BaseException, *, deliveries: int | None, attempts: int | None = None
    ) -> None:
        recorded = await self.backlog.dead_letter(
            entry, _describe(error), deliveries=deliveries, attempts=attempts
        )
        self.stats.dead_letters += 1
        _log(
            "dead_letter",
            level=logging.ERROR,
            sale=entry.sale,
            stream_id=entry.stream_id,
            error=recorded,
            type=(entry.fields or {}).get("type"),
        )

    # -- outages
    async def _redis_outage(self, exc: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            _log("redis_unavailable", level=logging.WARNING, error=_describe(exc))
        down = time.monotonic() - self._redis_down_since
        try:
            await asyncio.wait_for(self._stop.wait(), min(0.05 * 2 ** min(down, 6), 2.0))
        except TimeoutError:
            pass

    def _redis_recovered(self) -> None:
        if self._redis_down_since is not None:
            _log("redis_recovered", down_s=round(time.monotonic() - self._redis_down_since, 3))
            self._redis_down_since = None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stats_fields(stats: WriterStats) -> dict[str, Any]:
    return {
        "entries_read": stats.entries_read,
        "entries_committed": stats.entries_committed,
        "rows_written": stats.rows_written,
        "batches": stats.batches,
        "dead_letters": stats.dead_letters,
        "reclaimed": stats.reclaimed,
        "retries": stats.retries,
        "trimmed": stats.trimmed,
        "last_batch_ms": round(stats.last_batch_ms, 2),
    }


def _log(event: str, *, level: int = logging.INFO, **details: Any) -> None:
    """One structured record per event (never per entry); flashsale.logs renders it as a
    JSON line with ``details`` as top-level keys."""
    logger.log(level, event, extra=details)
