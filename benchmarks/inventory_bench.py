"""The inventory library's throughput beside the raw one-Lua-call-per-reservation rate.

N concurrent callers in one process, for the same time each, in the same run:

* the library with coalescing on (concurrent ``reserve`` calls of one loop turn travel as
  one script call; idempotency records and events included);
* the library with ``coalesce=False`` (one script call per reservation);
* the raw rate: one ``EVALSHA`` of a trivial decrement-if-positive script per reservation,
  driven with the same concurrency — the least a one-call-per-reservation design can cost.

The goal (issue 2) is the coalesced library at 3x or more the raw one-call rate. Rounds
are interleaved and each figure is the median round, so a neighbour's burst on a shared
machine hits all three alike. After each run the store's counters must agree with the
callers' count of holds: a lost or doubled reservation fails the run.

Run alone: ``python -m benchmarks.inventory_bench [--quick]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from .harness import LoadRun, closed_loop
from .report import Claim, Figure
from .servers import Servers
from .settings import BenchSettings
from .strategies import EngineHold, LuaPerCall, Strategy

__all__ = ["GOAL", "measure_library"]

SECTION = "inventory"
#: Issue 2's goal: the coalesced library at this multiple of the one-call rate.
GOAL = 3.0
_UNLIMITED = 1_000_000_000
RAW = "raw EVALSHA, one per reservation"
COALESCED = "library, coalesced"
UNCOALESCED = "library, coalesce=False"


@dataclass(frozen=True)
class _Round:
    run: LoadRun
    store_granted: int

    @property
    def redis_cpu_us(self) -> float | None:
        """Redis's CPU time per reservation made (µs): CPU time, not wall time, so a busy
        machine that preempts Redis does not inflate it."""
        if self.run.server_cpu_s is None or not self.run.granted:
            return None
        return self.run.server_cpu_s * 1e6 / self.run.granted


async def _timed(strategy: Strategy, settings: BenchSettings) -> _Round:
    await strategy.prepare(_UNLIMITED)
    run = await closed_loop(
        strategy.attempt,
        clients=strategy.clients,
        until_sold_out=False,
        seconds=settings.seconds,
        server=strategy.meter(),
    )
    return _Round(run, await strategy.store_granted())


def _figure(name: str, claim: Claim, rounds: list[_Round]) -> Figure:
    middle = sorted(rounds, key=lambda r: r.run.rate)[len(rounds) // 2]
    notes: list[str] = []
    if len(rounds) > 1:
        spread = [r.run.rate for r in rounds]
        notes.append(f"median of {len(rounds)} rounds ({min(spread):,.0f}..{max(spread):,.0f})")
    if middle.redis_cpu_us is not None:
        notes.append(f"Redis CPU {middle.redis_cpu_us:.1f} µs per reservation")
    return middle.run.figure(
        section=SECTION,
        name=name,
        notes=notes,
        claim=claim,
        store_granted=middle.store_granted,
        errors=sum(r.run.errors for r in rounds),
    )


async def measure_library(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """The three figures, with the library's as ratios of the raw one-call rate."""
    callers = settings.callers
    contenders: dict[str, Strategy] = {
        RAW: LuaPerCall(servers, callers),
        COALESCED: EngineHold(servers, callers, coalesce=True),
        UNCOALESCED: EngineHold(servers, callers, coalesce=False),
    }
    rounds = 1 if settings.quick else 3
    runs: dict[str, list[_Round]] = {name: [] for name in contenders}
    for strategy in contenders.values():
        await strategy.open()
    try:
        for _ in range(rounds):
            for name, strategy in contenders.items():
                runs[name].append(await _timed(strategy, settings))
    finally:
        for strategy in contenders.values():
            await strategy.close()
    figures = {name: _figure(name, Claim.EXACT, runs[name]) for name in contenders}
    raw = figures[RAW].rate
    out = [figures[RAW]]
    for name in (COALESCED, UNCOALESCED):
        f = figures[name]
        ratio = f.rate / raw if raw > 0 else 0.0
        notes = list(f.notes)
        if name == COALESCED:
            notes.append(f"goal >= {GOAL:g}x raw: {'met' if ratio >= GOAL else 'NOT met'}")
        out.append(replace(f, ratio=ratio, ratio_to="raw EVALSHA", notes=tuple(notes)))
    return out


if __name__ == "__main__":
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
