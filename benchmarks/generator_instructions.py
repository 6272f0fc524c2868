"""The surge harness's load generator counted in instructions: the Locust process of
``flashsale rehearse`` beside a plain Locust ``FastHttpUser`` at the same request rate,
each run under callgrind.

    python -m benchmarks.generator_instructions [--quick] [--surge-peak-rps 30] [--json FILE]

Issue 15's generator goal is time: the harness's CPU per request at most 2x a plain
``FastHttpUser``'s against the trivial endpoint (``python -m benchmarks --only
generator``). That ratio moves with the machine, and for a reason of its own: *when* each
generator works, not how much. The plain users, paced together, wake in bursts (strace,
at 128 requests/s: 116 wake-ups for 1,510 requests) and find each answer already there
(the trivial endpoint answers within the send), so they run on a warm core; the
harness's open-model arrivals are spread by design and each waits milliseconds for the
service, so it wakes about once per request (1,737 wake-ups for 2,303 requests) on a core
the service, Redis and PostgreSQL just ran on. Instructions do not see that: they count
the work each generator does per request.

Both Locust processes run under ``valgrind --tool=callgrind`` (Debian package
``valgrind``), so at a rate valgrind keeps up with (default 30 arrivals/s at the peak; a
rehearsal that calls itself invalid is marked):

1. **the surge harness**: ``flashsale rehearse --peak-rps P --duration S --locust-wrapper
   'valgrind …'`` against the run's Redis and PostgreSQL. Counting starts once Locust has
   started its run (its ``progress.json``) and is read every second;
2. **the baseline**: ``benchmarks/plain_locustfile.py`` under the same wrapper, paced to
   the surge's mean request rate, read every second from its start (given 30 s more than
   the surge's window: spawning its users under valgrind eats into Locust's run time).

Each is judged over the whole seconds in which it completed requests, the first and last
(partial) ones left out, as ``generator_bench`` judges CPU time: instructions in those
seconds over the requests completed in them. Fixed costs per second (Locust's loop and
statistics, the harness's once-a-second histograms and stats polling) are in both, so the
ratio is taken at the same request rate; printed, never asserted. Exit 0 with a note, and
no figures, when valgrind is not installed.

Servers: ``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` when set (``python -m
benchmarks`` passes its own), else embedded ones started here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from flashsale.runtime.embedded import EmbeddedStack

from .callgrind import Counter, run_counted, wrapper
from .generator_bench import interpolate, rehearse, requests_window, run_plain
from .served import hello_app
from .servers import open_servers

__all__ = ["InstructionTrace", "Reading", "count_window", "main", "render"]

#: How often the count is read (callgrind dumps): the resolution of the judged window.
READ_S = 1.0
#: How long Locust may take to start its run under valgrind (imports run ~50x slower).
START_S = 300.0
#: Seconds the plain run is given beyond the surge's window: Locust's run time starts
#: before its 64 users are spawned, which under valgrind takes ~10 s.
PLAIN_SPAWN_S = 30.0


class InstructionTrace:
    """The cumulative instruction count of a process started under
    :func:`benchmarks.callgrind.wrapper`, read every :data:`READ_S` once ``ready`` exists
    (a file the process writes when its run begins; None: at once)."""

    def __init__(self, pid: int, out: Path, ready: Path | None = None) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []  # (epoch, instructions since counting began)
        self._counter = Counter(pid, out)
        self._ready = ready
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> InstructionTrace:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if told to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        deadline = time.monotonic() + START_S
        while self._ready is not None and not self._ready.exists() and time.monotonic() < deadline:
            if await self._wait(0.2):
                return
        while True:  # callgrind_control answers once valgrind runs the program
            try:
                await asyncio.to_thread(self._counter.start)
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline or await self._wait(0.5):
                    return
        total = 0
        self.samples.append((time.time(), 0.0))
        # Read while it runs; a count asked of a process that is exiting may never come
        # (Counter's timeout ends the wait): the samples so far are what it did.
        while not await self._wait(READ_S) and _running(self.pid):
            try:
                total += await asyncio.to_thread(self._counter.window)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, OSError):
                return
            self.samples.append((time.time(), float(total)))

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    def between(self, start: float, end: float) -> float | None:
        """Instructions between two epochs; None when the samples do not cover them."""
        a, b = interpolate(self.samples, start), interpolate(self.samples, end)
        return None if a is None or b is None else b - a


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Reading:
    """One generator's judged window: requests completed, its length, its instructions."""

    generator: str
    requests: int
    seconds: float
    instructions: float
    notes: tuple[str, ...] = ()

    @property
    def per_request(self) -> float:
        return self.instructions / max(self.requests, 1)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def count_window(
    name: str, trace: InstructionTrace, per_second: Mapping[float, int], notes: tuple[str, ...] = ()
) -> Reading:
    """The whole seconds with requests (less the first and last) that the count covers."""
    if len(trace.samples) >= 2:
        first, last = trace.samples[0][0], trace.samples[-1][0]
        per_second = {t: n for t, n in per_second.items() if first <= t and t + 1.0 <= last}
    start, end, requests = requests_window(per_second)
    instructions = trace.between(start, end)
    if instructions is None:
        raise RuntimeError(f"{name}: the count of pid {trace.pid} does not cover its busy seconds")
    return Reading(name, requests, end - start, instructions, notes)


