"""Running the service: N processes sharing one port (SO_REUSEPORT), so every core takes
connections; the parent supervises them (restarts one that dies, stops all on SIGTERM or
Ctrl-C). uvloop is installed here, in the entry point (chosen by ``flashsale.console``), never on
import.

Before the first process starts, :func:`check_stores` asks Redis and PostgreSQL once. A
store that refuses this service for good (wrong password, no such database, not a
PostgreSQL server; a node of a Redis Cluster given as one server, FLASHSALE_REDIS_CLUSTER
forgotten, whose MOVED replies would fail most orders) stops the start with one line and
exit status 64 (a setting to fix): restarting would only repeat it. A store
that does not answer yet is said in the log and the service starts anyway — a database
that comes up later must not need a restart. Meanwhile ``/readyz`` answers 503 for Redis
(nothing can be sold without it) and reports PostgreSQL (orders never wait on it).

Each process serves the app through :class:`flashsale.service.transport.ServiceRunner`
(JSON answers even to requests aiohttp's parser refuses).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from aiohttp import web

from flashsale import exit_codes
from flashsale.console import install_uvloop, redact
from flashsale.logs import configure
from flashsale.redis_client import cluster_node_as_one_server, connect, refuses_client
from flashsale.service.probes import CLUSTER_NODE, server_role
from flashsale.service.transport import ServiceRunner
from flashsale.settings import Settings, SettingsError

__all__ = ["GC_YOUNG_THRESHOLD", "check_stores", "run_one_process", "serve", "settings_env", "settle_heap"]

log = logging.getLogger("flashsale.serve")

#: A service process writes this file once it listens; one that exits before did not start.
READY_FILE_ENV = "FLASHSALE_PROCESS_READY_FILE"
#: How long the start-up check waits for each store before saying it does not answer.
STORE_CHECK_TIMEOUT_S = 3.0


def check_stores(settings: Settings, *, timeout_s: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Ask Redis and PostgreSQL once (see the module docstring): SettingsError when one
    refuses this service for good; a logged error, and nothing else, when one does not
    answer."""
    asyncio.run(_ask_redis(settings, timeout_s))
    if settings.database_url:
        asyncio.run(_ask_postgres(settings.database_url, timeout_s))


async def _ask_redis(settings: Settings, timeout_s: float) -> None:
    from redis.exceptions import RedisClusterException, RedisError, ResponseError

    url = redact(settings.redis_url)
    redis = connect(settings.redis_url, cluster=settings.redis_cluster, timeout_s=timeout_s, resends=0)
    try:
        role = await asyncio.wait_for(server_role(redis), timeout_s * 2)
    except ResponseError as exc:  # it answered, and said no: a password, a database number
        raise SettingsError(f"Redis at {url} refused this service: {exc}") from None
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        if refuses_client(exc):  # (redis-py makes a wrong password a ConnectionError)
            raise SettingsError(f"Redis at {url} refused this service: {exc}") from None
        _not_answering("Redis", url, exc)
        return
    finally:
        await redis.aclose()
    if role == CLUSTER_NODE:  # (a replica may be promoted: /readyz says 503 until then)
        raise SettingsError(cluster_node_as_one_server(url))


async def _ask_postgres(database_url: str, timeout_s: float) -> None:
    import asyncpg

    from flashsale.pgpool import is_transient

    url = redact(database_url)
    try:
        conn = await asyncpg.connect(database_url, timeout=timeout_s)
    except Exception as exc:
        if not is_transient(exc):
            raise SettingsError(
                f"PostgreSQL at {url} refused this service: {type(exc).__name__}: {exc}"
            ) from None
        _not_answering("PostgreSQL", url, exc)
        return
    await conn.close(timeout=timeout_s)


def _not_answering(store: str, url: str, exc: BaseException) -> None:
    meanwhile = "/readyz answers 503" if store == "Redis" else "orders go on, /readyz reports it"
    log.error(
        f"{store} at {url} does not answer at start: serving anyway; {meanwhile} until it does",
        extra={"store": store.lower(), "error": f"{type(exc).__name__}: {exc}"},
    )


