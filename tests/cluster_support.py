"""What the tests of commands given the session's embedded Redis Cluster share: three sales
stocked on it, on more than one shard, each recorded by the fence in PostgreSQL.

Test modules import the fixture they use from here (``from cluster_support import
cluster_sales``); pytest finds a fixture wherever the test module's namespace has it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from flashsale.runtime.cluster import RedisClusterServer
from inventory import Inventory

SALES = ("d11", "d12", "d13")  # on more than one shard


@pytest.fixture
async def cluster_sales(
    redis_cluster_server: RedisClusterServer, pipeline_pool: Any
) -> AsyncIterator[RedisCluster]:
    """Three stocked sales on the cluster (``phone-<sale>``, 10 each), each recorded by the
    fence in PostgreSQL; a client of the whole cluster."""
    rc = RedisCluster.from_url(redis_cluster_server.url, decode_responses=True)
    await rc.initialize()
    await rc.flushall()
    for sale in SALES:
        await Inventory(rc, sale).stock(f"phone-{sale}", 10)
        await rc.sadd("fs:sales", sale)
        await rc.hset(f"fs:sale:{sale}", mapping={"opens_at_ms": 0, "state": "open", "generation": 0})
        async with pipeline_pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO fence_sales (prefix, sale, generation, settings, skus) "
                "VALUES ('fs', $1, 0, $2::jsonb, $3)",
                sale,
                json.dumps({"buckets": 1, "state": "open"}),
                [f"phone-{sale}"],
            )
    try:
        yield rc
    finally:
        await rc.aclose()
