"""The concurrency hammer: far more buyers than units, all at once, on one hot SKU —
from many asyncio tasks (coalesced and not), from several OS processes each with its own
client, and with multi-line carts on two SKUs. Exactly the stocked units are held, never
one more; every other buyer is told "sold out"; the stream tells the same story."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from inventory_support import (
    audit_sale,
    connect,
    events,
    hold_records,
    join_start_line,
    new_sale_id,
    open_sale,
    reserve_worker,
)

from inventory import Inventory, Line, SoldOut


@pytest.mark.parametrize("coalesce", [True, False])
async def test_tasks_hammering_one_hot_sku_hold_exactly_the_stock(redis_url: str, coalesce: bool) -> None:
    async with open_sale(redis_url, "hammer", coalesce=coalesce, max_connections=32) as inv:
        await inv.stock("hot", 500)

        async def buy(i: int) -> str | None:
            try:
                return (await inv.reserve(f"u{i}", "hot", request_id=f"r{i}")).hold_id
            except SoldOut:
                return None

        results = await asyncio.gather(*(buy(i) for i in range(2000)))
        holds = [h for h in results if h is not None]
        assert len(holds) == 500 and len(set(holds)) == 500
        assert results.count(None) == 1500
        snap = await inv.snapshot("hot")
        assert snap is not None and (snap.available, snap.held, snap.total) == (0, 500, 500)
        reserved = [e for e in await events(inv.redis, inv.keys) if e["type"] == "reserved"]
        assert sorted(e["order"] for e in reserved) == sorted(holds)
        assert await audit_sale(inv.redis, inv.keys) == []


def test_processes_hammering_one_hot_sku_hold_exactly_the_stock(redis_url: str) -> None:
    """Four spawned processes, each with its own event loop and client (two coalescing,
    two not), 1,000 buyers each, released at one barrier on 3,000 units. The sale must last
    long against the processes' uneven wake-up from the barrier on a busy machine, or the
    first one awake sells most of it alone in a few coalesced batches."""
    total, workers, tasks = 3000, 4, 1000
    sale = new_sale_id("procs")

    async def setup() -> None:
        async with connect(redis_url) as client:
            await Inventory(client, sale).stock("hot", total)

    asyncio.run(setup())
    try:
        spawn = multiprocessing.get_context("spawn")
        start_line = spawn.Barrier(workers + 1)
        with ProcessPoolExecutor(workers, spawn, initializer=join_start_line, initargs=(start_line,)) as pool:
            futures = [pool.submit(reserve_worker, redis_url, sale, "hot", w, tasks) for w in range(workers)]
            start_line.wait(timeout=60)  # ready: every process is up and connected
            start_line.wait(timeout=60)  # go
            results = [f.result(timeout=90) for f in futures]
        holds = [h for r in results for h in r["holds"]]
        assert len(holds) == total and len(set(holds)) == total
        assert sum(r["sold_out"] for r in results) == workers * tasks - total

        async def check() -> None:
            async with connect(redis_url) as client:
                inv = Inventory(client, sale)
                snap = await inv.snapshot("hot")
                assert snap is not None and (snap.available, snap.held, snap.sold) == (0, total, 0)
                assert snap.balanced
                reserved = [e for e in await events(client, inv.keys) if e["type"] == "reserved"]
                # Buyers are "w<worker>u<n>": one process after another would switch
                # workers workers-1 times along the stream; racing ones interleave.
                order = [e["user"].partition("u")[0] for e in reserved]
                switches = sum(a != b for a, b in zip(order, order[1:]))
                assert switches >= workers, (
                    f"the processes took turns ({switches} switches), they did not race"
                )
                assert len(reserved) == total
                assert sorted(e["order"] for e in reserved) == sorted(holds)
                assert await audit_sale(client, inv.keys) == []

        asyncio.run(check())
    finally:

        async def drop() -> None:
            async with connect(redis_url) as client:
                await client.delete(*Inventory(client, sale).keys.all())

        asyncio.run(drop())


CARTS: list[tuple[Line, ...]] = [
    (Line("a", 1), Line("b", 1)),
    (Line("a", 2), Line("b", 1)),
    (Line("a", 1), Line("b", 3)),
    (Line("a", 1),),
    (Line("b", 2),),
]


async def test_multi_line_carts_are_all_or_nothing_under_contention(redis_url: str) -> None:
    """1,200 carts over two SKUs from two engines on two clients (one coalescing, one
    not). Each hold has exactly the lines asked for; each refusal names a SKU that really
    had too few units (stock only goes down here, so it still has too few at the end)."""
    rng = random.Random(7)
    async with open_sale(redis_url, "carts") as first, connect(redis_url, max_connections=24) as other_client:
        second = Inventory(other_client, first.sale, coalesce=False)
        await first.stock("a", 300)
        await first.stock("b", 200)
        asked: dict[str, tuple[Line, ...]] = {}

        async def buy(i: int) -> tuple[str, Any]:
            cart = asked[f"r{i}"] = rng.choice(CARTS)
            engine = first if i % 2 else second
            try:
                return "held", await engine.reserve(f"u{i}", cart, request_id=f"r{i}")
            except SoldOut as refused:
                return "sold_out", refused

        outcomes = await asyncio.gather(*(buy(i) for i in range(1200)))
        await second.aclose()
        records = await hold_records(first.redis, first.keys)
        made = [o for kind, o in outcomes if kind == "held"]
        assert len(records) == len(made)
        for hold in made:
            rec = records[hold.hold_id]
            assert tuple(Line(sku, qty) for sku, qty in rec["l"]) == asked[hold.request_id]
        snaps = await first.snapshots()
        for sku, total in (("a", 300), ("b", 200)):
            units = sum(line.qty for hold in made for line in hold.lines if line.sku == sku)
            assert snaps[sku].held == units and snaps[sku].available == total - units
        for i, (kind, refused) in enumerate(outcomes):
            if kind == "sold_out":
                wanted = {line.sku: line.qty for line in asked[f"r{i}"]}
                assert snaps[refused.sku].available < wanted[refused.sku]
        assert sum(kind == "sold_out" for kind, _ in outcomes) > 0, "demand exceeded supply"
        assert await audit_sale(first.redis, first.keys) == []
