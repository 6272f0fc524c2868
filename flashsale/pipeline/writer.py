"""The order writer: drains every sale's event stream into PostgreSQL at the pace
PostgreSQL can take, without losing or doubling an order.

How it stays correct
--------------------
* One consumer group, ``writers``, on every sale's stream ``{<prefix>:<sale>}:events``;
  sales are discovered from the set ``<prefix>:sales`` and re-checked periodically.
* A batch is written in one statement (so one transaction), keyed on the order id: a
  replayed entry updates nothing. Status only moves up a rank (held = 0, paid / cancelled /
  expired = 1), so a late ``reserved`` entry never takes a paid order back to held.
* XACK only after COMMIT. On start the worker first re-reads its own pending entries
  (``XREADGROUP … 0``); every ``claim_interval_s`` it takes over entries another consumer
  (or itself) left unacknowledged for ``claim_idle_ms`` (XAUTOCLAIM, Redis 6.2).
* PostgreSQL down or restarting: the batch is retried with backoff and every pooled
  connection is replaced (they all went stale); nothing is acknowledged meanwhile. The
  same wait applies to any refusal that is not about the values (no such table, a
  read-only server after a failover): such errors never send entries to dead letters.
* A bad entry never blocks the others. One that cannot be parsed, or whose values
  PostgreSQL refuses (SQLSTATE class 22/23) even alone — the batch is split in halves
  down to single entries to find it — ``max_attempts`` times, or that was delivered
  ``max_deliveries`` times without being committed (it keeps crashing workers) goes to the
  dead-letter stream ``{<prefix>:<sale>}:dead`` with the error — its original fields plus
  ``dead_*`` fields — and is acknowledged in the same MULTI.
* The stream is trimmed with ``XTRIM MINID`` below the oldest entry any group has not
  acknowledged (never MAXLEN, which can drop entries not yet written).
* On a Redis Cluster (a ``RedisCluster`` client) each sale's stream lives in its sale's
  hash slot, and one XREADGROUP may only name streams of one slot: new entries are read
  with one XREADGROUP per slot, all sent in one pipeline (one round trip per shard). A
  cluster cannot BLOCK on several shards at once, so an idle cluster read waits
  ``block_ms`` and asks again. Everything else is per stream (XAUTOCLAIM, XACK, XTRIM),
  and a dead letter's MULTI stays in its sale's slot.

Backlog (for metrics): Redis 6.2's XINFO GROUPS has no ``lag``, so :func:`stream_backlog`
reports ``pending`` exactly (XPENDING) and ``undelivered`` exactly when it is zero or
when Redis ≥ 7 reports ``lag``; otherwise as the upper bound ``XLEN - pending``, which is
close because the worker trims acknowledged entries every ``trim_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import asyncpg
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.keys import ServiceKeys
from flashsale.pgpool import forget_connections, is_data_error, is_transient
from flashsale.redis_client import as_text
from flashsale.settings import Settings, SettingsError
from flashsale.settings import parse_env_value as parse_setting
from flashsale.streams import GROUP, dead_letter_key, ensure_group, events_key
from inventory import EventError, OrderEvent, StreamId, parse_event

__all__ = [
    "OrderWriter",
    "WORKER_ENV_DOC",
    "WorkerSettings",
    "WriterStats",
]


logger = logging.getLogger("flashsale.worker")

# A cluster whose slots are not all served (a shard down, a failover in progress) answers
# CLUSTERDOWN / TRYAGAIN: an outage to wait out like a lost connection, not a bug.
_REDIS_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError)
_RANK = {"held": 0, "paid": 1, "cancelled": 1, "expired": 1}


# ------------------------------------------------------------------------ settings
#: The worker's own settings: (environment variable, field, meaning). The shared ones
#: (FLASHSALE_REDIS_URL, FLASHSALE_REDIS_CLUSTER, FLASHSALE_DATABASE_URL,
#: FLASHSALE_KEY_PREFIX) come from :class:`flashsale.settings.Settings`.
WORKER_ENV_DOC: tuple[tuple[str, str, str], ...] = (
    (
        "FLASHSALE_WORKER_CONSUMER",
        "consumer",
        "consumer name in the writers' group (default: host name); one per worker",
    ),
    ("FLASHSALE_WORKER_BATCH", "batch", "stream entries per PostgreSQL transaction, at most (default 1000)"),
    (
        "FLASHSALE_WORKER_BLOCK_MS",
        "block_ms",
        "how long an idle worker waits for new entries per read (default 100)",
    ),
    (
        "FLASHSALE_WORKER_LINGER_MS",
        "linger_ms",
        "after a short read, wait this long for more entries to fill the batch (default 2)",
    ),
    (
        "FLASHSALE_WORKER_CLAIM_IDLE_MS",
        "claim_idle_ms",
        "take over entries another worker left unacknowledged this long (default 60000)",
    ),
    (
        "FLASHSALE_WORKER_CLAIM_INTERVAL_S",
        "claim_interval_s",
        "how often to look for such entries (default 5)",
    ),
    (
        "FLASHSALE_WORKER_MAX_DELIVERIES",
        "max_deliveries",
        "deliveries without a commit before an entry is dead-lettered (default 10)",
    ),
    (
        "FLASHSALE_WORKER_MAX_ATTEMPTS",
        "max_attempts",
        "failed writes of an entry on its own before it is dead-lettered (default 3)",
    ),
    (
        "FLASHSALE_WORKER_TRIM_INTERVAL_S",
        "trim_interval_s",
        "how often to trim committed entries off the streams; 0 = never (default 5)",
    ),
    ("FLASHSALE_WORKER_SALES_REFRESH_S", "sales_refresh_s", "how often to look for new sales (default 2)"),
    (
        "FLASHSALE_WORKER_WRITE_METHOD",
        "write_method",
        "unnest (one statement per batch, default) or copy (COPY into temp tables)",
    ),
    (
        "FLASHSALE_WORKER_STATEMENT_TIMEOUT_MS",
        "statement_timeout_ms",
        "PostgreSQL statement timeout for the worker (default 30000)",
    ),
    ("FLASHSALE_WORKER_POOL_SIZE", "pool_size", "PostgreSQL connections per worker (default 4)"),
    (
        "FLASHSALE_WORKER_STOP_GRACE_S",
        "stop_grace_s",
        "after SIGTERM, keep retrying the batch in hand this long (default 10)",
    ),
    (
        "FLASHSALE_WORKER_PROGRESS_INTERVAL_S",
        "progress_interval_s",
        "one progress log line this often (default 10)",
    ),
    ("FLASHSALE_SWEEPER_INTERVAL_MS", "sweep_interval_ms", "pause between hold-expiry sweeps (default 200)"),
    ("FLASHSALE_SWEEPER_LIMIT", "sweep_limit", "holds expired per script call, 1..1000 (default 500)"),
)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The order writer's and sweeper's settings; :meth:`from_env` reads ``FLASHSALE_*``."""

    redis_url: str
    database_url: str = ""  # the order writer needs it; the sweeper alone does not
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    prefix: str = "fs"
    #: Consumer name in the group. Stable across restarts (so a restarted worker finds its
    #: own pending entries); give each worker on one host its own.
    consumer: str = field(default_factory=socket.gethostname)
    batch: int = 1000
    block_ms: int = 100
    linger_ms: int = 2
    claim_idle_ms: int = 60_000
    claim_interval_s: float = 5.0
    max_deliveries: int = 10
    max_attempts: int = 3
    trim_interval_s: float = 5.0
    sales_refresh_s: float = 2.0
    write_method: str = "unnest"
    statement_timeout_ms: int = 30_000
    pool_size: int = 4
    stop_grace_s: float = 10.0
    progress_interval_s: float = 10.0
    sweep_interval_ms: int = 200
    sweep_limit: int = 500

    def __post_init__(self) -> None:
        problems = []
        if not self.redis_url:
            problems.append(
                "FLASHSALE_REDIS_URL must name the service's Redis, e.g. redis://127.0.0.1:6379/0"
            )
        if not 1 <= self.batch <= 100_000:
            problems.append("FLASHSALE_WORKER_BATCH must be 1..100000")
        if self.write_method not in ("unnest", "copy"):
            problems.append("FLASHSALE_WORKER_WRITE_METHOD must be 'unnest' or 'copy'")
        if not 1 <= self.sweep_limit <= 1000:
            problems.append("FLASHSALE_SWEEPER_LIMIT must be 1..1000 (the expire script's bound)")
        if (
            min(
                self.max_deliveries,
                self.max_attempts,
                self.block_ms,
                self.claim_idle_ms,
                self.statement_timeout_ms,
                self.pool_size,
                self.sweep_interval_ms,
            )
            < 1
        ):
            problems.append("counts, sizes and times in ms must be at least 1")
        if (
            min(
                self.linger_ms,
                self.claim_interval_s,
                self.trim_interval_s,
                self.sales_refresh_s,
                self.stop_grace_s,
                self.progress_interval_s,
            )
            < 0
        ):
            problems.append("intervals must not be negative")
        if problems:
            raise SettingsError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``FLASHSALE_*`` variables; ``overrides`` (CLI flags) win."""
        env = os.environ if environ is None else environ
        shared = Settings.from_env(env)
        values: dict[str, Any] = {
            "redis_url": shared.redis_url,
            "redis_cluster": shared.redis_cluster,
            "database_url": shared.database_url or "",
            "prefix": shared.key_prefix,
        }
        types = {f.name: str(f.type) for f in fields(cls)}
        for var, name, _meaning in WORKER_ENV_DOC:
            raw = env.get(var, "").strip()
            if raw:
                values[name] = parse_setting(var, raw, types[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _fields(raw: Mapping[Any, Any] | None) -> dict[str, str] | None:
    """Entry fields as str, whichever way the client decodes replies."""
    if not raw or isinstance(next(iter(raw)), str):
        return raw  # type: ignore[return-value]
    return {
        as_text(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in raw.items()
    }


# ------------------------------------------------------------------------ entries
class EntryError(ValueError):
    """A stream entry that can never be written: malformed or of an unknown type."""


@dataclass(slots=True)
class StreamEntry:
    sale: str
    key: str
    stream_id: str
    fields: dict[str, str] | None  # None: the entry was deleted while pending


@dataclass(frozen=True, slots=True)
class OrderChange:
    order_id: str
    sale: str
    user: str
    request_id: str
    status: str
    lines: tuple[tuple[str, int], ...]
    pay_by_ms: int
    at_ms: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class StockChange:
    sale: str
    stream_id: str
    type: str
    sku: str
    total: int | None
    reserve: int | None
    per_user_limit: int | None
    low_stock_line: int | None
    delta: int | None
    units: int | None
    at_ms: int
    transfer: str | None = None  # the bucket transfer that moved the units, if one did


def parse_entry(entry: StreamEntry) -> OrderChange | StockChange:
    """The change a stream entry records; :class:`EntryError` if it cannot be written. The
    fields are read by inventory's entry contract (``inventory.parse_event``); what is
    checked here is the writer's own: the entry's order belongs to the stream's sale."""
    if entry.fields is None:
        raise EntryError("the entry was deleted from the stream before it was written")
    try:
        event = parse_event(entry.fields)
    except EventError as exc:
        raise EntryError(str(exc)) from None
    if isinstance(event, OrderEvent):
        if not event.hold_id.startswith(entry.sale + "."):
            raise EntryError(f"order id {event.hold_id[:80]!r} is not from sale {entry.sale!r}")
        return OrderChange(
            order_id=event.hold_id,
            sale=entry.sale,
            user=event.user,
            request_id=event.request_id,
            status=event.state.value,
            lines=tuple((line.sku, line.qty) for line in event.lines),
            pay_by_ms=event.deadline_ms,
            at_ms=event.at_ms,
            stream_id=entry.stream_id,
        )
    return StockChange(
        sale=entry.sale,
        stream_id=entry.stream_id,
        type=event.type,
        sku=event.sku,
        total=event.total,
        reserve=event.reserve,
        per_user_limit=event.limit_per_user,
        low_stock_line=event.low_stock_line,
        delta=event.delta,
        units=event.units,
        at_ms=event.at_ms,
        transfer=event.transfer,
    )


