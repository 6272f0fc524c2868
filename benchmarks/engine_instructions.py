"""Redis instructions per reservation: the engine's reserve script counted by callgrind in
the Redis server itself, beside one raw ``EVALSHA`` per reservation.

    python -m benchmarks.engine_instructions [--quick] [--rounds 50] [--json FILE]

Issue 15's engine goal is Redis CPU per reservation at the default batch size (at most
15 µs; ``python -m benchmarks --only inventory`` reads it from ``INFO cpu``). On a shared
2-core machine those rounds spread by a fifth, so a change to ``reserve.lua`` of a few
percent cannot be seen in them; instructions do not depend on what else the machine runs.
Here a Redis server of its own (the engine ``FLASHSALE_REDIS_ENGINE`` picks, with the
project's persistence: AOF, ``appendfsync everysec``) runs under ``valgrind
--tool=callgrind`` (Debian package ``valgrind``), and three windows are counted:

* idle: what the server does with no command (its timers), taken off the two others at
  its rate;
* the library: rounds of 64 concurrent ``Inventory.reserve`` calls, each by a buyer not
  seen before (a flash sale's buyers buy once), so each round is one script call of 64
  reservations, the default ``max_batch``. The batch size reached is printed (``INFO
  commandstats``): a figure at another batch size is not the goal's;
* the raw reference: rounds of 64 concurrent ``EVALSHA`` of the decrement-if-positive script
  (``benchmarks.strategies.DECR_IF_POSITIVE``), one call per reservation: what Redis spends
  on the least a one-call-per-reservation design can do.

Printed: Redis instructions per reservation for each, net of idle, and their ratio.
Instructions are not time (cache misses and system calls are not in them): a way to judge a
change, not the goal's figure. Exit 0 with a note, and no figures, when valgrind is not
installed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from redis.asyncio import Redis

from flashsale.runtime.embedded import RedisServer
from inventory import Inventory

from .callgrind import Counter, run_counted, wrapper
from .strategies import DECR_IF_POSITIVE

__all__ = ["BATCH", "Reading", "main", "measure", "render"]

#: Concurrent calls per round: the library's default ``max_batch``.
BATCH = 64
SKU = "hot"
#: How long the server may take to start under valgrind.
START_S = 300.0
_SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


@dataclass(frozen=True)
class Reading:
    """One driver's window: reservations made, the script calls they took, the window's
    length and instructions, and the server's idle rate (instructions per second)."""

    driver: str
    reservations: int
    script_calls: int
    seconds: float
    instructions: int
    idle_per_s: float

    @property
    def per_reservation(self) -> float:
        """Instructions per reservation, less the idle rate over the window."""
        return (self.instructions - self.idle_per_s * self.seconds) / max(self.reservations, 1)

    @property
    def per_call(self) -> float:
        """Reservations per script call: the batch size reached."""
        return self.reservations / max(self.script_calls, 1)


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats[c]["calls"]) for c in _SCRIPT_COMMANDS if c in stats)


async def _window(
    redis: Redis,
    counter: Counter,
    name: str,
    rounds: int,
    one_round: Callable[[], Awaitable[int]],
    idle_per_s: float,
) -> Reading:
    calls_before = await _script_calls(redis)
    await asyncio.to_thread(counter.window)  # (the INFO above is not counted)
    started = time.monotonic()
    made = 0
    for _ in range(rounds):
        made += await one_round()
    seconds = time.monotonic() - started
    instructions = await asyncio.to_thread(counter.window)
    calls = await _script_calls(redis) - calls_before
    return Reading(name, made, calls, seconds, instructions, idle_per_s)


async def measure(
    server: RedisServer, counter: Counter, *, rounds: int, warmup: int, idle_s: float
) -> list[Reading]:
    """The idle rate, then the library's window and the raw one (see the module docstring)."""
    redis = Redis(host="127.0.0.1", port=server.port, max_connections=BATCH)
    inventory = Inventory(redis, "engine-instructions", coalesce=True, max_batch=BATCH)
    raw = redis.register_script(DECR_IF_POSITIVE)
    raw_key = "engine-instructions:raw"
    buyers = itertools.count()
    try:
        await inventory.stock(SKU, 1_000_000_000)
        await redis.set(raw_key, 1_000_000_000)

        async def library_round() -> int:
            holds = await asyncio.gather(
                *(inventory.reserve(f"b{next(buyers)}", SKU, request_id="r") for _ in range(BATCH))
            )
            return len(holds)

        async def raw_round() -> int:
            left = await asyncio.gather(*(raw(keys=[raw_key]) for _ in range(BATCH)))
            return sum(1 for n in left if int(n) >= 0)

        for _ in range(warmup):
            await library_round()
            await raw_round()
        await asyncio.to_thread(counter.start)
        started = time.monotonic()
        await asyncio.sleep(idle_s)
        idle = await asyncio.to_thread(counter.window)
        idle_per_s = idle / (time.monotonic() - started)
        return [
            await _window(
                redis,
                counter,
                "library, coalesced, a fresh buyer per reservation",
                rounds,
                library_round,
                idle_per_s,
            ),
            await _window(redis, counter, "raw EVALSHA, one per reservation", rounds, raw_round, idle_per_s),
        ]
    finally:
        await inventory.aclose()
        await redis.aclose()


def render(readings: list[Reading], engine: str) -> str:
    rows = [
        f"Redis instructions per reservation ({engine}, AOF everysec, counted by callgrind, net of idle)",
        "",
        "| driver | reservations | script calls | reservations per call | instructions per reservation |",
        "|---|---|---|---|---|",
    ]
    for r in readings:
        rows.append(
            f"| {r.driver} | {r.reservations:,} | {r.script_calls:,} | {r.per_call:.1f} | {r.per_reservation / 1000:,.1f}k |"
        )
    if len(readings) == 2:
        library, raw = readings
        rows.append(
            f"\nThe library's reservation costs Redis {library.per_reservation / raw.per_reservation:.2f}x "
            "a raw one-call reservation (issue 15's engine goal is time: <= 15 µs of Redis CPU per reservation)"
        )
    return "\n".join(rows)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="flashsale-engine-instructions-") as tmp:
        out = Path(tmp) / "callgrind.redis"
        server = RedisServer(
            appendonly=True, appendfsync="everysec", wrapper=wrapper(out), start_timeout=START_S
        )
        await asyncio.to_thread(server.start)
        try:
            pid = server.pid
            assert pid is not None
            readings = await measure(
                server, Counter(pid, out), rounds=args.rounds, warmup=args.warmup, idle_s=args.idle
            )
        finally:
            await asyncio.to_thread(server.stop)
    engine = str(server.engine)
    print(render(readings, engine), flush=True)
    return {
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "engine": engine},
        "settings": {"batch": BATCH, "rounds": args.rounds, "warmup": args.warmup, "idle_s": args.idle},
        "readings": [
            {**asdict(r), "per_reservation": round(r.per_reservation), "per_call": r.per_call}
            for r in readings
        ],
        "ratio": round(readings[0].per_reservation / readings[1].per_reservation, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows (CI): 8 rounds of 64, 1 s idle")
    parser.add_argument("--rounds", type=int, help="rounds of 64 reservations per driver (default 50)")
    parser.add_argument("--json", type=Path, help="write the readings here")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (8 if args.quick else 50)
    args.warmup = 10
    args.idle = 1.0 if args.quick else 4.0
    return run_counted("engine-instructions", lambda: _run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
