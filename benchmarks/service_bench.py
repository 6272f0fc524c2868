"""The order service's ``POST /api/orders`` beside the HTTP ceiling, with the same load
generator, in the same run.

Two servers, each one process started the way it is deployed, each driven by ``wrk``
(Debian package ``wrk``; one thread, 64 connections, a Lua script that POSTs a fresh
request id per request and takes buyers in turn from a pool of 20,000 tokens so no buyer
trips the per-buyer rate limit):

* the HTTP ceiling: ``benchmarks.hello_app``, a trivial aiohttp endpoint that parses the
  same JSON body and answers 201 (uvloop, one process, no access log);
* the service: ``flashsale serve --workers 1`` against the run's Redis and PostgreSQL,
  one open sale with one SKU stocked deep enough never to sell out, so every request is
  a real reservation (a hold, its idempotency record, its event).

Both servers stay up for the whole benchmark and are driven in turn, round after round
(``--rounds``, default 5, each ``--seconds`` long): each figure is the median round with
its spread, and the ratio is the median of the per-round ratios (issue 15: one 5-second
round read 0.19x where quiet runs read 0.33x). The server columns give each process's CPU
share and its CPU µs per request (issue 15's ~280 µs per order against ~100 µs).

Two notes say why a ratio is what it is. The service's CPU per order beside the trivial
endpoint's per request (a ratio of costs: the goal itself stays on throughput). And, for
each server, where its process's wall time went (Linux schedstat): on a core, waiting for
a core (the machine's neighbours, Redis and wrk share the cores), or idle — nothing to run
because its requests were all at Redis or at wrk. Neither server runs beside an order
writer: no PostgreSQL writing competes for the cores during these rounds.

Figures count only 201 answers. ``wrk`` runs as a child process, and its CPU share is
its own CPU time (``wait4``) over its wall time: above ~90 % the figure measures ``wrk``.
After each of the service's rounds, the holds Redis gained are compared with the 201s
``wrk`` saw: fewer holds than acknowledged orders would be a lost order, and fails the run.

Run alone: ``python -m benchmarks.service_bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .harness import PidTreeCpu, run_queue_seconds
from .report import Figure
from .rounds import combine
from .served import HOT_SKU, OrderService, Served, forget_prefix, hello_app, order_service
from .servers import Servers
from .settings import BenchSettings

__all__ = [
    "WRK_SCRIPT",
    "ServerTime",
    "WrkRun",
    "cost_ratio_note",
    "measure_service",
    "run_wrk",
    "server_time_note",
]

SECTION = "service"
CEILING = "trivial aiohttp endpoint (HTTP ceiling)"
SERVICE = "POST /api/orders (the service)"
CONNECTIONS = 64
BUYERS = 20_000

#: POST /api/orders with a fresh request id each time; buyers taken in turn from a token
#: file (one per line). ``done`` prints the summary as one JSON line for the parent.
WRK_SCRIPT = r"""
local tokens, prefix, sku = {}, "w", "hot"
local n, i = 0, 0

