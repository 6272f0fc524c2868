"""The fence and ``flashsale recover`` on a Redis Cluster: they are built for one Redis server
(one run id, one lineage marker, one server's keys), so on a cluster they refuse — exit 64
with a line that says why and what to do instead — rather than checking or rebuilding the
part of the data one node happens to hold. Before this, ``recover --check`` on a cluster
node said "Redis agrees with PostgreSQL" (the node's MOVED replies read as empty keys) and
``recover`` died in a MovedError traceback (exit 1, which reads as "SLO missed").

Runs on the session's embedded three-master cluster, whatever FLASHSALE_TEST_REDIS says.
"""

from __future__ import annotations

from typing import Any

import pytest
from cli_support import flashsale
from cluster_support import (
    SALES,
    cluster_sales,  # noqa: F401  (fixture)
)
from redis.asyncio.cluster import RedisCluster
from service_support import (
    ServiceFactory,
    expect_json,
    start_service,  # noqa: F401  (fixture)
)

from flashsale import exit_codes
from flashsale.runtime.cluster import RedisClusterServer


async def _untouched(rc: RedisCluster, pool: Any) -> None:
    """Neither store was changed: no sale fenced, nothing logged by the fence, none retired."""
    for sale in SALES:
        assert not await rc.hget(f"fs:sale:{sale}", "fenced"), sale
        assert await rc.hget(f"{{fs:{sale}}}:stock", f"phone-{sale}:available") == "10"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM fence_log") == 0
        assert await conn.fetchval("SELECT count(*) FROM fence_lineage") == 0
        assert await conn.fetchval("SELECT count(*) FROM fence_sales WHERE forgotten_at IS NOT NULL") == 0


def _refused(result: Any, *also: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == exit_codes.USAGE, out
    assert "Traceback" not in out, out
    for words in ("Redis Cluster", "one Redis server", "nothing was changed", "flashsale audit", *also):
        assert words in result.stderr, (words, result.stderr)


@pytest.mark.parametrize(
    ("flag", "mode", "said"),
    [
        ("1", ["--check"], "FLASHSALE_REDIS_CLUSTER"),
        ("1", [], "FLASHSALE_REDIS_CLUSTER"),
        ("1", ["--force"], "FLASHSALE_REDIS_CLUSTER"),
        ("1", ["--forget", "d11"], "FLASHSALE_REDIS_CLUSTER"),
        # FLASHSALE_REDIS_CLUSTER forgotten: the node says it is one of a cluster, and
        # recovery believes it rather than the settings.
        ("", ["--check"], "cluster_enabled"),
        ("", [], "cluster_enabled"),
        # --forget writes PostgreSQL only, but a cluster is refused in every mode, however named.
        ("", ["--forget", "d11"], "cluster_enabled"),
    ],
    ids=repr,
)
async def test_recover_refuses_a_redis_cluster(
    flag: str,
    mode: list[str],
    said: str,
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
    cluster_sales: RedisCluster,
) -> None:
    env = {
        "FLASHSALE_REDIS_URL": redis_cluster_server.url,
        "FLASHSALE_REDIS_CLUSTER": flag,
        "FLASHSALE_DATABASE_URL": pipeline_db_url,
    }
    _refused(flashsale("recover", *mode, env=env), said)
    await _untouched(cluster_sales, pipeline_pool)


async def test_a_service_on_a_cluster_says_its_fence_is_off_and_why(
    start_service: ServiceFactory,
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
) -> None:
    """The service sells on a cluster without the fence; /readyz says so, with the reason,
    rather than a bare "off" an SRE cannot tell from a fence nobody installed."""
    service = await start_service(
        redis_url=redis_cluster_server.url, redis_cluster=True, database_url=pipeline_db_url
    )
    body = await expect_json(await service.client.get("/readyz"), 200)
    fence = body["reported"]["fence"]
    assert fence.startswith("off: ") and "Redis Cluster" in fence, fence


async def test_a_service_given_a_cluster_node_as_one_server_says_its_fence_is_off(
    start_service: ServiceFactory,
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
) -> None:
    """FLASHSALE_REDIS_CLUSTER forgotten: the node's MOVED replies would read as keys that
    are gone (a loss, or a clean verdict, by chance). The guard asks the node first, stands
    down, and /readyz says why — not "unverified: PostgreSQL does not answer". (The process
    is not ready either: ``flashsale serve`` refuses such a start, tests/test_service_probes.py.)"""
    service = await start_service(
        redis_url=redis_cluster_server.url, redis_cluster=False, database_url=pipeline_db_url
    )
    body = await expect_json(await service.client.get("/readyz"), 503)
    assert "FLASHSALE_REDIS_CLUSTER=1" in body["checks"]["redis"], body
    fence = body["reported"]["fence"]
    assert fence.startswith("off: ") and "cluster_enabled:1" in fence, fence
