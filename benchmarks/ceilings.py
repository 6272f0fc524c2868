"""The Redis ceiling: how many raw ``EVALSHA`` calls per second the same Redis answers,
and the engine's reservations/s as a share of it.

The script is the trivial decrement-if-positive one (``strategies.DECR_IF_POSITIVE``) on a
key that never runs out. Two shapes, as ``redis-benchmark`` measures them: 50 connections
each with one call outstanding, and the same with 16 calls pipelined per connection.

The load comes from ``redis-benchmark`` when it is on PATH (Debian: ``redis-tools``), and
always also from a driver in this module that is as cheap as Python gets: each request
batch is encoded once, sent as raw bytes, and replies are counted by their line ends
(every reply to this script is one integer line) in an ``asyncio.Protocol``, with no
client library in between. Both report their CPU share, and the table says which
generator each figure came from.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import time
from dataclasses import replace
from typing import cast
from urllib.parse import urlsplit

from .harness import RedisCpu, process_cpu_seconds, run_queue_seconds
from .report import Figure
from .servers import Servers
from .settings import BenchSettings
from .strategies import DECR_IF_POSITIVE

__all__ = ["PIPELINES", "evalsha_ceiling", "measure_ceilings", "redis_benchmark", "with_engine_share"]

SECTION = "ceilings"
PIPELINES = (1, 16)
_BOTTOMLESS = 10**15


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _EvalshaConnection(asyncio.Protocol):
    """Keeps ``depth`` calls outstanding on one connection until told to stop."""

    def __init__(self, batch: bytes, depth: int, stopping: asyncio.Event) -> None:
        self._batch = batch
        self._depth = depth
        self._stopping = stopping
        self._lines = 0
        self._last = b"\n"
        self.calls = 0
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._batch)

    def data_received(self, data: bytes) -> None:
        # An error reply starts a line with '-' (integer replies start with ':').
        if (self._last == b"\n" and data[:1] == b"-") or b"\n-" in data:
            self.error = data.decode("utf-8", "replace").split("\r\n")[0][:200]
            self._finish()
            return
        self._last = data[-1:]
        self._lines += data.count(b"\n")
        while self._lines >= self._depth:
            self._lines -= self._depth
            self.calls += self._depth
            if self._stopping.is_set():
                self._finish()
                return
            self._transport.write(self._batch)

    def _finish(self) -> None:
        self._transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None and self.error is None:
                self.error = str(exc)
            self.done.set_result(None)


async def _prepare(servers: Servers) -> tuple[str, str]:
    redis = servers.redis()
    try:
        key = servers.name("ceiling")
        await redis.set(key, _BOTTOMLESS)
        sha = str(await redis.script_load(DECR_IF_POSITIVE))
    finally:
        await redis.aclose()
    return key, sha


async def evalsha_ceiling(
    servers: Servers, *, connections: int, depth: int, seconds: float, key: str, sha: str
) -> Figure:
    """Raw EVALSHA calls/s from this process, ``depth`` calls outstanding per connection."""
    address = urlsplit(servers.redis_url)
    batch = _command(b"EVALSHA", sha.encode(), b"1", key.encode()) * depth
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    meter_client = servers.redis()
    try:
        meter = RedisCpu(meter_client)
        server_before = await meter.seconds()
        cpu_before = process_cpu_seconds()
        wait_before = run_queue_seconds()
        started = time.perf_counter()
        protocols: list[_EvalshaConnection] = []
        for _ in range(connections):
            _, protocol = await loop.create_connection(
                lambda: _EvalshaConnection(batch, depth, stopping),
                address.hostname or "127.0.0.1",
                address.port or 6379,
            )
            protocols.append(protocol)
        timer = loop.call_later(seconds, stopping.set)
        try:
            # A connection that never finishes would hang the run: bound it.
            await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), seconds + 30)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        cpu = process_cpu_seconds() - cpu_before
        wait_after = run_queue_seconds()
        server_after = await meter.seconds()
    finally:
        await meter_client.aclose()
    errors = [p.error for p in protocols if p.error]
    calls = sum(p.calls for p in protocols)
    notes = ["Python raw-protocol driver"]
    if errors:
        notes.append(f"first error: {errors[0]}")
    return Figure(
        section=SECTION,
        name=f"raw EVALSHA, pipeline {depth}",
        rate=calls / wall,
        unit="calls/s",
        clients=connections,
        generator_cpu=cpu / wall,
        generator_wait=None
        if wait_before is None or wait_after is None
        else (wait_after - wait_before) / wall,
        server_cpu=None
        if server_before is None or server_after is None
        else (server_after - server_before) / wall,
        errors=len(errors),
        wall_s=wall,
        notes=tuple(notes),
    )


async def redis_benchmark(
    servers: Servers, *, connections: int, depth: int, requests: int, key: str, sha: str
) -> Figure | None:
    """The same figure from ``redis-benchmark``, when it is on PATH (else None)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    address = urlsplit(servers.redis_url)
    args = [
        "-h",
        address.hostname or "127.0.0.1",
        "-p",
        str(address.port or 6379),
        "-c",
        str(connections),
        "-n",
        str(requests),
        "-P",
        str(depth),
        "--csv",
        "EVALSHA",
        sha,
        "1",
        key,
    ]
    if address.password:
        args += ["-a", address.password]
    meter_client = servers.redis()
    try:
        meter = RedisCpu(meter_client)
        server_before = await meter.seconds()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        wall = time.perf_counter() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after = await meter.seconds()
    finally:
        await meter_client.aclose()
    rate = _csv_rate(out.decode("utf-8", "replace"))
    if proc.returncode != 0 or rate is None:
        raise RuntimeError(
            f"redis-benchmark failed (exit {proc.returncode}): {err.decode('utf-8', 'replace').strip()[:300]}"
        )
    cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    return Figure(
        section=SECTION,
        name=f"raw EVALSHA, pipeline {depth}",
        rate=rate,
        unit="calls/s",
        clients=connections,
        generator_cpu=cpu / wall,
        server_cpu=None
        if server_before is None or server_after is None
        else (server_after - server_before) / wall,
        wall_s=wall,
        notes=("redis-benchmark",),
    )