function init(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  prefix, sku = args[2], args[3]
end

function request()
  n = n + 1
  i = i % #tokens + 1
  local body = '{"request_id":"' .. prefix .. n .. '","sku":"' .. sku .. '","qty":1}'
  return wrk.format("POST", "/api/orders",
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, as it reported itself, plus its own CPU time."""

    requests: int
    non_2xx: int
    socket_errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: float

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def rate(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def generator_cpu(self) -> float:
        return self.cpu_s / self.duration_s if self.duration_s > 0 else 0.0


def run_wrk(url: str, script: Path, *, seconds: int, connections: int, args: list[str]) -> WrkRun:
    """Run wrk to completion (blocking). Its CPU time comes from ``wait4`` on its pid."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk)")
    command = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode("utf-8", "replace")
    err = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {(err or out).strip()[-500:]}")
    report = json.loads(line[4:])
    return WrkRun(
        requests=report["requests"],
        non_2xx=report["status"],
        socket_errors=report["connect"] + report["read"] + report["write"] + report["timeout"],
        duration_s=report["duration_us"] / 1e6,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


def _args(tokens: Path, phase: str) -> list[str]:
    """The script's arguments: token file, request-id prefix (unique per phase, or a run
    would replay an earlier run's request ids), SKU."""
    return [str(tokens), f"{phase}-", HOT_SKU]


@dataclass(frozen=True)
class ServerTime:
    """Where a server process's wall time went over one round, as shares of it."""

    #: On a core (its CPU time).
    cpu: float
    #: Runnable, but waiting for a core (None where schedstat cannot be read).
    waiting: float | None

    @property
    def idle(self) -> float | None:
        """Nothing to run: its requests were at Redis or at the load generator."""
        return None if self.waiting is None else max(0.0, 1.0 - self.cpu - self.waiting)


def server_time_note(rounds: Sequence[ServerTime]) -> str:
    """The medians of :class:`ServerTime` over the rounds, as one note."""
    text = f"server process: on a core {statistics.median(r.cpu for r in rounds):.0%}"
    known = [(r.waiting, r.idle) for r in rounds if r.waiting is not None and r.idle is not None]
    if not known:
        return text
    waiting = statistics.median(w for w, _ in known)
    idle = statistics.median(i for _, i in known)
    return (
        f"{text}, waiting for a core {waiting:.0%}, idle {idle:.0%} "
        "(medians of the rounds; idle: nothing to run, waiting on Redis or on the generator)"
    )


def cost_ratio_note(ceilings: Sequence[Figure], orders: Sequence[Figure]) -> str | None:
    """The trivial endpoint's CPU µs per request over the service's per order, round by
    round (median and spread), or None when a server's CPU could not be read."""
    ratios = []
    for ceiling, order in zip(ceilings, orders, strict=True):
        trivial, service = ceiling.server_us_per_op, order.server_us_per_op
        if trivial is None or service is None or not service > 0:
            return None
        ratios.append(trivial / service)
    return (
        f"CPU per order vs the trivial endpoint's per request: {statistics.median(ratios):.2f}x "
        f"[{min(ratios):.2f}-{max(ratios):.2f}] "
        "(trivial µs per request / service µs per order; the goal judges throughput)"
    )


async def _drive(
    server: Served, script: Path, seconds: float, args: list[str]
) -> tuple[WrkRun, float, ServerTime]:
    """One timed wrk run, with the server's CPU share over it and where its time went."""
    meter = PidTreeCpu(server.pid)
    before, queued = await meter.seconds(), run_queue_seconds(server.pid)
    started = time.perf_counter()
    run = await asyncio.to_thread(
        run_wrk, server.url, script, seconds=max(1, round(seconds)), connections=CONNECTIONS, args=args
    )
    wall = time.perf_counter() - started
    after, queued_after = await meter.seconds(), run_queue_seconds(server.pid)
    cpu = (after - before) / wall if before is not None and after is not None else float("nan")
    waiting = (queued_after - queued) / wall if queued is not None and queued_after is not None else None
    return run, cpu, ServerTime(cpu, waiting)


def _figure(name: str, run: WrkRun, server_cpu: float, unit: str) -> Figure:
    notes = ["wrk, 1 thread"]
    if run.non_2xx:
        notes.append(f"{run.non_2xx:,} answers were not 2xx (not counted)")
    if run.socket_errors:
        notes.append(f"{run.socket_errors:,} socket errors")
    return Figure(
        section=SECTION,
        name=name,
        rate=run.rate,
        unit=unit,
        clients=CONNECTIONS,
        generator_cpu=run.generator_cpu,
        server_cpu=server_cpu,
        p50_ms=run.p50_ms,
        p99_ms=run.p99_ms,
        granted=run.ok,
        wall_s=run.duration_s,
        notes=tuple(notes),
    )


async def measure_service(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """Both figures, median of ``settings.rounds`` interleaved rounds; the service's ratio
    to the ceiling is the median of the per-round ratios."""
    service = OrderService.for_run(servers, "svc")
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-service-bench-"))
    ceilings: list[Figure] = []
    orders: list[Figure] = []
    times: dict[str, list[ServerTime]] = {CEILING: [], SERVICE: []}
    acknowledged = holds = 0
    try:
        script = workdir / "orders.lua"
        script.write_text(WRK_SCRIPT)
        tokens = workdir / "tokens.txt"
        async with hello_app(workdir) as hello, order_service(service, workdir) as served:
            await service.open_sale(served.url)
            tokens.write_text("\n".join(await service.buyer_tokens(served.url, "b", BUYERS)) + "\n")
            # One second of load on each first: connections, caches and the script cache are warm.
            for server in (hello, served):
                await asyncio.to_thread(
                    run_wrk,
                    server.url,
                    script,
                    seconds=1,
                    connections=CONNECTIONS,
                    args=_args(tokens, "warm"),
                )
            for n in range(settings.rounds):
                run, cpu, spent = await _drive(hello, script, settings.seconds, _args(tokens, f"h{n}"))
                ceilings.append(_figure(CEILING, run, cpu, "requests/s"))
                times[CEILING].append(spent)
                held_before = await service.held(served.url)
                run, cpu, spent = await _drive(served, script, settings.seconds, _args(tokens, f"s{n}"))
                times[SERVICE].append(spent)
                held = await service.held(served.url) - held_before
                acknowledged, holds = acknowledged + run.ok, holds + held
                orders.append(_service_round(run, cpu, held, ceilings[-1]))
    finally:
        await forget_prefix(servers, service.prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    costs = cost_ratio_note(ceilings, orders)
    return [
        combine(ceilings, notes=[server_time_note(times[CEILING])]),
        combine(
            orders,
            notes=[
                f"{acknowledged:,} orders acknowledged, {holds:,} holds made",
                *([costs] if costs else []),
                server_time_note(times[SERVICE]),
            ],
        ),
    ]


def _service_round(run: WrkRun, cpu: float, held: int, ceiling: Figure) -> Figure:
    """One round of the service, checked against Redis: every 201 wrk saw is a hold, and
    at most the requests still in flight when wrk stopped were held without being counted."""
    figure = _figure(SERVICE, run, cpu, "orders/s")
    errors, notes = 0, list(figure.notes)
    if not run.ok <= held <= run.ok + CONNECTIONS:
        errors = 1
        notes.append(
            f"MISMATCH: {run.ok:,} orders acknowledged, {held:,} holds: "
            + ("acknowledged orders without a hold (lost)" if held < run.ok else "more holds than requests")
        )
    return replace(
        figure,
        errors=errors,
        notes=tuple(notes),
        ratio=run.rate / ceiling.rate if ceiling.rate > 0 else None,
        ratio_to="HTTP ceiling",
    )


if __name__ == "__main__":
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
