"""The inventory library's throughput beside the raw one-Lua-call-per-reservation rate.

N concurrent callers in one process, for the same time each, in the same run:

* the library with coalescing on (concurrent ``reserve`` calls of one loop turn travel as
  one script call; idempotency records and events included);
* the library with ``coalesce=False`` (one script call per reservation);
* the raw rate: one ``EVALSHA`` of a trivial decrement-if-positive script per reservation,
  driven with the same concurrency — the least a one-call-per-reservation design can cost.

Issue 15's goals for the engine are read from here: the coalesced library at 3x or more
the raw one-call rate, and at most 15 µs of Redis CPU per reservation at the default
batch size (``Inventory(max_batch=64)``; the notes give the batch size reached). Redis's CPU comes
from ``INFO cpu`` (the whole server process: networking, parsing and the scripts) over the
reservations made; ``INFO commandstats`` adds the time spent inside the script calls and
how many reservations each call carried (the batch size reached). Rounds are
interleaved and each figure is the median round, so a neighbour's burst on a shared
machine hits all three alike. After each run the store's counters must agree with the
callers' count of holds: a lost or doubled reservation fails the run.

Run alone: ``python -m benchmarks.inventory_bench [--quick]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

from .harness import closed_loop
from .report import Claim, Figure
from .rounds import combine, median_spread
from .servers import Servers
from .settings import BenchSettings
from .strategies import EngineHold, LuaPerCall, Strategy

__all__ = ["COALESCED", "RAW", "UNCOALESCED", "measure_library"]

SECTION = "inventory"
_UNLIMITED = 1_000_000_000
_WARM_S = 0.5
RAW = "raw EVALSHA, one per reservation"
COALESCED = "library, coalesced"
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
    try:
        calls_before, usec_before = await _script_stats(stats)
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
        section=SECTION, name=name, claim=Claim.EXACT, store_granted=await strategy.store_granted()
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
        RAW: LuaPerCall(servers, callers),
        COALESCED: EngineHold(servers, callers, coalesce=True),
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
            await closed_loop(
                strategy.attempt, clients=strategy.clients, until_sold_out=False, seconds=_WARM_S
            )
        for _ in range(settings.rounds):
            for name, strategy in contenders.items():
                done = await _timed(strategy, settings, name)
                if name != RAW:
                    raw = runs[RAW][-1].figure.rate
                    ratio = done.figure.rate / raw if raw > 0 else 0.0
                    done = replace(done, figure=replace(done.figure, ratio=ratio, ratio_to="raw EVALSHA"))
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
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
