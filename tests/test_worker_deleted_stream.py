"""A sale's stream deleted under the running order writer (an operator removing a sale,
a yearly sale id used again) is gone: the writer forgets it and joins it again as it
joins a new sale, instead of leaving its loop on Redis's answer about the missing key
(``ERR no such key`` from XINFO, ``UNBLOCKED … no longer exists`` to a blocked read)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis_mode import single_server_only

from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.pipeline.writer import OrderWriter
from flashsale.streams import GROUP
from inventory import Inventory

STOCK = {"phone": 1000}


async def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def orders(pool: Any) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM orders"))


async def has_group(redis: Redis, key: str) -> bool:
    if not await redis.exists(key):
        return False
    return any(g["name"] == GROUP for g in await redis.xinfo_groups(key))


async def test_a_stream_deleted_between_reclaim_and_trim_is_joined_again(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, redis_url: str
) -> None:
    """The writer's rounds, driven one by one: the stream goes between reclaim and trim."""
    inv: Inventory = await pipeline_sale("d11", STOCK)
    key = inv.keys.events
    settings = WorkerSettings(redis_url=redis_url, consumer="w1", block_ms=20, linger_ms=0)
    writer = OrderWriter(text_redis, pipeline_pool, settings)
    await writer.refresh_sales()
    await writer.drain_own_pending(key)
    await writer.reclaim()
    await text_redis.delete(key)

    await writer.trim()  # was: redis.exceptions.ResponseError: no such key

    await writer.refresh_sales()  # joined again, as a new sale is
    assert await has_group(text_redis, key) and writer.sales == ["d11"]
    await inv.reserve("u1", "phone", request_id="after")
    await writer.commit(await writer.backlog.read_new())
    assert await orders(pipeline_pool) == 1
    assert int((await text_redis.xpending(key, GROUP))["pending"]) == 0


@single_server_only("CLIENT LIST shows the blocked read on one node only")
async def test_a_stream_deleted_under_a_blocked_read_is_joined_again(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    """The running writer waits in XREADGROUP … BLOCK on the stream when it is deleted."""
    inv: Inventory = await pipeline_sale("d11", STOCK)
    key = inv.keys.events

    async def blocked_in_read() -> bool:
        clients = await text_redis.client_list()
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

    # Trim and reclaim off, and a long BLOCK: the deletion can only meet the blocked read.
    async with writer_running(block_ms=60_000, trim_interval_s=0, claim_interval_s=0) as writer:
        await inv.reserve("u1", "phone", request_id="before")
        await drained(text_redis, ["d11"])
        await wait_for(blocked_in_read, "the writer to wait in XREADGROUP")
        await text_redis.delete(key)
        await wait_for(lambda: has_group(text_redis, key), "the writer to join the stream again")
        await inv.reserve("u2", "phone", request_id="after")
        await drained(text_redis, ["d11"])
        assert writer.sales == ["d11"]
    assert await orders(pipeline_pool) == 2