# ---------------------------------------------------------------------- SQL
# A batch is folded to one row per order first (ON CONFLICT cannot touch a row twice in
# one statement), then written by one statement: orders, their lines and the stock
# events, each idempotent. One statement is one transaction and one round trip.
_ORDER_UPSERT = """
INSERT INTO orders AS cur (order_id, sale, user_id, request_id, status, status_rank,
                           created_at, pay_by, status_at, last_stream_id)
SELECT order_id, sale, user_id, request_id, status, status_rank,
       to_timestamp(created_ms / 1000.0), to_timestamp(pay_by_ms / 1000.0),
       to_timestamp(status_ms / 1000.0), stream_id
FROM {source}
ORDER BY order_id  -- one lock order for every writer: concurrent batches cannot deadlock
ON CONFLICT (order_id) DO UPDATE SET
    status = CASE WHEN excluded.status_rank > cur.status_rank THEN excluded.status ELSE cur.status END,
    status_at = CASE WHEN excluded.status_rank > cur.status_rank THEN excluded.status_at ELSE cur.status_at END,
    last_stream_id = CASE WHEN excluded.status_rank > cur.status_rank
                          THEN excluded.last_stream_id ELSE cur.last_stream_id END,
    status_rank = GREATEST(cur.status_rank, excluded.status_rank),
    created_at = COALESCE(cur.created_at, excluded.created_at),
    written_at = now()
WHERE excluded.status_rank > cur.status_rank
   OR (cur.created_at IS NULL AND excluded.created_at IS NOT NULL)
RETURNING 1
"""

