"""What the surge harness costs its load generator: CPU seconds per request of the Locust
process that ``flashsale rehearse`` runs, beside a plain Locust ``FastHttpUser`` sending
the same number of requests per second to the trivial endpoint, in the same run.

Each round:

1. **the surge harness**, exactly as the rehearsal runs it: ``python -m flashsale rehearse
   --peak-rps P --duration S`` pointed at this run's Redis and PostgreSQL (its own key
   prefix, removed afterwards; its orders stay in PostgreSQL under the rehearsal's own
   sale, as after any rehearsal). The rehearsal starts the service (two processes), the
   worker and one Locust process on ``loadtests/surge.py`` — open-model arrivals, the T0
   rendezvous, five personas, HdrHistograms, the request log, once-a-second stats polling.
   That Locust process is found among the rehearsal's children and its CPU time sampled
   every 0.1 s; its requests per second are read from the report's ``timeline.csv``;
2. **the baseline**: ``benchmarks/plain_locustfile.py`` — 64 ``FastHttpUser`` s posting
   orders to ``benchmarks.hello_app``, paced (``constant_throughput``) to the surge's mean
   request rate, for as long; its requests per second come from Locust's own statistics.

Both are measured the same way: the CPU time of the Locust process over the whole seconds
in which it completed requests (the first and last, partial, seconds left out), divided
by the requests completed in them. The ratio is the surge's CPU per request over the
baseline's, per round; issue 15's goal is at most 2x. At the same request rate both pay
the same fixed costs per second (Locust's own loop and stats), so the ratio is what the
harness adds per request. A Locust process above ~90 % of a core is saturated: its
figure is flagged, and the rehearsal itself calls such a run invalid.

What the ratio also holds is *when* each generator works. The 64 paced plain users wake
together and find each answer already there (the trivial endpoint answers within the
send); the harness's arrivals are spread out and each waits milliseconds for the service,
so it wakes about once per request, on a core the service and its databases just used.
``benchmarks.generator_instructions`` counts the work alone (instructions per request,
under callgrind): see docs/benchmarks.md for both readings side by side.

Run alone: ``python -m benchmarks.generator_bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import psutil  # type: ignore[import-untyped]

from .harness import run_queue_seconds
from .report import Figure
from .rounds import combine
from .served import ROOT, OrderService, forget_prefix, hello_app
from .servers import Servers
from .settings import BenchSettings

__all__ = [
    "BASELINE",
    "SURGE",
    "CpuTrace",
    "Rehearsed",
    "Trace",
    "interpolate",
    "measure_generators",
    "rehearse",
    "requests_window",
    "run_plain",
]

SECTION = "generator"
SURGE = "surge harness: flashsale rehearse's Locust -> service"
BASELINE = "plain FastHttpUser -> trivial endpoint"
PLAIN_USERS = 64
#: How often the Locust process's CPU time is read.
SAMPLE_S = 0.1
#: A rehearsal's exit code when the oracle found an invariant broken (loadtests.exit_codes).
_INVARIANT_VIOLATED = 2


def interpolate(points: list[tuple[float, float]], epoch: float) -> float | None:
    """The value at ``epoch`` of a cumulative series sampled at ``points`` (epoch, value),
    straight between the samples around it; None outside them."""
    if len(points) < 2 or not points[0][0] <= epoch <= points[-1][0]:
        return None
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        if t0 <= epoch <= t1:
            return v0 + (v1 - v0) * ((epoch - t0) / (t1 - t0) if t1 > t0 else 0.0)
    return None


class CpuTrace:
    """Samples one process's cumulative CPU time (and its wait for a core) until it exits
    or :meth:`stop` is called; :meth:`between` interpolates any interval of wall time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, float | None]] = []  # (epoch, cpu s, wait s)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> CpuTrace:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            while not self._stopping.is_set():
                t = proc.cpu_times()
                self.samples.append((time.time(), t.user + t.system, run_queue_seconds(self.pid)))
                try:
                    await asyncio.wait_for(self._stopping.wait(), SAMPLE_S)
                except TimeoutError:
                    pass
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return  # it exited: the samples so far are what it did

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    def _at(self, epoch: float, column: int) -> float | None:
        return interpolate([(s[0], v) for s in self.samples if (v := s[column]) is not None], epoch)

    def between(self, start: float, end: float) -> tuple[float | None, float | None]:
        """(CPU seconds, seconds waited for a core) between two epochs, None when the trace
        does not cover them."""
        values = []
        for column in (1, 2):
            a, b = self._at(start, column), self._at(end, column)
            values.append(None if a is None or b is None else b - a)
        return values[0], values[1]