#: Net allocations between two collections of the collector's youngest generation
#: (Python's default: 700, a collection every few orders at the peak).
GC_YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Called once the process is ready to serve. What start-up built (modules, the app,
    clients) lives as long as the process: it is frozen out of the cyclic collector's sight,
    and the youngest generation is collected every :data:`GC_YOUNG_THRESHOLD` allocations.
    Under ``wrk`` the collector took ~13% of a service process's CPU (26 µs an order): each
    young collection re-examined every order in progress, each full one ~100,000 start-up
    objects. Memory is still reclaimed by reference counting as before; only reference
    cycles wait a little longer for their collection."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_one_process(settings: Settings, *, reuse_port: bool) -> None:
    """Serve in this process until SIGTERM/SIGINT."""
    from flashsale.service.app import create_app

    configure(settings.log_level, access_log=settings.access_log)
    fast_loop = install_uvloop()
    log.info("service process starting", extra={"port": settings.port, "uvloop": fast_loop})
    asyncio.run(_serve_until_stopped(create_app(settings), settings, reuse_port=reuse_port))


async def _serve_until_stopped(app: web.Application, settings: Settings, *, reuse_port: bool) -> None:
    runner = ServiceRunner(
        app,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=4096)
        await site.start()
        settle_heap()
        ready = os.environ.get(READY_FILE_ENV)
        if ready:  # it listens: the supervisor's sign that this process started
            _touch(ready)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: Settings, *, ready_file: str | None = None) -> int:
    """Run ``settings.workers`` service processes; return when told to stop: the exit status
    (0, or 64 when a process exited before it listened)."""
    settings.require_secrets()
    configure(settings.log_level)
    check_stores(settings)
    if settings.workers <= 1:
        if ready_file:
            _touch(ready_file)
        run_one_process(settings, reuse_port=False)
        return 0
    metrics_dir = tempfile.mkdtemp(prefix="flashsale-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    env.update(settings_env(settings))
    command = [sys.executable, "-m", "flashsale.service.serve"]
    children: dict[int, subprocess.Popen[bytes]] = {}
    ready_files: dict[int, str] = {}
    stopping = False
    failed = False

    def start(slot: int) -> None:
        ready_files[slot] = os.path.join(
            metrics_dir, f"ready-{slot}-{len(ready_files) + time.monotonic_ns()}"
        )
        children[slot] = subprocess.Popen(command, env={**env, READY_FILE_ENV: ready_files[slot]})

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(settings.workers):
        start(slot)
    log.info(
        "service started",
        extra={
            "workers": settings.workers,
            "port": settings.port,
            "pids": [c.pid for c in children.values()],
        },
    )
    if ready_file:
        _touch(ready_file)
    try:
        while not stopping:
            time.sleep(0.2)
            for slot, child in list(children.items()):
                code = child.poll()
                if code is None or stopping:
                    continue
                if not os.path.exists(ready_files[slot]):
                    # It never got to listen (port taken, bad setting): restarting it would
                    # only repeat the same error five times a second, forever. (Its own sign,
                    # not a clock: on a busy machine a start can take any time.)
                    log.error(
                        "a service process exited while starting; stopping all. Its error is "
                        "above: is the port taken, or a setting wrong?",
                        extra={"pid": child.pid, "exit": code, "port": settings.port},
                    )
                    failed = stopping = True
                    break
                log.warning("service process died; restarting it", extra={"pid": child.pid, "exit": code})
                start(slot)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("service stopped")
    # A process that could not start is a setting to fix (the port, a flag), as for the
    # checks before the start: never 1, which the exit-status table keeps for "SLO missed".
    return exit_codes.USAGE if failed else exit_codes.OK


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``FLASHSALE_*`` variables another process reads them from."""
    from flashsale.settings import ENV_DOC

    env = {}
    for var, name, _ in ENV_DOC:
        value = getattr(settings, name)
        if value is None:
            continue
        env[var] = str(int(value)) if isinstance(value, bool) else str(value)
    return env


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))


if __name__ == "__main__":  # one child of a multi-process `flashsale serve`
    run_one_process(replace(Settings.from_env(), workers=1), reuse_port=True)