_LINES_INSERT = """
INSERT INTO order_lines (order_id, sku, qty)
SELECT order_id, sku, qty FROM {source} ORDER BY order_id, sku
ON CONFLICT (order_id, sku) DO NOTHING
RETURNING 1
"""

_STOCK_INSERT = """
INSERT INTO stock_events (sale, stream_id, type, sku, total, reserve, per_user_limit,
                          low_stock_line, delta, units, at, transfer)
SELECT sale, stream_id, type, sku, total, reserve, per_user_limit, low_stock_line, delta,
       units, to_timestamp(at_ms / 1000.0), transfer
FROM {source}
ON CONFLICT (sale, stream_id) DO NOTHING
RETURNING 1
"""

_ORDER_COLUMNS = (
    ("order_id", "text"),
    ("sale", "text"),
    ("user_id", "text"),
    ("request_id", "text"),
    ("status", "text"),
    ("status_rank", "int2"),
    ("created_ms", "int8"),
    ("pay_by_ms", "int8"),
    ("status_ms", "int8"),
    ("stream_id", "text"),
)
_LINE_COLUMNS = (("order_id", "text"), ("sku", "text"), ("qty", "int4"))
_STOCK_COLUMNS = (
    ("sale", "text"),
    ("stream_id", "text"),
    ("type", "text"),
    ("sku", "text"),
    ("total", "int4"),
    ("reserve", "int4"),
    ("per_user_limit", "int4"),
    ("low_stock_line", "int4"),
    ("delta", "int4"),
    ("units", "int4"),
    ("at_ms", "int8"),
    ("transfer", "text"),
)


