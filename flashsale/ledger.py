"""The PostgreSQL read model: every read of what the order writer recorded (``orders``,
``order_lines``, ``stock_events``), and the one fold of stock events into each SKU's stock.

The writer owns the write side (``flashsale.pipeline.order_sql``); everything that reads the
record back — the audit, recovery, the fence's checks, the drills' checker and the
archived-order lookup — reads it here, so a column or a rule of the fold is
changed in one place.

The fold (:func:`fold_stock`), in stream order per SKU:

===================  ==================================================================
event type           effect on the SKU's recorded stock
===================  ==================================================================
``stocked``          total, reserve pool, per-user limit and low-stock line set afresh
``restocked``        total += delta
``written_off``      total += delta (delta < 0)
``reserve_released`` reserve pool -= units (they moved to ``available``)
===================  ==================================================================

Generations. A sale id used again (a yearly ``d11``) has the rows of each of its creations
here; no column says which. Each creation (a generation) is named by the instant it was
made, in ms of the Redis clock, and every row carries that clock already: an order its
creation time (:data:`ORDER_MADE_AT`), a stock event its stream id. A row belongs to the
newest generation created at or before it (:func:`generation_of`); the reads below take a
``since`` (engine sale -> generation) to read one creation and what came after it.
A bucket transfer's id is on both of its stock events (``transfer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ORDER_MADE_AT",
    "ArchivedOrder",
    "SaleRecords",
    "SchemaMissing",
    "SkuStock",
    "archived_order",
    "fold_stock",
    "generation_of",
    "last_paid_ms",
    "made_at_ms",
    "newest_stock_event_ms",
    "order_counts",
    "order_timing",
    "orders_known",
    "paid_units",
    "read_sales",
    "require_schema",
]


#: When an order was made, on the Redis clock: its "reserved" entry's time (a row a closing
#: entry wrote first has only the time of its status until then). What places it in a generation.
ORDER_MADE_AT = "coalesce(o.created_at, o.status_at)"


def generation_of(at_ms: int, generations: Iterable[int]) -> int:
    """The generation a row made at ``at_ms`` (Redis clock) belongs to: the newest of
    ``generations`` created at or before it; 0 (before any recorded) if none."""
    return max((g for g in generations if g <= at_ms), default=0)


def made_at_ms(order: Mapping[str, Any]) -> int:
    """An order row's :data:`ORDER_MADE_AT`, in ms."""
    made: datetime = order["created_at"] or order["status_at"]
    return round(made.timestamp() * 1000)


# A per-engine lower bound (a generation) joined to a query: $1 engines, $2 their bounds.
_SINCE = "unnest($1::text[], $2::bigint[]) AS g(sale, since)"
_MADE_SINCE = f"{ORDER_MADE_AT} >= to_timestamp(g.since / 1000.0)"


def _bounds(engines: Sequence[str], since: Mapping[str, int] | None) -> list[list[Any]]:
    names = list(engines)
    return [names, [int((since or {}).get(e, 0)) for e in names]]


@dataclass(slots=True)
class SkuStock:
    """One SKU's stock as PostgreSQL recorded it."""

    total: int = 0
    reserve: int = 0
    limit: int = 0
    low: int = 0
    stocked: bool = False  # a ``stocked`` event was recorded


def fold_stock(events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], SkuStock]:
    """(engine sale, sku) -> recorded stock, folding ``events`` in the order given (stream
    order). Each event needs ``sale``, ``sku``, ``type`` and the columns its type uses."""
    stock: dict[tuple[str, str], SkuStock] = {}
    for e in events:
        s = stock.setdefault((e["sale"], e["sku"]), SkuStock())
        kind = e["type"]
        if kind == "stocked":
            s.total, s.reserve = int(e["total"]), int(e["reserve"])
            s.limit = int(e.get("per_user_limit") or 0)
            s.low = int(e.get("low_stock_line") or 0)
            s.stocked = True
        elif kind in ("restocked", "written_off"):
            s.total += int(e["delta"])
        elif kind == "reserve_released":
            s.reserve -= int(e["units"])
    return stock