def requests_window(per_second: Mapping[float, int]) -> tuple[float, float, int]:
    """(start epoch, end epoch, requests) over the whole seconds with requests: from the
    first second that completed one to the last, leaving out those two (partial) seconds
    when there are more than two. ``per_second`` maps each second's start epoch to its count."""
    busy = sorted(t for t, n in per_second.items() if n > 0)
    if not busy:
        raise RuntimeError("no request completed")
    first, last = busy[0], busy[-1]
    if len(busy) > 2:
        first, last = busy[1], busy[-2]
    requests = sum(n for t, n in per_second.items() if first <= t <= last)
    return first, last + 1.0, requests


@dataclass(frozen=True)
class _Round:
    figure: Figure
    window_s: float
    requests: int


def _figure(name: str, trace: CpuTrace, per_second: Mapping[float, int], **more: Any) -> _Round:
    # Only whole seconds the CPU trace covers count: on a busy machine the trace may start
    # after the generator's first requests (it finds the Locust process once it runs) or end
    # before its last ones; CPU and requests must describe the same seconds.
    covered = [sample[0] for sample in trace.samples if sample[1] is not None]
    if len(covered) >= 2:
        per_second = {t: n for t, n in per_second.items() if covered[0] <= t and t + 1.0 <= covered[-1]}
    start, end, requests = requests_window(per_second)
    cpu, wait = trace.between(start, end)
    if cpu is None:
        raise RuntimeError(f"{name}: the CPU trace of pid {trace.pid} does not cover its busy seconds")
    wall = end - start
    figure = Figure(
        section=SECTION,
        name=name,
        rate=requests / wall,
        unit="requests/s",
        generator_cpu=cpu / wall,
        generator_wait=None if wait is None else wait / wall,
        granted=requests,
        wall_s=wall,
        **more,
    )
    return _Round(figure, wall, requests)