def _csv_rate(text: str) -> float | None:
    """requests/s from ``redis-benchmark --csv`` (6.x: 2 columns; 7.x: 8, same first two)."""
    for line in text.splitlines():
        cells = [c.strip().strip('"') for c in line.split('","')]
        if len(cells) >= 2:
            try:
                return float(cells[1])
            except ValueError:
                continue  # the header line
    return None


async def measure_ceilings(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """Both pipeline depths, from every generator available; the key is removed after."""
    key, sha = await _prepare(servers)
    figures: list[Figure] = []
    try:
        for depth in PIPELINES:
            python_figure = await evalsha_ceiling(
                servers,
                connections=settings.ceiling_connections,
                depth=depth,
                seconds=settings.seconds,
                key=key,
                sha=sha,
            )
            figures.append(python_figure)
            requests = max(10_000, round(python_figure.rate * settings.seconds))
            benchmark_figure = await redis_benchmark(
                servers,
                connections=settings.ceiling_connections,
                depth=depth,
                requests=requests,
                key=key,
                sha=sha,
            )
            if benchmark_figure is not None:
                figures.append(benchmark_figure)
    finally:
        redis = servers.redis()
        try:
            await redis.delete(key)
        finally:
            await redis.aclose()
    if not any(f.notes[0].startswith("redis-benchmark") for f in figures):
        figures = [replace(f, notes=(*f.notes, "redis-benchmark not on PATH")) for f in figures]
    return figures


def with_engine_share(figures: list[Figure], engine: Figure | None) -> list[Figure]:
    """The engine's reservations/s as a ratio of each ceiling."""
    if engine is None:
        return figures
    return [
        replace(f, ratio=engine.rate / f.rate, ratio_to="(engine / this)") if f.rate > 0 else f
        for f in figures
    ]