@dataclass(slots=True)
class SaleRecords:
    """What PostgreSQL holds for some engine sales, read in one snapshot."""

    orders: list[Mapping[str, Any]] = field(default_factory=list)
    lines: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # order id -> (sku, qty)
    events: list[Mapping[str, Any]] = field(default_factory=list)  # stock events, stream order

    def stock(self) -> dict[tuple[str, str], SkuStock]:
        return fold_stock(self.events)

    def since(self, generation: int) -> SaleRecords:
        """Only the rows of ``generation`` and later ones (every sale here from it on)."""
        orders = [o for o in self.orders if made_at_ms(o) >= generation]
        kept = {o["order_id"] for o in orders}
        return SaleRecords(
            orders,
            {k: v for k, v in self.lines.items() if k in kept},
            [e for e in self.events if e["stream_ms"] >= generation],
        )


class SchemaMissing(RuntimeError):
    """PostgreSQL has not been migrated (``flashsale migrate``)."""


async def require_schema(conn: Any) -> None:
    if not await conn.fetchval("SELECT to_regclass('orders') IS NOT NULL"):
        raise SchemaMissing("PostgreSQL has no orders table: run `flashsale migrate` first")


_ORDER_COLUMNS = "order_id, sale, user_id, request_id, status, created_at, pay_by, status_at, last_stream_id"
_EVENT_COLUMNS = (
    "sale, stream_id, stream_ms, stream_seq, type, sku, total, reserve, per_user_limit, "
    "low_stock_line, delta, units, transfer"
)


async def read_sales(pool: Any, sales: Sequence[str], *, with_buckets: bool = False) -> SaleRecords:
    """Orders, their lines and the stock events of ``sales`` (engine sale ids), in one
    repeatable-read snapshot. ``with_buckets`` also reads each sale's buckets
    (``<sale>-b<k>``)."""
    names = list(sales)
    if with_buckets:
        where, args = (
            "sale = ANY($1::text[]) OR sale LIKE ANY($2::text[])",
            [names, [f"{s}-b%" for s in names]],
        )
    else:
        where, args = "sale = ANY($1::text[])", [names]
    records = SaleRecords()
    async with pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await require_schema(conn)
            records.orders = await conn.fetch(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE {where}", *args)
            for r in await conn.fetch(
                "SELECT l.order_id, l.sku, l.qty FROM order_lines l "
                f"WHERE l.order_id IN (SELECT order_id FROM orders WHERE {where}) ORDER BY l.order_id, l.sku",
                *args,
            ):
                records.lines.setdefault(r["order_id"], []).append((r["sku"], int(r["qty"])))
            records.events = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM stock_events WHERE {where} ORDER BY sale, sku, stream_ms, stream_seq",
                *args,
            )
    return records


async def orders_known(pool: Any, order_ids: Sequence[str]) -> set[str]:
    """Which of ``order_ids`` PostgreSQL has."""
    if not order_ids:
        return set()
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT order_id FROM orders WHERE order_id = ANY($1::text[])", list(order_ids)
        )
    return {r["order_id"] for r in rows}


@dataclass(frozen=True, slots=True)
class ArchivedOrder:
    """An order as PostgreSQL recorded it (for a sale Redis no longer holds)."""

    order_id: str
    user: str
    status: str
    request_id: str
    pay_by: datetime
    created_at: datetime
    lines: tuple[tuple[str, int], ...]


#: Connections of cancelled look-ups on their way back to their pool (asyncio keeps only
#: weak references to tasks: one nobody holds may vanish mid-way).
_RETURNING: set[asyncio.Task[None]] = set()


async def archived_order(pool: Any, order_id: str, *, timeout: float | None = None) -> ArchivedOrder | None:
    """One order and its lines, or None when PostgreSQL has no such order. ``timeout``
    bounds the wait for a connection and, asyncpg's rule, its way back to the pool.

    A caller cancelled mid-query (its deadline) goes at once. asyncpg then cancels the
    query on the server and gives the connection back only once PostgreSQL confirmed that
    (or, after ``timeout``, by terminating it): a PostgreSQL stuck or cut off, which never
    confirms, would hold the caller about as long again. So that wait goes on without the
    caller; the connection is back in the pool when it ends."""
    conn = await pool.acquire(timeout=timeout)
    try:
        row = await conn.fetchrow(
            "SELECT user_id, status, request_id, pay_by, coalesce(created_at, status_at) AS created_at"
            " FROM orders WHERE order_id = $1",
            order_id,
        )
        lines = (
            []
            if row is None
            else await conn.fetch(
                "SELECT sku, qty FROM order_lines WHERE order_id = $1 ORDER BY sku", order_id
            )
        )
    except asyncio.CancelledError:
        _release_unawaited(pool, conn)
        raise
    except BaseException:
        await pool.release(conn)
        raise
    await pool.release(conn)
    if row is None:
        return None
    return ArchivedOrder(
        order_id,
        row["user_id"],
        row["status"],
        row["request_id"],
        row["pay_by"],
        row["created_at"],
        tuple((r["sku"], int(r["qty"])) for r in lines),
    )


