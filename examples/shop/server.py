"""A small shop backend, written for the surge kit's example: not flashsale, its own API.

    python examples/shop/server.py --variant correct --port 8090 --db shop.db --stock mug=3,tee=50

    GET  /items                 {"items": [{"item": "mug", "left": 3}, …]}
    GET  /items/{item}          {"item": "mug", "left": 3}
    POST /checkout              {"item": "mug", "quantity": 1, "idempotency_key": "k1"}
                                → 201 {"order": "ord_…", "item": "mug", "quantity": 1}
                                → 200 the same order again, "replayed": true (same key)
                                → 409 {"reason": "out_of_stock"}   400 {"reason": "bad_request"}
    GET  /ledger                what the shop recorded: stocked, left, every order (for an oracle)

Stock and orders live in SQLite (the file ``--db``): a real database the rehearsal's oracle
can query after the run, and a single writer, so the one difference between the variants
is the one that matters. Every checkout awaits a payment authorisation (``--pay-delay``, as
a real shop awaits its payment provider):

- ``correct``: after the payment call, the hold is one conditional UPDATE (``left >= qty``)
  and the order INSERT in one transaction, with no await inside: stock cannot go below 0;
- ``naive``: checks ``left`` first, awaits the payment call, then decrements and inserts —
  check-then-act across an await, the classic oversell: every checkout that arrives while
  another is awaiting its payment sees the same stock.

aiohttp because the race is then real and repeatable: one event loop, and the await between
the check and the decrement is exactly where other checkouts run.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

from aiohttp import web

DB = web.AppKey("db", sqlite3.Connection)
VARIANT = web.AppKey("variant", str)
PAY_DELAY = web.AppKey("pay_delay", float)

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (item TEXT PRIMARY KEY, stocked INTEGER NOT NULL, left INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    item TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
"""


def open_db(path: Path, stock: dict[str, int]) -> sqlite3.Connection:
    """A fresh sale: the tables, emptied, stocked with ``stock``."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")  # the oracle reads while nothing else writes
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.execute("DELETE FROM orders")
    db.execute("DELETE FROM stock")
    db.executemany(
        "INSERT INTO stock (item, stocked, left) VALUES (?, ?, ?)", [(i, n, n) for i, n in stock.items()]
    )
    db.execute("COMMIT")
    return db


def _reason(status: int, reason: str) -> web.Response:
    return web.json_response({"reason": reason}, status=status)


def _existing(db: sqlite3.Connection, key: str) -> web.Response | None:
    row = db.execute("SELECT id, item, quantity FROM orders WHERE idempotency_key = ?", (key,)).fetchone()
    if row is None:
        return None
    return web.json_response(
        {"order": row[0], "item": row[1], "quantity": row[2], "replayed": True}, status=200
    )


def _place(db: sqlite3.Connection, item: str, qty: int, key: str, *, check_stock: bool) -> web.Response:
    """Decrement and record in one transaction (nothing awaits inside: no other checkout runs)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if (replay := _existing(db, key)) is not None:
            db.execute("ROLLBACK")
            return replay
        if check_stock:
            taken = db.execute(
                "UPDATE stock SET left = left - ? WHERE item = ? AND left >= ?", (qty, item, qty)
            ).rowcount
            if not taken:
                db.execute("ROLLBACK")
                return _reason(409, "out_of_stock")
        else:
            db.execute("UPDATE stock SET left = left - ? WHERE item = ?", (qty, item))
        order = f"ord_{uuid.uuid4().hex[:16]}"
        db.execute(
            "INSERT INTO orders (id, item, quantity, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?)",
            (order, item, qty, key, time.time()),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return web.json_response({"order": order, "item": item, "quantity": qty}, status=201)


async def checkout(request: web.Request) -> web.Response:
    db, variant, pay_delay = request.app[DB], request.app[VARIANT], request.app[PAY_DELAY]
    try:
        body = await request.json()
        item, qty, key = str(body["item"]), int(body["quantity"]), str(body["idempotency_key"])
    except (ValueError, KeyError, TypeError):
        return _reason(400, "bad_request")
    if qty < 1 or not key:
        return _reason(400, "bad_request")
    row = db.execute("SELECT left FROM stock WHERE item = ?", (item,)).fetchone()
    if row is None:
        return _reason(404, "no_such_item")
    if (replay := _existing(db, key)) is not None:
        return replay
    if variant == "naive":
        if row[0] < qty:  # the check …
            return _reason(409, "out_of_stock")
        await asyncio.sleep(pay_delay)  # … the payment call: every other checkout runs here …
        return _place(db, item, qty, key, check_stock=False)  # … then the decrement
    await asyncio.sleep(pay_delay)
    return _place(db, item, qty, key, check_stock=True)


async def items(request: web.Request) -> web.Response:
    rows = request.app[DB].execute("SELECT item, left FROM stock ORDER BY item").fetchall()
    return web.json_response({"items": [{"item": i, "left": max(left, 0)} for i, left in rows]})


async def one_item(request: web.Request) -> web.Response:
    row = (
        request.app[DB]
        .execute("SELECT item, left FROM stock WHERE item = ?", (request.match_info["item"],))
        .fetchone()
    )
    if row is None:
        return _reason(404, "no_such_item")
    return web.json_response({"item": row[0], "left": max(row[1], 0)})


async def ledger(request: web.Request) -> web.Response:
    db = request.app[DB]
    stock = db.execute("SELECT item, stocked, left FROM stock ORDER BY item").fetchall()
    orders = db.execute(
        "SELECT id, item, quantity, idempotency_key FROM orders ORDER BY created_at"
    ).fetchall()
    return web.json_response(
        {
            "stocked": {i: s for i, s, _ in stock},
            "left": {i: left for i, _, left in stock},
            "orders": [{"order": o, "item": i, "quantity": q, "idempotency_key": k} for o, i, q, k in orders],
        }
    )


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def create_app(db: sqlite3.Connection, variant: str, pay_delay: float) -> web.Application:
    app = web.Application()
    app[DB], app[VARIANT], app[PAY_DELAY] = db, variant, pay_delay
    app.router.add_get("/items", items)
    app.router.add_get("/items/{item}", one_item)
    app.router.add_post("/checkout", checkout)
    app.router.add_get("/ledger", ledger)
    app.router.add_get("/health", health)
    return app


def parse_stock(text: str) -> dict[str, int]:
    stock: dict[str, int] = {}
    for part in text.split(","):
        item, _, count = part.partition("=")
        stock[item.strip()] = int(count)
    return stock


async def serve(app: web.Application, host: str, port: int, banner: str) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]  # --port 0 picks a free one: say which
    print(f"{banner} on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="examples/shop/server.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["correct", "naive"], required=True)
    parser.add_argument("--port", type=int, default=8090, help="0: any free port (printed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--db", type=Path, default=Path("shop.db"), help="SQLite file (emptied and restocked)"
    )
    parser.add_argument("--stock", type=parse_stock, default={"mug": 3, "tee": 50}, help="e.g. mug=3,tee=50")
    parser.add_argument("--pay-delay", type=float, default=0.2, help="seconds the payment call takes")
    args = parser.parse_args(argv)
    db = open_db(args.db, args.stock)
    banner = f"shop ({args.variant}), stock {args.stock}, db {args.db},"
    try:
        asyncio.run(serve(create_app(db, args.variant, args.pay_delay), args.host, args.port, banner))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
