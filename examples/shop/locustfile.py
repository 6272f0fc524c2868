"""Rehearse the example shop (``examples/shop/server.py``) with the surge kit — a locustfile
that uses only ``loadtests``' public API, as one for your own backend would.

    python examples/shop/server.py --variant naive --port 8090 --db shop.db
    locust -f examples/shop/locustfile.py --headless --host http://127.0.0.1:8090 --shop-db shop.db \\
        --peak-rps 40 --time-scale 0.1

Browsers look at items before the opening; at T0 every buyer who waited checks out at once
(the rendezvous), most of them for the item with the least stock. The oracle reads the
shop's own truth — its SQLite file, with a plain SQL query — and the kit judges it against
what the buyers were told: the naive variant oversells (exit 2), the correct one does not.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from contextlib import closing
from typing import Any

from locust import events

from loadtests import (
    OracleContext,
    ProcessContext,
    Recorded,
    Rehearsal,
    RunContext,
    ServiceSample,
    Truth,
    Visit,
)

rehearsal = Rehearsal("example shop", order_operations=("checkout",))


def _options(parser: Any, **_kw: Any) -> None:
    parser.add_argument("--shop-db", default="shop.db", help="the shop's SQLite file, which the oracle reads")


events.init_command_line_parser.add_listener(_options)


def _items(host: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{host}/items", timeout=10) as resp:
        return {i["item"]: i["left"] for i in json.load(resp)["items"]}


@rehearsal.process_setup
def catalogue(ctx: ProcessContext) -> list[str]:
    """The items on sale, scarcest first (everyone wants that one)."""
    stock = _items(ctx.host)
    return sorted(stock, key=lambda item: stock[item])


@rehearsal.persona(weight=2, kinds=("countdown", "open"))
def browser(visit: Visit) -> None:
    item = visit.rng.choice(visit.state)
    visit.get(f"/items/{item}", name="item page")  # not reported: 2xx counts as ok


@rehearsal.persona(weight=3, kinds=("rendezvous", "open"))
def buyer(visit: Visit) -> None:
    items: list[str] = visit.state
    item = items[0] if visit.rng.random() < 0.8 else visit.rng.choice(items)
    for _attempt in range(3):  # a retry reuses the idempotency key: it must not buy twice
        with visit.post(
            "/checkout",
            name="checkout",
            key=visit.id,
            json={"item": item, "quantity": 1, "idempotency_key": visit.id},
        ) as call:
            if call.status in (200, 201):
                call.ok(
                    order=call.body["order"], item=item, units=1, replayed=call.body.get("replayed", False)
                )
                return
            if call.status == 409:
                call.refused(call.body["reason"])  # out of stock: the shop doing its job
                return
            if call.status:
                return  # another answer: reported on exit (4xx refused as an error, 5xx unknown)
        visit.sleep(0.2)  # no answer: the order may exist; retry with the same key


@rehearsal.sampler
def stock(ctx: RunContext) -> ServiceSample:
    return ServiceSample(time.time(), {item: {"available": left} for item, left in _items(ctx.host).items()})


@rehearsal.oracle
def ledger(ctx: OracleContext) -> Truth:
    """The shop's own truth, straight from its database."""
    with closing(sqlite3.connect(f"file:{ctx.options.shop_db}?mode=ro", uri=True)) as db:
        stocked = dict(db.execute("SELECT item, stocked FROM stock"))
        sold = dict(db.execute("SELECT item, SUM(quantity) FROM orders GROUP BY item"))
        recorded = [
            Recorded(order, key) for order, key in db.execute("SELECT id, idempotency_key FROM orders")
        ]
    return Truth(stocked=stocked, sold=sold, recorded=recorded)


ArrivalDriver, ArrivalShape = rehearsal.locust_classes()
