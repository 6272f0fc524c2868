"""The inventory library's throughput beside the raw one-Lua-call-per-reservation rate.

N concurrent callers, for the same time each, in the same run:

* the library with coalescing on (concurrent ``reserve`` calls of one loop turn travel as
  one script call; idempotency records and events included), **a fresh buyer for every
  reservation**: a flash sale is many distinct buyers buying once or a few times, so
  every reservation adds a buyer to the per-buyer counts hash, as in the sale the goal is
  about. This is the figure issue 15's goals are read from;
* the same with **256 repeat buyers** (caller i is always buyer ``u<i>``), the population
  this benchmark used before: it keeps the per-buyer counts hash at 256 fields, small
  enough for Redis's compact (listpack) form, a linear scan per field. Printed beside the
  first so the change of population hides nothing;
* the library with ``coalesce=False`` (one script call per reservation; 256 repeat buyers);
* the raw rate: one ``EVALSHA`` of a trivial decrement-if-positive script per reservation,
  driven with the same concurrency — the least a one-call-per-reservation design can cost
  — from this process, as before, and from ``_RAW_PROCESSES`` processes sharing the same
  callers between them. One Python process saturates its core long before Redis does on
  one call per reservation, so the one-process raw rate measures redis-py; the
  several-process rate is the one the library is compared with (the goal's reference).

Issue 15's goals for the engine are read from here: the coalesced library (fresh buyers)
at 3x or more the raw one-call rate, and at most 15 µs of Redis CPU per reservation at the
default batch size (``Inventory(max_batch=64)``; the notes give the batch size reached).
Redis's CPU comes from ``INFO cpu`` (the whole server process: networking, parsing and the
scripts) over the reservations made; ``INFO commandstats`` adds the time spent inside the
script calls and how many reservations each call carried (the batch size reached). The
raw figures' notes give Redis's CPU per call beside the library's per reservation: that
ratio is what each design costs Redis, whatever drives it. Rounds are interleaved and
each figure is the median round, so a neighbour's burst on a shared machine hits all
alike. After each run the store's counters must agree with the callers' count of holds:
a lost or doubled reservation fails the run.

Run alone: ``python -m benchmarks.inventory_bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from inventory import Inventory, SoldOut

from .harness import LoadRun, RedisCpu, closed_loop
from .report import Claim, Figure
from .rounds import combine, median_spread
from .servers import Servers
from .settings import BenchSettings
from .strategies import DECR_IF_POSITIVE, EngineHold, LuaPerCall, Strategy

__all__ = ["COALESCED", "COALESCED_REPEAT", "RAW", "RAW_ONE_PROCESS", "UNCOALESCED", "measure_library"]

SECTION = "inventory"
_UNLIMITED = 1_000_000_000
_WARM_S = 0.5
#: Client processes driving the raw one-call-per-reservation side (at least two: one
#: Python process saturates before Redis does on one call per reservation).
_RAW_PROCESSES = max(2, os.cpu_count() or 2)
#: Time the raw worker processes are given to start and connect before the timed run.
_RAW_START_S = 5.0
RAW = f"raw EVALSHA, one per reservation, {_RAW_PROCESSES} processes"
RAW_ONE_PROCESS = "raw EVALSHA, one per reservation, this process"
COALESCED = "library, coalesced, a fresh buyer per reservation"
COALESCED_REPEAT = "library, coalesced, 256 repeat buyers"
UNCOALESCED = "library, coalesce=False"
#: The commands a script call is counted under in ``INFO commandstats``.
_SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


async def _script_stats(redis: Any) -> tuple[int, int]:
    """(calls, µs) of every script call Redis ran so far: its own time inside the scripts."""
    stats = await redis.info("commandstats")
    calls = usec = 0
    for command in _SCRIPT_COMMANDS:
        entry = stats.get(command)
        if entry:
            calls += int(entry["calls"])
            usec += int(entry["usec"])
    return calls, usec


class _FreshBuyers(EngineHold):
    """The library as a flash sale meets it: every reservation a buyer not seen before."""

    def __init__(self, servers: Servers, clients: int) -> None:
        super().__init__(servers, clients, coalesce=True)
        self._buyers = itertools.count()

    async def open(self) -> None:
        self.redis = self.servers.redis(max_connections=self.clients)
        self.sale = f"bench-{self.servers.token}-f"  # its own keys beside the repeat buyers' sale
        self.inventory = Inventory(self.redis, self.sale, coalesce=True)

    async def attempt(self, client: int) -> bool:
        try:
            await self.inventory.reserve(f"b{next(self._buyers)}", self.sku, request_id="r")
        except SoldOut:
            return False
        return True


class _RawProcesses(LuaPerCall):
    """The raw one-call-per-reservation rate driven by several processes, the callers
    shared between them: each runs the same closed loop as :class:`LuaPerCall` does here."""

    def __init__(self, servers: Servers, clients: int, processes: int) -> None:
        super().__init__(servers, clients)
        self.processes = processes

    async def run(self, seconds: float) -> tuple[LoadRun, list[str]]:
        share = [
            self.clients // self.processes + (i < self.clients % self.processes)
            for i in range(self.processes)
        ]
        start_at = time.time() + _RAW_START_S
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.inventory_bench",
                "--raw-worker",
                json.dumps(
                    {
                        "url": self.servers.redis_url,
                        "key": self.key,
                        "clients": n,
                        "seconds": seconds,
                        "start_at": start_at,
                    }
                ),
                stdout=asyncio.subprocess.PIPE,
            )
            for n in share
        ]
        meter = RedisCpu(self.redis)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        before = await meter.seconds()
        outputs = [await w.communicate() for w in workers]
        after = await meter.seconds()
        done = [json.loads(out) for out, _ in outputs]
        late = max(d["late_s"] for d in done)
        # From the common start to the last process's end: a late process's own time is
        # not the window the others ran in.
        wall = max(d["late_s"] + d["wall_s"] for d in done)
        busiest = max(done, key=lambda d: d["cpu_s"] / d["wall_s"] if d["wall_s"] else 0.0)
        errors = [d["first_error"] for d in done if d["first_error"]]
        run = LoadRun(
            clients=self.clients,
            granted=sum(d["granted"] for d in done),
            refused=sum(d["refused"] for d in done),
            errors=sum(d["errors"] for d in done),
            wall_s=wall,
            # The busiest process's CPU: whether one of them saturated is what matters.
            cpu_s=busiest["cpu_s"] / busiest["wall_s"] * wall if busiest["wall_s"] else 0.0,
            wait_s=None,
            server_cpu_s=None if before is None or after is None else after - before,
            p50_ms=max((d["p50_ms"] for d in done if d["p50_ms"] is not None), default=None),
            p99_ms=max((d["p99_ms"] for d in done if d["p99_ms"] is not None), default=None),
            first_error=errors[0] if errors else None,
            timed_out=False,
        )
        # The same text every round (rounds keep each distinct note): the busiest process's
        # CPU is the gen CPU column.
        notes = [
            f"{self.processes} client processes ({'/'.join(map(str, share))} callers); gen CPU and "
            "p50/p99 are the busiest and the slowest process's"
        ]
        if late > 0.05:
            notes.append(f"a process started {late:.2f} s late")
        return run, notes


async def _raw_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One raw worker process: connect, load the script, wait for the common start, run."""
    redis = Redis.from_url(spec["url"], max_connections=spec["clients"])
    try:
        script = redis.register_script(DECR_IF_POSITIVE)
        key = spec["key"]
        await asyncio.gather(*(redis.ping() for _ in range(spec["clients"])))
        await script(keys=[key + ":warm"])

        async def attempt(_client: int) -> bool:
            return int(await script(keys=[key])) >= 0

        late = time.time() - spec["start_at"]
        await asyncio.sleep(max(0.0, -late))
        run = await closed_loop(
            attempt, clients=spec["clients"], until_sold_out=False, seconds=spec["seconds"]
        )
        await redis.delete(key + ":warm")
    finally:
        await redis.aclose()
    return {
        "granted": run.granted,
        "refused": run.refused,
        "errors": run.errors,
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "first_error": run.first_error,
        "late_s": max(0.0, late),
    }