def _unnest(columns: Sequence[tuple[str, str]], first_param: int) -> str:
    args = ", ".join(f"${first_param + i}::{kind}[]" for i, (_, kind) in enumerate(columns))
    names = ", ".join(name for name, _ in columns)
    return f"unnest({args}) AS t({names})"


def _unnest_statement() -> str:
    orders = _unnest(_ORDER_COLUMNS, 1)
    lines = _unnest(_LINE_COLUMNS, 1 + len(_ORDER_COLUMNS))
    stock = _unnest(_STOCK_COLUMNS, 1 + len(_ORDER_COLUMNS) + len(_LINE_COLUMNS))
    return f"""
WITH o AS ({_ORDER_UPSERT.format(source=orders)}),
     l AS ({_LINES_INSERT.format(source=lines)}),
     s AS ({_STOCK_INSERT.format(source=stock)})
SELECT (SELECT count(*) FROM o) AS orders, (SELECT count(*) FROM l) AS lines,
       (SELECT count(*) FROM s) AS stock_events
"""


_UNNEST_SQL = _unnest_statement()


def _temp_table(name: str, columns: Sequence[tuple[str, str]]) -> str:
    cols = ", ".join(f"{n} {kind}" for n, kind in columns)
    return f"CREATE TEMP TABLE IF NOT EXISTS {name} ({cols}) ON COMMIT DELETE ROWS"


