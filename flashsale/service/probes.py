"""Probes and machine-readable descriptions: /healthz, /readyz, /metrics, /openapi.json.

Ready means *this process can decide sales*: its Redis answers as a primary and has the
inventory scripts. A node of a Redis Cluster addressed as one server (FLASHSALE_REDIS_CLUSTER
unset) answers PING and ROLE as a primary but MOVED for most keys: not ready either. The
rule is :func:`flashsale.redis_client.says_cluster_node` (every command that talks to one
server asks it); :func:`server_role` asks it in the same round trip as ROLE: ``flashsale
serve`` once before it starts, refusing such a node, and ``/readyz`` for a process that got
there anyway (its Redis did not answer at start, or another server took its address since).

Orders never wait on PostgreSQL (the order writer catches up), so its
state — and the fence's, which needs PostgreSQL to verify Redis — is *reported* in the body
and in ``flashsale_postgres_up``, never a reason to answer 503: an outage of PostgreSQL
must not take every pod out of the load balancer at once. PostgreSQL is asked through the
service's pool, or on a connection of the probe's own while every pooled one is busy: a
full pool is load, not an outage, and must not read as one. Every check has a deadline
(:data:`READY_TIMEOUT_S`), so a Redis that hangs gives a 503, not a probe that times out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from flashsale.redis_client import CLUSTER_NODE_AS_ONE_SERVER, as_text, says_cluster_node
from flashsale.service import fence_guard
from flashsale.service.metrics import postgres_up, read_deployment
from flashsale.service.openapi import document
from flashsale.service.state import STATE, ServiceState

__all__ = ["CLUSTER_NODE", "READY_TIMEOUT_S", "routes", "server_role"]

#: How long the readiness checks may take, together: Redis (ROLE, then the scripts) within
#: it, PostgreSQL's report alongside. The kubelet's probe timeout is above it
#: (deploy/k8s/base/service.yaml; tests/test_deploy.py checks).
READY_TIMEOUT_S = 1.0

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


#: :func:`server_role` of a node of a Redis Cluster reached by a client of one server.
CLUSTER_NODE = "cluster node"


async def server_role(redis: Any) -> str | None:
    """The role of the server ``redis`` reaches, in one round trip: its ROLE ("master",
    "slave"), or :data:`CLUSTER_NODE` for a node of a Redis Cluster reached by a client of
    one server, whatever its ROLE says. None where it cannot be told but the server answers:
    a cluster client (it sends every key to its slot's primary itself), or a managed Redis
    or proxy that renames or refuses ROLE (a refusal is an answer: rather than no pod ever
    being ready). A refused ``INFO cluster`` (some proxies) is no cluster node."""
    if isinstance(redis, RedisCluster):
        await redis.ping()
        return None
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("ROLE")
        pipe.info("cluster")
        role, info = await pipe.execute(raise_on_error=False)
    if says_cluster_node(info):
        return CLUSTER_NODE
    if isinstance(role, ResponseError):
        return None
    if isinstance(role, Exception):
        raise role
    return as_text(role[0])


async def _redis_checks(state: ServiceState) -> dict[str, str]:
    """``redis``: reachable, a primary (a replica refuses every write) and, unless the client
    is a cluster client, no node of a Redis Cluster; ``scripts``:
    cached, loaded again if a restart or a failover emptied the cache."""
    checks = {"redis": "unknown", "scripts": "unknown"}
    step, failed = "redis", "unreachable"
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            role = await server_role(state.redis)
            if role == CLUSTER_NODE:
                checks["redis"] = CLUSTER_NODE_AS_ONE_SERVER
                return checks
            if role not in ("master", None):
                checks["redis"] = f"not a primary: its role is {role}"
                return checks
            checks["redis"] = "ok"
            step, failed = "scripts", "not loaded"
            await state.probe_inventory().load_scripts()
            checks["scripts"] = "ok"
    except TimeoutError:
        checks[step] = f"{failed}: no answer within {READY_TIMEOUT_S:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", said in the body
        checks[step] = f"{failed}: {type(exc).__name__}"
    return checks


def _pool_full(pool: Any) -> bool:
    """Every connection of the pool is checked out (and it may open no more): a check
    through it would wait behind the requests holding them, not on PostgreSQL."""
    return bool(pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size())


async def _select_one_alone(database_url: str) -> None:
    """``SELECT 1`` on a connection of the probe's own, closed after (named
    ``flashsale-probe`` in ``pg_stat_activity``); the caller's deadline bounds it all."""
    import asyncpg

    conn = await asyncpg.connect(database_url, server_settings={"application_name": "flashsale-probe"})
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()  # (asyncpg aborts the connection if this fails or is cancelled)


async def postgres_state(state: ServiceState) -> str | None:
    """PostgreSQL's state: "ok", or why it does not answer; None without a database.

    Asked through the service's pool, unless every connection of it is busy (a surge of
    order look-ups): then on a connection of its own, so a full pool — the service's load,
    not PostgreSQL's health — never reads as PostgreSQL down. A PostgreSQL that takes new
    connections but cannot answer within the deadline still does."""
    if state.pg is None:
        return None
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            if _pool_full(state.pg) and state.settings.database_url:
                await _select_one_alone(state.settings.database_url)
            else:
                await state.pg.fetchval("SELECT 1")
        return "ok"
    except TimeoutError:
        return f"unreachable: no answer within {READY_TIMEOUT_S:g} s"
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        return f"unreachable: {type(exc).__name__}"


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks, postgres = await asyncio.gather(_redis_checks(state), postgres_state(state))
    reported = {"fence": fence_guard.status(request.app)}
    if postgres is not None:
        reported["postgres"] = postgres
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"ready": ready, "checks": checks, "reported": reported}, status=200 if ready else 503
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    families, postgres = await asyncio.gather(read_deployment(state), postgres_state(state))
    if postgres is not None:
        families.append(postgres_up(postgres == "ok"))
    return web.Response(
        body=state.metrics.exposition(families),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Scraped-At": str(time.time())},
    )


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
