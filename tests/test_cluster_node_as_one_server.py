"""A node of a Redis Cluster given as one server (``FLASHSALE_REDIS_CLUSTER`` forgotten):
every command that talks to Redis as one server stops before it changes anything, with the
one line ``flashsale serve`` says (tests/test_service_serve_checks.py) and exit 64 — a
setting to fix. The node answers PING and ROLE like any primary, but ``MOVED`` for most keys:
a worker would read a third of the streams and fail on the rest, an audit would judge a
third of the sales (and find the others "lost"), and ``recover --forget`` would retire a
sale on a store the fence never watched. The rule has one owner,
:func:`flashsale.redis_client.reaches_cluster_node`.

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
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from flashsale import exit_codes
from flashsale.redis_client import connect, reaches_cluster_node
from flashsale.runtime.cluster import RedisClusterServer
from flashsale.runtime.embedded import RedisServer
from inventory import Inventory, Line, SaleKeys


@pytest.fixture
async def cluster_orders(cluster_sales: RedisCluster) -> RedisCluster:
    """One order in each sale's stream besides its stock, none written anywhere yet."""
    for sale in SALES:
        await Inventory(cluster_sales, sale).reserve("u1", [Line(f"phone-{sale}", 1)], request_id=f"r-{sale}")
    return cluster_sales


def _node_env(redis_cluster_server: RedisClusterServer, database_url: str) -> dict[str, str]:
    """A node of the cluster as FLASHSALE_REDIS_URL, FLASHSALE_REDIS_CLUSTER forgotten."""
    return {
        "FLASHSALE_REDIS_URL": redis_cluster_server.url,
        "FLASHSALE_REDIS_CLUSTER": "",
        "FLASHSALE_DATABASE_URL": database_url,
    }


def _stopped_saying_what_to_set(done: Any) -> None:
    """Exit 64 and one line, the one ``flashsale serve`` says: what it is and what to set."""
    out = done.stdout + done.stderr
    assert done.returncode == exit_codes.USAGE, out
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert "Redis Cluster node addressed as one server" in lines[0], lines[0]
    assert lines[0].endswith("set FLASHSALE_REDIS_CLUSTER=1"), lines[0]


async def _untouched(rc: RedisCluster, pool: Any) -> None:
    """No stream got a consumer group or lost an entry; PostgreSQL has no order."""
    for sale in SALES:
        events = SaleKeys("fs", sale).events
        assert await rc.xlen(events) >= 1, sale
        assert await rc.xinfo_groups(events) == [], sale
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0


async def test_the_worker_refuses_a_cluster_node_given_as_one_server(
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
    cluster_orders: RedisCluster,
) -> None:
    """Without the check the worker started its writer and sweeper on the node (groups made
    on the streams the node holds) and died in a MovedError traceback, exit 1."""
    env = _node_env(redis_cluster_server, pipeline_db_url)
    _stopped_saying_what_to_set(flashsale("worker", "--consumer", "w1", env=env, timeout=60))
    await _untouched(cluster_orders, pipeline_pool)


async def test_the_audit_refuses_a_cluster_node_given_as_one_server(
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
    cluster_orders: RedisCluster,
) -> None:
    """Without the check: exit 4 "cannot read Redis … MOVED", which says to try again later."""
    env = _node_env(redis_cluster_server, pipeline_db_url)
    done = flashsale("audit", "--wait", "0", env=env, timeout=60)
    _stopped_saying_what_to_set(done)
    assert done.stdout == "", done.stdout  # no report: nothing was judged
    await _untouched(cluster_orders, pipeline_pool)


async def test_the_rule_answers_for_a_node_a_server_a_cluster_client_and_a_refusal(
    redis_cluster_server: RedisClusterServer,
) -> None:
    """A node reached as one server is one; a plain server, a cluster client (it routes each
    key itself) and a server that refuses INFO (some proxies, an ACL) are not."""
    node = connect(redis_cluster_server.url)
    whole = connect(redis_cluster_server.url, cluster=True)
    try:
        assert await reaches_cluster_node(node) is True
        assert await reaches_cluster_node(whole) is False
    finally:
        await node.aclose()
        await whole.aclose()
    with RedisServer() as server:
        plain = connect(server.url)
        try:
            assert await reaches_cluster_node(plain) is False
            admin = Redis.from_url(server.url)
            try:
                await admin.execute_command("ACL", "SETUSER", "default", "-info")
            finally:
                await admin.aclose()
            assert await reaches_cluster_node(plain) is False
        finally:
            await plain.aclose()


@pytest.mark.parametrize(
    "command",
    [
        ["rehearse", "--peak-rps", "20", "--duration", "5"],
        ["capacity", "--peak-rps", "20", "--steps", "1", "--step-s", "3"],
        ["drill", "--fault", "worker-kill"],
    ],
    ids=lambda c: c[0],
)
async def test_the_drills_refuse_a_cluster_node_given_as_one_server_before_starting_anything(
    command: list[str],
    redis_cluster_server: RedisClusterServer,
    pipeline_db_url: str,
    pipeline_pool: Any,
    cluster_orders: RedisCluster,
    tmp_path: Any,
) -> None:
    """Without the check a rehearsal started the service and the worker on the node, waited
    for the service to become ready, and said only "the service exited with 64: see
    service.log"; the drill ran its surge against it. Now they stop with the one line
    before any process, folder or key is made."""
    env = _node_env(redis_cluster_server, pipeline_db_url)
    folder = tmp_path / "out"
    where = ["--workdir", str(folder)] if command[0] == "drill" else ["--report-dir", str(folder)]
    done = flashsale(*command, *where, env=env, timeout=120)
    _stopped_saying_what_to_set(done)
    assert done.stdout == "", done.stdout
    assert not folder.exists(), "a folder was made before the stores were checked"
    await _untouched(cluster_orders, pipeline_pool)
