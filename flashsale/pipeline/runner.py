"""The worker process: signals, waiting for Redis and PostgreSQL to come up, the schema
check, then the order writer and the hold sweeper side by side until told to stop. A node of
a Redis Cluster named as one server (FLASHSALE_REDIS_CLUSTER forgotten) stops it with exit
64 once Redis answers, before anything is read or written.

Stopping is bounded: after SIGTERM/SIGINT the writer has ``stop_grace_s`` to finish the
batch in hand, and closing the pool, the Redis client and the tasks :data:`STOP_TEARDOWN_S`
more. A process still running after both logs ``stop_overran`` and kills itself: what it
had not acknowledged stays pending and the next worker writes it, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from flashsale import exit_codes
from flashsale.console import fail

if TYPE_CHECKING:
    from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.redis_client import cluster_node_as_one_server, connect, reaches_cluster_node, refuses_client

__all__ = ["STOP_TEARDOWN_S", "run_worker"]

#: Seconds a stopping worker may take beyond its stop grace (see the module docstring).
STOP_TEARDOWN_S = 5.0


async def run_worker(settings: WorkerSettings, *, writer: bool = True, sweeper: bool = True) -> int:
    """Run the order writer and/or the sweeper until SIGTERM/SIGINT; returns an exit code.
    The main of a worker process (``flashsale worker``): once signalled, the process ends
    within the bound in the module docstring, by itself if need be."""
    from flashsale.pgpool import close_pool, create_pool
    from flashsale.pipeline.sweeper import HoldSweeper
    from flashsale.pipeline.writer import OrderWriter

    log = logging.getLogger("flashsale.worker")
    # Socket timeout well above XREADGROUP's BLOCK, so an idle wait is never taken for an outage.
    redis = connect(
        settings.redis_url, cluster=settings.redis_cluster, decode=True, timeout_s=10, connect_timeout_s=5
    )
    pool = None
    stops: list[Callable[[], None]] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    deadline = _StopDeadline(settings.stop_grace_s + STOP_TEARDOWN_S, log)

    def on_signal() -> None:
        if not stopping.is_set():
            deadline.start()
        stopping.set()
        for stop in stops:
            stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        jobs: list[Awaitable[None]] = []
        usable = await _wait_for_redis(redis, stopping, log)
        if usable is None:
            return 0
        if not usable:  # before the writer makes its groups: nothing changed
            return fail(cluster_node_as_one_server(settings.redis_url))
        if writer:
            pool = await _wait_for_pool(settings, stopping, create_pool, log)
            if pool is None:
                return 0
            problem = await _schema_problem(pool)
            if problem:
                return fail(problem, exit_codes.NOT_READY)
            order_writer = OrderWriter(redis, pool, settings)
            stops.append(order_writer.stop)
            jobs.append(order_writer.run())
        if sweeper:
            hold_sweeper = HoldSweeper(
                redis,
                prefix=settings.prefix,
                interval_s=settings.sweep_interval_ms / 1000,
                limit=settings.sweep_limit,
                sales_refresh_s=settings.sales_refresh_s,
            )
            stops.append(hold_sweeper.stop)
            jobs.append(hold_sweeper.run())
        if stopping.is_set():
            on_signal()
        await asyncio.gather(*jobs)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if pool is not None:
            await close_pool(pool, timeout_s=STOP_TEARDOWN_S / 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(redis.aclose(), STOP_TEARDOWN_S / 2)
        # The deadline stays armed until the process exits: asyncio.run still cancels and
        # awaits what is left, and a task that loses its cancel would hold the exit forever.


class _StopDeadline:
    """Kills this process ``after_s`` seconds after :meth:`start` if it is still running:
    the last bound on a stop, for a task that does not end when asked. A daemon thread, so
    that it fires even if the event loop is stuck, and dies with a process that exited."""

    def __init__(self, after_s: float, log: logging.Logger) -> None:
        self._timer = threading.Timer(after_s, self._overran, args=(after_s, log))
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    @staticmethod
    def _overran(after_s: float, log: logging.Logger) -> None:
        log.error("stop_overran", extra={"after_s": after_s, "hint": "unacknowledged entries stay pending"})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


async def _wait_for_redis(redis: Any, stopping: asyncio.Event, log: Any) -> bool | None:
    """Wait for Redis like for PostgreSQL (through an outage, not a refusal: a wrong password
    is raised), then say whether the writer and the sweeper can use it: False for a node of a Redis Cluster reached by a client of one server
    (FLASHSALE_REDIS_CLUSTER forgotten: most keys would answer MOVED); None if told to stop
    first. A cluster client learns the slot map here, before the writer and the sweeper
    share it: redis-py 8.1 breaks commands that race a cold cluster client's first use
    (AttributeError on a connection it closed meanwhile)."""
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisClusterException, RedisError

    async def ask() -> bool:
        if isinstance(redis, RedisCluster):
            await redis.initialize()
            return True
        return not await reaches_cluster_node(redis)

    def outage(exc: Exception) -> bool:  # a refusal (a password) is raised: a setting to fix
        return isinstance(exc, (RedisError, RedisClusterException, OSError)) and not refuses_client(exc)

    usable: bool | None = await _keep_trying(ask, outage, "redis_unavailable", stopping, log)
    return usable


async def _wait_for_pool(
    settings: WorkerSettings, stopping: asyncio.Event, create_pool: Any, log: Any
) -> Any:
    """Open the pool, waiting (with backoff) for PostgreSQL to come up; None if told to stop."""
    from flashsale.pgpool import is_transient

    def open_pool() -> Awaitable[Any]:
        return create_pool(  # type: ignore[no-any-return]
            settings.database_url,
            max_size=settings.pool_size,
            statement_timeout_ms=settings.statement_timeout_ms,
            application_name=f"flashsale-worker:{settings.consumer}",
        )

    return await _keep_trying(open_pool, is_transient, "postgres_unavailable", stopping, log)


async def _keep_trying(
    attempt: Callable[[], Awaitable[Any]],
    retryable: Callable[[Exception], bool],
    event: str,
    stopping: asyncio.Event,
    log: Any,
) -> Any:
    """``await attempt()`` until it succeeds, through the failures ``retryable`` accepts
    (logged once, as ``event``), waiting 0.2 s doubling up to 5 s; None if told to stop."""
    delay = 0.2
    warned = False
    while not stopping.is_set():
        try:
            return await attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            if not warned:
                log.warning(event, extra={"error": f"{type(exc).__name__}: {exc}"})
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, 5.0)
    return None


async def _schema_problem(pool: Any) -> str | None:
    from flashsale.pipeline.migrate import migration_status

    async with pool.acquire() as conn:
        states = await migration_status(conn)
    behind = [f"{s.version:04d}_{s.name}" for s in states if s.state in ("pending", "changed")]
    if behind:
        return (
            f"the database schema is not up to date ({', '.join(behind)} not applied): "
            "run `flashsale migrate` first"
        )
    return None
