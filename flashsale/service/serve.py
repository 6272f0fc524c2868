"""Running the service: N processes sharing one port (SO_REUSEPORT), so every core takes
connections; the parent supervises them (restarts one that dies, stops all on SIGTERM or
Ctrl-C). uvloop is installed here, in the entry point, and nowhere else.

Each process serves the app through :class:`flashsale.service.transport.ServiceRunner`
(JSON answers even to requests aiohttp's parser refuses).
"""

from __future__ import annotations

import asyncio
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

from flashsale.logs import configure
from flashsale.service.transport import ServiceRunner
from flashsale.settings import Settings

__all__ = ["run_one_process", "serve"]

log = logging.getLogger("flashsale.serve")

#: A worker that exits sooner than this after its start failed to start: stop, do not loop.
STARTUP_GRACE_S = 5.0


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


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
        keepalive_timeout=75.0,  # web.run_app's default (aiohttp's protocol alone keeps an hour)
        shutdown_timeout=5.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=4096)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: Settings, *, ready_file: str | None = None) -> int:
    """Run ``settings.workers`` service processes; return when told to stop."""
    settings.require_secrets()
    configure(settings.log_level)
    if settings.workers <= 1:
        if ready_file:
            _touch(ready_file)
        run_one_process(settings, reuse_port=False)
        return 0
    metrics_dir = tempfile.mkdtemp(prefix="flashsale-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    env.update(_settings_env(settings))
    command = [sys.executable, "-m", "flashsale.service.serve"]
    children: dict[int, subprocess.Popen[bytes]] = {}
    started_at: dict[int, float] = {}
    stopping = False
    failed = False

    def start(slot: int) -> None:
        children[slot] = subprocess.Popen(command, env=env)
        started_at[slot] = time.monotonic()

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
                if time.monotonic() - started_at[slot] < STARTUP_GRACE_S:
                    # It never got going (port taken, bad setting): restarting it would only
                    # repeat the same error five times a second, forever.
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
    return 1 if failed else 0


def _settings_env(settings: Settings) -> dict[str, str]:
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