async def _stop(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the rehearsal stops its children itself on SIGTERM
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _find_locust(parent: int, timeout_s: float) -> int:
    """The Locust process: ``parent`` or one of its descendants (the rehearsal spawns it; a
    wrapper such as Debian's ``valgrind`` script starts it as a child of its own)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            top = psutil.Process(parent)
            for child in [top, *top.children(recursive=True)]:
                try:
                    cmdline = child.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                # Not the `locust … --list` that checks the pass-through options before the run.
                if "locust" in cmdline and "-f" in cmdline and "--list" not in cmdline:
                    return int(child.pid)
        except psutil.NoSuchProcess:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError("the rehearsal started no Locust process (see its log)")


class Trace(Protocol):
    """What follows the Locust process of a run: started once it is found, stopped when it
    has exited (:class:`CpuTrace`; ``generator_instructions.InstructionTrace``)."""

    samples: list[Any]

    def start(self) -> Trace: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Rehearsed:
    """One rehearsal as the generator benchmarks read it: requests completed per second
    (epoch of the second's start -> count, from its ``timeline.csv``), its exit code and
    whether it judged itself valid, and notes saying how it ran."""

    per_second: dict[float, int]
    code: int
    valid: bool
    notes: tuple[str, ...]


async def rehearse(
    servers: Servers,
    peak_rps: float,
    seconds: float,
    workdir: Path,
    n: int,
    follow: Callable[[int, Path], Awaitable[Trace]],
    *,
    locust_wrapper: Sequence[str] = (),
) -> tuple[Rehearsed, Trace]:
    """``flashsale rehearse --peak-rps P --duration S`` against ``servers`` (its own key
    prefix, removed afterwards); ``follow(pid, report_dir)`` starts what traces its Locust
    process (run under ``locust_wrapper``)."""
    service = OrderService.for_run(servers, f"gen{n}")
    report = workdir / f"rehearsal-{n}"
    env = service.environ()
    command = [
        sys.executable,
        "-m",
        "flashsale",
        "rehearse",
        "--peak-rps",
        f"{peak_rps:g}",
        "--duration",
        f"{seconds:g}",
        "--report-dir",
        str(report),
    ]
    if locust_wrapper:
        command += ["--locust-wrapper", shlex.join(locust_wrapper)]
    command += ["--", "--no-plots"]
    log_path = workdir / f"rehearsal-{n}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        trace = await follow(await _find_locust(proc.pid, 300), report)
        try:
            code = await asyncio.wait_for(proc.wait(), seconds + 600)
        finally:
            await trace.stop()
    except BaseException:
        await _stop(proc, 60)
        raise
    finally:
        await forget_prefix(servers, service.prefix)
    summary_path = report / "summary.json"
    if not summary_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the rehearsal exited with {code} and wrote no report:\n{tail}")
    summary = json.loads(summary_path.read_text())
    start_epoch = float(summary["run"]["start_epoch"])
    per_second: dict[float, int] = {}
    with (report / "timeline.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            per_second[start_epoch + int(row["second"])] = int(row["requests"] or 0)
    validity = summary["validity"]
    notes = [
        f"midnight_surge at {peak_rps:g} arrivals/s peak, {seconds:g} s",
        f"rehearsal exit {code} ({summary.get('exit_meaning', '?')})",
    ]
    if not validity["valid"]:
        # The first clause of each reason ("24.7% of arrivals were dropped (bound 5%)").
        notes.append("rehearsal INVALID: " + "; ".join(r.split(":")[0] for r in validity["reasons"]))
    return Rehearsed(per_second, code, bool(validity["valid"]), tuple(notes)), trace


async def _cpu_trace(pid: int, _report: Path) -> CpuTrace:
    return CpuTrace(pid).start()


async def _surge(servers: Servers, settings: BenchSettings, workdir: Path, n: int) -> _Round:
    """One rehearsal; the figure of its Locust process."""
    run, trace = await rehearse(
        servers, settings.surge_peak_rps, settings.surge_seconds, workdir, n, _cpu_trace
    )
    assert isinstance(trace, CpuTrace)
    return _figure(
        SURGE,
        trace,
        run.per_second,
        errors=1 if run.code == _INVARIANT_VIOLATED else 0,
        invalid_rounds=0 if run.valid else 1,
        notes=run.notes,
    )


async def run_plain(
    url: str,
    rate: float,
    seconds: float,
    workdir: Path,
    n: int,
    follow: Callable[[int, Path], Awaitable[Trace]],
    *,
    wrapper: Sequence[str] = (),
) -> tuple[dict[float, int], Trace]:
    """The plain user (run under ``wrapper``) paced to ``rate`` requests/s for ``seconds``:
    its requests completed per second (epoch -> count, Locust's own statistics) and what
    ``follow(pid, workdir)`` traced of it."""
    counts = workdir / f"plain-{n}.json"
    env = {
        **os.environ,
        "FLASHSALE_BENCH_PLAIN_RATE": f"{rate:.3f}",
        "FLASHSALE_BENCH_PLAIN_USERS": str(PLAIN_USERS),
        "FLASHSALE_BENCH_COUNTS": str(counts),
    }
    command = [
        *wrapper,
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "benchmarks" / "plain_locustfile.py"),
        "--headless",
        "--host",
        url,
        "-u",
        str(PLAIN_USERS),
        "-r",
        str(PLAIN_USERS),
        "-t",
        f"{max(3, round(seconds))}s",
        "--stop-timeout",
        "1",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    log_path = workdir / f"plain-{n}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        trace = await follow(await _find_locust(proc.pid, 300), workdir)
        try:
            code = await asyncio.wait_for(proc.wait(), seconds + 600)
        finally:
            await trace.stop()
    except BaseException:
        await _stop(proc, 10)
        raise
    if not counts.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the plain Locust run exited with {code} and counted nothing:\n{tail}")
    return {float(t): int(c) for t, c in json.loads(counts.read_text()).items()}, trace


async def _plain(url: str, rate: float, seconds: float, workdir: Path, n: int) -> _Round:
    """The plain user paced to ``rate`` requests/s for ``seconds``; the figure of its Locust."""
    per_second, trace = await run_plain(url, rate, seconds, workdir, n, _cpu_trace)
    assert isinstance(trace, CpuTrace)
    return _figure(
        BASELINE,
        trace,
        per_second,
        clients=PLAIN_USERS,
        notes=(f"{PLAIN_USERS} users paced to the surge's mean request rate",),
    )


async def measure_generators(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """Both figures, median of ``settings.generator_rounds`` rounds; the surge's ratio is
    its CPU per request over the baseline's, per round."""
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-generator-bench-"))
    surges: list[Figure] = []
    plains: list[Figure] = []
    try:
        async with hello_app(workdir) as hello:
            for n in range(settings.generator_rounds):
                surge = await _surge(servers, settings, workdir, n)
                plain = await _plain(hello.url, surge.figure.rate, surge.window_s, workdir, n)
                mine, base = surge.figure.generator_us_per_op, plain.figure.generator_us_per_op
                surges.append(
                    replace(
                        surge.figure,
                        ratio=mine / base if mine is not None and base else None,
                        ratio_to="plain, CPU per request",
                    )
                )
                plains.append(plain.figure)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [combine(plains), combine(surges)]


if __name__ == "__main__":
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
