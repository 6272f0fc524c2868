"""The closed-loop harness every in-process benchmark drives its load with, and the CPU
meters that say who was busy.

N clients run as tasks on one event loop; each sends one attempt, waits for its answer,
and sends the next (a closed model: at most N attempts outstanding). A run ends when
every client was told "sold out" (``until_sold_out``) or when the time is up. Latency is
taken per attempt with ``perf_counter_ns`` into a plain list during the run and put into
an HdrHistogram afterwards, so recording costs the generator almost nothing while it is
being measured.

The generator's CPU share is this process's CPU time (``getrusage``) over the wall time
of the run. Above ~90 % of one core the process is saturated and the figure is what one
Python process can push, not what the server can take; the table marks such figures.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil  # type: ignore[import-untyped]
from hdrh.histogram import HdrHistogram

from .report import Figure

__all__ = [
    "Attempt",
    "CpuMeter",
    "LoadRun",
    "PidTreeCpu",
    "RedisCpu",
    "closed_loop",
    "process_cpu_seconds",
    "run_queue_seconds",
]

#: One attempt by client ``i``: True when it was granted a unit, False when told "sold out".
Attempt = Callable[[int], Awaitable[bool]]

#: Stop a run after this many failed attempts: an erroring strategy measures nothing.
_MAX_ERRORS = 100


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_queue_seconds(pid: int | None = None) -> float | None:
    """Time this process (or ``pid``) was ready to run but waited for a core (Linux
    schedstat), None elsewhere. On a shared machine this is the share of a run lost to the
    neighbours."""
    try:
        with open(f"/proc/{pid or 'self'}/schedstat", encoding="ascii") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter(Protocol):
    """Reads a server's cumulative CPU seconds (None when it cannot be read)."""

    async def seconds(self) -> float | None: ...


class RedisCpu:
    """Redis's own CPU time, from ``INFO cpu`` (works for an external server too)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def seconds(self) -> float | None:
        info = await self._redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class PidTreeCpu:
    """CPU time of a local process and its children (PostgreSQL's postmaster and backends).
    Backends that exited during the run are not counted, so this reads low, never high."""

    def __init__(self, pid: int | None) -> None:
        self._pid = pid

    async def seconds(self) -> float | None:
        if self._pid is None:
            return None
        try:
            root = psutil.Process(self._pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system
            return total
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


@dataclass(frozen=True)
class LoadRun:
    """What one run of the closed loop did."""

    clients: int
    granted: int
    refused: int
    errors: int
    wall_s: float
    cpu_s: float
    #: Time the generator was runnable but waited for a core (None when unknown).
    wait_s: float | None
    server_cpu_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    first_error: str | None
    timed_out: bool

    @property
    def rate(self) -> float:
        """Granted units per second of wall time."""
        return self.granted / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def generator_cpu(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def generator_wait(self) -> float | None:
        return None if self.wait_s is None or self.wall_s <= 0 else self.wait_s / self.wall_s

    @property
    def server_cpu(self) -> float | None:
        if self.server_cpu_s is None or self.wall_s <= 0:
            return None
        return self.server_cpu_s / self.wall_s

    def figure(self, *, section: str, name: str, notes: Sequence[str] = (), **more: Any) -> Figure:
        """This run as a row of the table (reservations/s); ``more`` sets further fields."""
        extra = [f"first error: {self.first_error}"] if self.first_error else []
        fields: dict[str, Any] = dict(
            section=section,
            name=name,
            rate=self.rate,
            unit="reservations/s",
            clients=self.clients,
            generator_cpu=self.generator_cpu,
            generator_wait=self.generator_wait,
            server_cpu=self.server_cpu,
            p50_ms=self.p50_ms,
            p99_ms=self.p99_ms,
            granted=self.granted,
            errors=self.errors,
            wall_s=self.wall_s,
            notes=(*notes, *extra),
        )
        fields.update(more)
        return Figure(**fields)


def _percentiles(samples_ns: list[list[int]]) -> tuple[float | None, float | None]:
    histogram = HdrHistogram(1, 600_000_000, 3)  # 1 µs .. 10 min, 3 significant digits
    count = 0
    for per_client in samples_ns:
        for ns in per_client:
            histogram.record_value(max(1, ns // 1000))
            count += 1
    if count == 0:
        return None, None
    return (
        histogram.get_value_at_percentile(50) / 1000,
        histogram.get_value_at_percentile(99) / 1000,
    )


async def closed_loop(
    attempt: Attempt,
    *,
    clients: int,
    until_sold_out: bool = True,
    seconds: float | None = None,
    timeout_s: float = 120.0,
    server: CpuMeter | None = None,
) -> LoadRun:
    """Run ``clients`` concurrent clients calling ``attempt`` back to back.

    With ``until_sold_out`` a client stops at its first "sold out"; otherwise the run lasts
    ``seconds``. Either way it is cut at ``timeout_s`` (and says so).
    """
    if not until_sold_out and seconds is None:
        raise ValueError("a timed run needs seconds")
    stop = asyncio.Event()
    samples: list[list[int]] = [[] for _ in range(clients)]
    granted = refused = errors = 0
    first_error: str | None = None

    async def client(i: int) -> None:
        nonlocal granted, refused, errors, first_error
        mine = samples[i]
        clock = time.perf_counter_ns
        while not stop.is_set():
            t0 = clock()
            try:
                ok = await attempt(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                errors += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"
                if errors >= _MAX_ERRORS:
                    stop.set()
                continue
            mine.append(clock() - t0)
            if ok:
                granted += 1
            else:
                refused += 1
                if until_sold_out:
                    return

    loop = asyncio.get_running_loop()
    server_before = await server.seconds() if server is not None else None
    cpu_before = process_cpu_seconds()
    wait_before = run_queue_seconds()
    started = time.perf_counter()
    limit = timeout_s if until_sold_out else min(timeout_s, seconds or timeout_s)
    timer = loop.call_later(limit, stop.set)
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    cpu = process_cpu_seconds() - cpu_before
    wait_after = run_queue_seconds()
    server_after = await server.seconds() if server is not None else None
    p50, p99 = _percentiles(samples)
    return LoadRun(
        clients=clients,
        granted=granted,
        refused=refused,
        errors=errors,
        wall_s=wall,
        cpu_s=cpu,
        wait_s=None if wait_before is None or wait_after is None else wait_after - wait_before,
        server_cpu_s=None if server_before is None or server_after is None else server_after - server_before,
        p50_ms=p50,
        p99_ms=p99,
        first_error=first_error,
        timed_out=until_sold_out and stop.is_set() and errors < _MAX_ERRORS,
    )
