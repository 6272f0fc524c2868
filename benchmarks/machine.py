"""What a run was measured on: CPU model and cores, load, the Python stack, and the
servers' versions and durability settings. Written into the JSON beside the figures,
because a figure without its machine cannot be compared with anything."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]

from .servers import Servers

__all__ = ["describe_machine", "engine_label", "load_average"]

_PACKAGES = ("redis", "hiredis", "asyncpg", "aiohttp", "uvloop", "hdrhistogram", "psutil")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _tool(name: str, *args: str) -> str | None:
    path = shutil.which(name)
    if path is None:
        return None
    try:
        done = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return path
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else path


def engine_label(machine: dict[str, Any]) -> str:
    """The Redis-protocol server a run was measured on, e.g. "Valkey 9.1.2" or "Redis 7.0.15"."""
    redis = machine["redis"]
    return f"{str(redis.get('engine') or 'redis').capitalize()} {redis['version']}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def describe_machine(servers: Servers, *, event_loop: str) -> dict[str, Any]:
    redis = servers.redis()
    try:
        info = await redis.info("server")
        persistence = await redis.config_get("appendonly")
        fsync = await redis.config_get("appendfsync")
    finally:
        await redis.aclose()
    pg = await asyncpg.connect(servers.database_url)
    try:
        pg_version = await pg.fetchval("SHOW server_version")
        pg_fsync = await pg.fetchval("SHOW fsync")
        pg_commit = await pg.fetchval("SHOW synchronous_commit")
    finally:
        await pg.close()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "event_loop": event_loop,
        "packages": {name: _version(name) for name in _PACKAGES},
        "redis": {
            # Valkey says so in server_name (Redis 7.0 has no such field) and reports its own
            # version beside a redis_version of 7.2.4, the Redis release it forked from.
            "engine": info.get("server_name", "redis"),
            "version": info.get("valkey_version", info.get("redis_version")),
            "redis_version": info.get("redis_version"),
            "embedded": servers.redis_pid is not None,
            "appendonly": persistence.get("appendonly"),
            "appendfsync": fsync.get("appendfsync"),
        },
        "postgresql": {
            "version": pg_version,
            "embedded": servers.postgres_pid is not None,
            "fsync": pg_fsync,
            "synchronous_commit": pg_commit,
        },
        "tools": {
            "redis-benchmark": _tool("redis-benchmark", "--version"),
            "wrk": _tool("wrk", "--version"),
        },
    }