@dataclass(frozen=True)
class _Round:
    figure: Figure
    #: Reservations per script call (the batch size the coalescer reached), and Redis's
    #: time inside the script calls per reservation, from ``INFO commandstats``.
    per_call: float | None
    script_us: float | None


async def _timed(strategy: Strategy, settings: BenchSettings, name: str) -> _Round:
    """One round: a timed closed loop, the store's own count, and Redis's view of it."""
    await strategy.prepare(_UNLIMITED)
    stats = strategy.servers.redis()
    notes: list[str] = []
    try:
        calls_before, usec_before = await _script_stats(stats)
        if isinstance(strategy, _RawProcesses):
            run, notes = await strategy.run(settings.seconds)
        else:
            run = await closed_loop(
                strategy.attempt,
                clients=strategy.clients,
                until_sold_out=False,
                seconds=settings.seconds,
                server=strategy.meter(),
            )
        calls_after, usec_after = await _script_stats(stats)
    finally:
        await stats.aclose()
    calls = calls_after - calls_before
    figure = run.figure(
        section=SECTION,
        name=name,
        notes=notes,
        claim=Claim.EXACT,
        store_granted=await strategy.store_granted(),
    )
    if not (run.granted and calls):
        return _Round(figure, None, None)
    return _Round(figure, run.granted / calls, (usec_after - usec_before) / run.granted)


