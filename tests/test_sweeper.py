"""The hold-expiry sweeper: unpaid holds past their deadline go back on sale — all of them,
however many are due, in every sale — paid holds are left alone, and the writer marks
the expired orders in PostgreSQL. Also runs on its own (``--sweeper-only``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

from redis.asyncio import Redis
from redis_mode import redis_from_url

from flashsale.pipeline.sweeper import HoldSweeper
from inventory import HoldState, Line


async def test_one_sweep_expires_every_due_hold_in_every_sale(text_redis: Redis, pipeline_sale: Any) -> None:
    a = await pipeline_sale("a", {"phone": 100})
    b = await pipeline_sale("b", {"phone": 100})
    due = [
        await a.reserve(f"u{i}", [Line("phone", 2)], request_id=f"r{i}", hold_ttl=0.001) for i in range(23)
    ]
    due.append(await b.reserve("v", [Line("phone", 1)], request_id="r", hold_ttl=0.001))
    paid = await a.reserve("payer", [Line("phone", 1)], request_id="p", hold_ttl=0.05)
    await a.confirm(paid.hold_id)
    keep = await a.reserve("later", [Line("phone", 1)], request_id="k", hold_ttl=600)
    await asyncio.sleep(0.06)

    sweeper = HoldSweeper(text_redis, limit=5)  # 23 due in sale a: several script calls
    assert await sweeper.sweep() == 24
    for hold in due:
        inv = a if hold.hold_id.startswith("a.") else b
        assert (await inv.hold(hold.hold_id)).state is HoldState.EXPIRED  # type: ignore[union-attr]
    assert (await a.hold(paid.hold_id)).state is HoldState.PAID  # type: ignore[union-attr]
    assert (await a.hold(keep.hold_id)).state is HoldState.HELD  # type: ignore[union-attr]
    snap = await a.snapshot("phone")
    assert snap is not None and (snap.available, snap.held, snap.sold) == (98, 1, 1)
    assert await sweeper.sweep() == 0
    assert sweeper.stats.holds_expired == 24


async def test_running_sweeper_and_writer_mark_orders_expired(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale()
    holds = [await inv.reserve(f"u{i}", "phone", request_id=f"r{i}", hold_ttl=0.2) for i in range(10)]
    await inv.confirm(holds[0].hold_id)
    sweeper = HoldSweeper(text_redis, interval_s=0.02)
    task = asyncio.ensure_future(sweeper.run())
    try:
        async with writer_running():
            deadline = time.monotonic() + 10
            while sweeper.stats.holds_expired < 9:
                assert time.monotonic() < deadline, "the sweeper did not expire the holds"
                await asyncio.sleep(0.02)
            await drained(text_redis, ["d11"])
    finally:
        sweeper.stop()
        await asyncio.wait_for(task, 10)
    rows = dict(await pipeline_pool.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
    assert rows == {"paid": 1, "expired": 9}
    snap = await inv.snapshot("phone")
    assert snap is not None and (snap.available, snap.held, snap.sold) == (99, 0, 1)


def test_sweeper_only_runs_without_postgres_and_stops_on_sigterm(redis_url: str, redis_client: Any) -> None:
    async def stock_and_hold() -> list[str]:
        redis = redis_from_url(redis_url, decode_responses=True)
        try:
            from inventory import Inventory

            inv = Inventory(redis, "solo")
            await inv.stock("phone", 10)
            await redis.sadd("fs:sales", "solo")
            return [
                (await inv.reserve(f"u{i}", "phone", request_id=f"r{i}", hold_ttl=0.3)).hold_id
                for i in range(4)
            ]
        finally:
            await redis.aclose()

    async def states(ids: list[str]) -> set[str]:
        redis = redis_from_url(redis_url, decode_responses=True)
        try:
            from inventory import Inventory

            inv = Inventory(redis, "solo")
            return {(await inv.hold(h)).state.value for h in ids}  # type: ignore[union-attr]
        finally:
            await redis.aclose()

    ids = asyncio.run(stock_and_hold())
    env = {k: v for k, v in os.environ.items() if k != "FLASHSALE_DATABASE_URL"}
    env.update(FLASHSALE_REDIS_URL=redis_url, FLASHSALE_SWEEPER_INTERVAL_MS="50")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "worker", "--sweeper-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while asyncio.run(states(ids)) != {"expired"}:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "holds not expired by the sweeper process"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert '"event": "holds_expired"' in err and '"event": "sweeper_stopped"' in err