_COPY_SETUP = ";\n".join(
    [
        "SET LOCAL client_min_messages = warning",  # no NOTICE for an existing temp table
        _temp_table("incoming_orders", _ORDER_COLUMNS),
        _temp_table("incoming_lines", _LINE_COLUMNS),
        _temp_table("incoming_stock", _STOCK_COLUMNS),
    ]
)
_COPY_SQL = f"""
WITH o AS ({_ORDER_UPSERT.format(source="incoming_orders")}),
     l AS ({_LINES_INSERT.format(source="incoming_lines")}),
     s AS ({_STOCK_INSERT.format(source="incoming_stock")})
SELECT (SELECT count(*) FROM o) AS orders, (SELECT count(*) FROM l) AS lines,
       (SELECT count(*) FROM s) AS stock_events
"""


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows one batch wrote (rows already present and unchanged are not counted)."""

    orders: int = 0
    lines: int = 0
    stock_events: int = 0

    @property
    def total(self) -> int:
        return self.orders + self.lines + self.stock_events


def _fold(
    changes: Sequence[OrderChange | StockChange],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Rows for orders, lines and stock events; one order row per order id."""
    best: dict[str, OrderChange] = {}
    created: dict[str, int] = {}
    stock: list[tuple[Any, ...]] = []
    for c in changes:
        if isinstance(c, StockChange):
            stock.append(
                (
                    c.sale,
                    c.stream_id,
                    c.type,
                    c.sku,
                    c.total,
                    c.reserve,
                    c.per_user_limit,
                    c.low_stock_line,
                    c.delta,
                    c.units,
                    c.at_ms,
                    c.transfer,
                )
            )
            continue
        if c.status == "held":
            created[c.order_id] = c.at_ms
        seen = best.get(c.order_id)
        # The first change of the highest rank wins, as in the database: the first
        # terminal status an order reaches is the one it keeps.
        if seen is None or _RANK[c.status] > _RANK[seen.status]:
            best[c.order_id] = c
    orders: list[tuple[Any, ...]] = []
    lines: list[tuple[Any, ...]] = []
    for order_id, c in best.items():
        orders.append(
            (
                order_id,
                c.sale,
                c.user,
                c.request_id,
                c.status,
                _RANK[c.status],
                created.get(order_id),
                c.pay_by_ms,
                c.at_ms,
                c.stream_id,
            )
        )
        lines.extend((order_id, sku, qty) for sku, qty in c.lines)
    return orders, lines, stock


async def write_changes(
    conn: asyncpg.Connection, changes: Sequence[OrderChange | StockChange], method: str = "unnest"
) -> Rows:
    """Write one batch in one transaction, idempotently. Raises on any failure (nothing written)."""
    orders, lines, stock = _fold(changes)
    if method == "unnest":
        columns = [list(col) for col in zip(*orders)] if orders else [[] for _ in _ORDER_COLUMNS]
        columns += [list(col) for col in zip(*lines)] if lines else [[] for _ in _LINE_COLUMNS]
        columns += [list(col) for col in zip(*stock)] if stock else [[] for _ in _STOCK_COLUMNS]
        row = await conn.fetchrow(_UNNEST_SQL, *columns)
    else:
        async with conn.transaction():
            await conn.execute(_COPY_SETUP)
            for table, records, cols in (
                ("incoming_orders", orders, _ORDER_COLUMNS),
                ("incoming_lines", lines, _LINE_COLUMNS),
                ("incoming_stock", stock, _STOCK_COLUMNS),
            ):
                if records:
                    await conn.copy_records_to_table(table, records=records, columns=[n for n, _ in cols])
            row = await conn.fetchrow(_COPY_SQL)
    assert row is not None
    return Rows(row["orders"], row["lines"], row["stock_events"])