async def measure(peak_rps: float, seconds: float, workdir: Path) -> list[Reading]:
    """The surge harness under callgrind, then the plain user at its mean rate."""
    stack = await asyncio.to_thread(EmbeddedStack().start)  # or the servers the environment names
    try:
        servers = open_servers(stack)
        surge_out = workdir / "callgrind.surge"

        async def follow_surge(pid: int, report: Path) -> InstructionTrace:
            return InstructionTrace(pid, surge_out, ready=report / "progress.json").start()

        run, surge_trace = await rehearse(
            servers, peak_rps, seconds, workdir, 0, follow_surge, locust_wrapper=wrapper(surge_out)
        )
        assert isinstance(surge_trace, InstructionTrace)
        notes = run.notes if run.valid else (*run.notes, "counted all the same")
        surge = count_window(
            "surge harness (flashsale rehearse's Locust)", surge_trace, run.per_second, notes
        )
        plain_out = workdir / "callgrind.plain"

        async def follow_plain(pid: int, _workdir: Path) -> InstructionTrace:
            return InstructionTrace(pid, plain_out).start()

        async with hello_app(workdir) as hello:
            per_second, plain_trace = await run_plain(
                hello.url,
                surge.rate,
                surge.seconds + PLAIN_SPAWN_S,
                workdir,
                0,
                follow_plain,
                wrapper=wrapper(plain_out),
            )
        assert isinstance(plain_trace, InstructionTrace)
        plain = count_window(
            "plain FastHttpUser (trivial endpoint)",
            plain_trace,
            per_second,
            ("64 users paced to the surge's mean request rate",),
        )
        return [surge, plain]
    finally:
        await asyncio.to_thread(stack.stop)


def render(readings: list[Reading]) -> str:
    rows = [
        "Load generator instructions per request (the Locust process, counted by callgrind)",
        "",
        "| generator | requests | seconds | requests/s | instructions per request | instructions per second | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in readings:
        rows.append(
            f"| {r.generator} | {r.requests:,} | {r.seconds:.0f} | {r.rate:.1f} | "
            f"{r.per_request / 1000:,.1f}k | {r.instructions / r.seconds / 1e6:,.1f}M | {'; '.join(r.notes)} |"
        )
    if len(readings) == 2:
        surge, plain = readings
        rows.append(
            f"\nThe surge harness does {surge.per_request / plain.per_request:.2f}x the plain user's work per "
            "request at the same request rate (issue 15's generator goal is CPU time: <= 2x)"
        )
    return "\n".join(rows)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="flashsale-generator-instructions-") as tmp:
        readings = await measure(args.surge_peak_rps, args.surge_seconds, Path(tmp))
    print(render(readings), flush=True)
    surge, plain = readings
    return {
        "machine": {"python": platform.python_version(), "cores": os.cpu_count()},
        "settings": {"surge_peak_rps": args.surge_peak_rps, "surge_seconds": args.surge_seconds},
        "readings": [
            {**asdict(r), "per_request": round(r.per_request), "rate": round(r.rate, 2)} for r in readings
        ],
        "ratio": round(surge.per_request / plain.per_request, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run (CI): 20 arrivals/s peak, 8 s")
    parser.add_argument(
        "--surge-peak-rps", type=float, help="the rehearsal's peak arrivals per second (default 30)"
    )
    parser.add_argument(
        "--surge-seconds", type=float, help="the rehearsal's seconds of arrivals (default 30)"
    )
    parser.add_argument("--json", type=Path, help="write the readings here")
    args = parser.parse_args(argv)
    args.surge_peak_rps = args.surge_peak_rps or (20.0 if args.quick else 30.0)
    args.surge_seconds = args.surge_seconds or (8.0 if args.quick else 30.0)
    return run_counted("generator-instructions", lambda: _run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