async def measure_library(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """The three figures, median of ``settings.rounds`` interleaved rounds, the library's
    as ratios of the raw one-call rate (median of the per-round ratios). The server
    columns are Redis's own CPU (``INFO cpu``) per reservation."""
    callers = settings.callers
    contenders: dict[str, Strategy] = {
        RAW: _RawProcesses(servers, callers, _RAW_PROCESSES),
        RAW_ONE_PROCESS: LuaPerCall(servers, callers),
        COALESCED: _FreshBuyers(servers, callers),
        COALESCED_REPEAT: EngineHold(servers, callers, coalesce=True),
        UNCOALESCED: EngineHold(servers, callers, coalesce=False),
    }
    runs: dict[str, list[_Round]] = {name: [] for name in contenders}
    for strategy in contenders.values():
        await strategy.open()
    try:
        for strategy in contenders.values():
            # Not measured: the client's connections (up to one per caller) are opened and
            # the scripts loaded here, not inside the first round's few seconds.
            await strategy.prepare(_UNLIMITED)
            if not isinstance(strategy, _RawProcesses):  # its processes warm up on their own
                await closed_loop(
                    strategy.attempt, clients=strategy.clients, until_sold_out=False, seconds=_WARM_S
                )
        for _ in range(settings.rounds):
            for name, strategy in contenders.items():
                done = await _timed(strategy, settings, name)
                if name not in (RAW, RAW_ONE_PROCESS):
                    raw = runs[RAW][-1].figure.rate
                    ratio = done.figure.rate / raw if raw > 0 else 0.0
                    done = replace(
                        done,
                        figure=replace(
                            done.figure, ratio=ratio, ratio_to=f"raw EVALSHA ({_RAW_PROCESSES} processes)"
                        ),
                    )
                runs[name].append(done)
    finally:
        for strategy in contenders.values():
            await strategy.close()
    return [_combine(runs[name]) for name in contenders]


def _combine(rounds: list[_Round]) -> Figure:
    per_call = median_spread([r.per_call for r in rounds])
    script_us = median_spread([r.script_us for r in rounds])
    notes = []
    if per_call is not None and script_us is not None:
        notes.append(
            f"{per_call[0]:.1f} reservations per script call; "
            f"{script_us[0]:.1f} µs per reservation inside scripts (commandstats)"
        )
    return combine([r.figure for r in rounds], notes=notes)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-worker"]:
        import uvloop

        print(json.dumps(uvloop.run(_raw_worker(json.loads(sys.argv[2])))))
        raise SystemExit(0)
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