# -------------------------------------------------------------------- the writer
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
        self._streams: dict[str, str] = {}  # stream key -> sale
        # Cluster only: the streams grouped by hash slot, one XREADGROUP each (None: regroup).
        self._on_cluster = isinstance(redis, RedisCluster)
        self._slot_reads: list[dict[str, str]] | None = None
        self._stop = asyncio.Event()
        self._stop_deadline = float("inf")
        self._pg_down_since: float | None = None
        self._redis_down_since: float | None = None
        self._published = WriterStats()

    # -- public
    @property
    def sales(self) -> list[str]:
        return sorted(self._streams.values())

    def stop(self) -> None:
        """Finish the current batch, then return from :meth:`run`."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self.settings.stop_grace_s
            self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop`. Redis and PostgreSQL outages are waited out."""
        publisher = asyncio.ensure_future(self._publish_forever())
        try:
            await self._run()
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
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
                await done

        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_sales:
                    await self.refresh_sales()
                    next_sales = now + s.sales_refresh_s
                for key in [k for k in self._streams if k not in pending_done]:
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
                entries = await self._read_new()
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
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (Redis restarted empty, key deleted): re-create.
                _log("group_missing", level=logging.WARNING, error=str(exc))
                self._streams.clear()
                self._slot_reads = None
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

    async def refresh_sales(self) -> None:
        """Join the writers' group on every sale listed in ``<prefix>:sales``."""
        prefix = self.settings.prefix
        for sale in sorted(as_text(m) for m in await self.redis.smembers(ServiceKeys(prefix).sales)):
            key = events_key(prefix, sale)
            if key not in self._streams:
                await ensure_group(self.redis, key)
                self._streams[key] = sale
                self._slot_reads = None
                _log("sale_joined", sale=sale, stream=key)

    async def drain_own_pending(self, key: str) -> None:
        """Write the entries this consumer read before (a previous run) but never acknowledged."""
        after = "0"
        while not self._stop.is_set():
            reply = await self.redis.xreadgroup(
                GROUP, self.settings.consumer, {key: after}, count=self.settings.batch
            )
            entries = self._entries(reply)
            if not entries:
                return
            after = entries[-1].stream_id
            _log("pending_reread", stream=key, entries=len(entries))
            await self.commit(entries, check_deliveries=True)

    async def reclaim(self) -> None:
        """XAUTOCLAIM entries idle longer than ``claim_idle_ms`` (a dead consumer's) and write them."""
        s = self.settings
        for key, sale in list(self._streams.items()):
            start = "0-0"
            while not self._stop.is_set():
                reply = await self.redis.xautoclaim(
                    key, GROUP, s.consumer, s.claim_idle_ms, start, count=s.batch
                )
                start = as_text(reply[0])
                entries = [
                    StreamEntry(sale, key, as_text(i), _fields(f)) for i, f in reply[1] if i is not None
                ]
                if entries:
                    self.stats.reclaimed += len(entries)
                    _log("reclaimed", stream=key, entries=len(entries))
                    await self.commit(entries, check_deliveries=True)
                if start == "0-0":
                    break
            await self._forget_idle_consumers(key)

    async def trim(self) -> None:
        """XTRIM MINID each stream to its oldest entry not acknowledged by every group."""
        for key in list(self._streams):
            floor = await _trim_floor(self.redis, key)
            if floor is not None:
                self.stats.trimmed += int(await self.redis.xtrim(key, minid=floor, approximate=False))

    async def commit(self, entries: list[StreamEntry], *, check_deliveries: bool = False) -> None:
        """Write ``entries`` to PostgreSQL, dead-letter the ones that cannot be, then XACK."""
        started = time.perf_counter()
        self.stats.entries_read += len(entries)
        if check_deliveries:
            entries = await self._dead_letter_redelivered(entries)
        for chunk_start in range(0, len(entries), self.settings.batch):
            chunk = entries[chunk_start : chunk_start + self.settings.batch]
            good: list[tuple[StreamEntry, OrderChange | StockChange]] = []
            for entry in chunk:
                try:
                    good.append((entry, parse_entry(entry)))
                except EntryError as exc:
                    await self._dead_letter(entry, exc, deliveries=None)
            if good:
                dead = await self._write_isolating(good)
                await self._ack([e for e, _ in good if (e.key, e.stream_id) not in dead])
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
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(*_REDIS_OUTAGE, ResponseError):  # best effort
                await self.publish_stats()

    # -- reading
    def _entries(self, reply: Any) -> list[StreamEntry]:
        out: list[StreamEntry] = []
        for key, items in reply or []:
            key = as_text(key)
            sale = self._streams[key]
            out.extend(StreamEntry(sale, key, as_text(i), _fields(f)) for i, f in items)
        return out

    async def _read_new(self) -> list[StreamEntry]:
        if not self._streams:
            await asyncio.sleep(self.settings.block_ms / 1000)
            return []
        s = self.settings
        read = self._read_per_slot if self._on_cluster else self._read_together
        entries = await read(s.batch, s.block_ms)
        if entries and len(entries) < s.batch and s.linger_ms > 0:
            # A short read: wait a moment so the next transaction carries more than a few rows.
            await asyncio.sleep(s.linger_ms / 1000)
            entries += await read(s.batch - len(entries), None)
        return entries

    async def _read_together(self, count: int, block: int | None) -> list[StreamEntry]:
        """One server: every stream in one XREADGROUP (``count`` per stream)."""
        streams = {key: ">" for key in self._streams}
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
            for key in self._streams:
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

    # -- writing
    async def _write_isolating(
        self, items: list[tuple[StreamEntry, OrderChange | StockChange]]
    ) -> set[tuple[str, str]]:
        """Write a batch; if the data is refused, split it in halves to find the bad entries
        and dead-letter them. Returns the (stream, id) pairs dead-lettered (already acknowledged)."""
        try:
            await self._write_with_retry([c for _, c in items])
            return set()
        except asyncpg.PostgresError as exc:  # the values were refused (see _write_with_retry)
            if len(items) > 1:
                self.stats.split_batches += 1
                _log("batch_split", level=logging.WARNING, entries=len(items), error=_describe(exc))
                mid = len(items) // 2
                return await self._write_isolating(items[:mid]) | await self._write_isolating(items[mid:])
            failure = exc
        entry, change = items[0]
        for attempt in range(2, self.settings.max_attempts + 1):
            await asyncio.sleep(0.05 * attempt)  # a failure alone may still have been a fluke
            try:
                await self._write_with_retry([change])
                return set()
            except asyncpg.PostgresError as exc:
                failure = exc
        await self._dead_letter(entry, failure, deliveries=None, attempts=self.settings.max_attempts)
        return {(entry.key, entry.stream_id)}

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
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.key, []).append(e.stream_id)
        if not by_stream:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in by_stream.items():
                pipe.xack(key, GROUP, *ids)
            await pipe.execute()
        self.stats.entries_committed += len(entries)

    # -- dead letters
    async def _delivery_counts(self, entries: list[StreamEntry]) -> list[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.xpending_range(e.key, GROUP, e.stream_id, e.stream_id, 1)
            replies = await pipe.execute()
        return [int(r[0]["times_delivered"]) if r else 0 for r in replies]

    async def _dead_letter_redelivered(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        keep: list[StreamEntry] = []
        for entry, count in zip(entries, await self._delivery_counts(entries)):
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
        meta = {
            "dead_stream_id": entry.stream_id,
            "dead_error": _describe(error)[:1000],
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
        self.stats.dead_letters += 1
        _log(
            "dead_letter",
            level=logging.ERROR,
            sale=entry.sale,
            stream_id=entry.stream_id,
            error=meta["dead_error"],
            type=(entry.fields or {}).get("type"),
        )

    # -- upkeep
    async def _forget_idle_consumers(self, key: str) -> None:
        """Remove consumers that own nothing and were idle far longer than the claim time
        (workers that died and whose entries were taken over): XINFO stays readable."""
        limit = self.settings.claim_idle_ms * 10
        for c in await self.redis.xinfo_consumers(key, GROUP):
            name = as_text(c["name"])
            if name != self.settings.consumer and int(c["pending"]) == 0 and int(c["idle"]) > limit:
                await self.redis.xgroup_delconsumer(key, GROUP, name)

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


async def _trim_floor(redis: Any, key: str) -> str | None:
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