def _release_unawaited(pool: Any, conn: Any) -> None:
    """``pool.release(conn)`` in a task of its own (its failure, a connection asyncpg had to
    terminate, is asyncpg's to clean up and nobody's to hear)."""
    returning = asyncio.ensure_future(pool.release(conn))
    _RETURNING.add(returning)
    returning.add_done_callback(_returned)


def _returned(task: asyncio.Task[None]) -> None:
    _RETURNING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: asyncio logs an exception nobody retrieved


# ------------------------------------------------- aggregates (the fence and recovery)
async def newest_stock_event_ms(conn: Any, since: Mapping[str, int] | None = None) -> dict[str, int]:
    """Engine sale -> the newest stream ms of its recorded stock events (for the engines in
    ``since``, of that generation on; of every one for the others)."""
    rows = await conn.fetch(
        f"SELECT e.sale, max(e.stream_ms) AS ms FROM stock_events e LEFT JOIN {_SINCE} USING (sale) "
        "WHERE e.stream_ms >= coalesce(g.since, 0) GROUP BY e.sale",
        *_bounds(list(since or {}), since),
    )
    return {r["sale"]: int(r["ms"]) for r in rows}


async def order_counts(
    conn: Any, engines: Sequence[str], since: Mapping[str, int] | None = None
) -> dict[str, tuple[int, int]]:
    """Engine sale -> (orders recorded, newest stream ms among their last entries), counting
    the orders of its generation in ``since`` and later (default: all)."""
    rows = await conn.fetch(
        "SELECT o.sale, count(*) AS n, max(split_part(o.last_stream_id, '-', 1)::bigint) AS ms "
        f"FROM orders o JOIN {_SINCE} USING (sale) WHERE {_MADE_SINCE} GROUP BY o.sale",
        *_bounds(engines, since),
    )
    return {r["sale"]: (int(r["n"]), int(r["ms"])) for r in rows}


async def paid_units(
    conn: Any, engines: Sequence[str], since: Mapping[str, int] | None = None
) -> dict[tuple[str, str], int]:
    """(engine sale, sku) -> units in paid orders (of its generation in ``since`` and later)."""
    rows = await conn.fetch(
        "SELECT o.sale, l.sku, sum(l.qty) AS units FROM orders o JOIN order_lines l USING (order_id) "
        f"JOIN {_SINCE} ON g.sale = o.sale WHERE o.status = 'paid' AND {_MADE_SINCE} GROUP BY o.sale, l.sku",
        *_bounds(engines, since),
    )
    return {(r["sale"], r["sku"]): int(r["units"]) for r in rows}


async def last_paid_ms(pool: Any, engines: Sequence[str]) -> dict[str, int]:
    """SKU -> when (ms of the Redis server's clock, as the engine stamped it) the latest
    payment of it among ``engines``' orders happened: for a SKU sold out, its sell-out. (The
    latest: a reused sale id's earlier generations paid earlier.)"""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT l.sku, (extract(epoch FROM max(o.status_at)) * 1000)::bigint AS ms "
            "FROM orders o JOIN order_lines l USING (order_id) "
            "WHERE o.status = 'paid' AND o.sale = ANY($1::text[]) GROUP BY l.sku",
            list(engines),
        )
    return {r["sku"]: int(r["ms"]) for r in rows}


async def order_timing(
    pool: Any, engines: Sequence[str], since: int = 0
) -> tuple[float | None, datetime | None]:
    """(median seconds from an order's creation to its payment deadline, the first order's
    creation time) over ``engines``' orders made at or after ``since`` (a generation): a
    sale's hold TTL and opening, read off its orders."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM pay_by - created_at)) AS ttl, "
            "min(created_at) AS first FROM orders WHERE sale = ANY($1::text[]) AND created_at IS NOT NULL "
            "AND created_at >= to_timestamp($2 / 1000.0)",
            list(engines),
            since,
        )
    if row is None:
        return None, None
    return (float(row["ttl"]) if row["ttl"] is not None else None), row["first"]
