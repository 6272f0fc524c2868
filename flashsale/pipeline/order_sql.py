"""How a batch of changes lands in PostgreSQL: folded to one row per order, then written
by one idempotent statement (orders, their lines and the stock events), keyed on the order
id — a replayed entry updates nothing. Status only moves up a rank (held = 0, paid /
cancelled / expired = 1), so a late ``reserved`` entry never takes a paid order back to
held. Two ways to ship the rows: ``unnest`` arrays (one round trip) or ``copy`` into temp
tables. The order writer and fence recovery both write through :func:`write_changes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from flashsale.pipeline.entries import OrderChange, StockChange

__all__ = ["Rows", "write_changes"]

_RANK = {"held": 0, "paid": 1, "cancelled": 1, "expired": 1}

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
