"""``python -m benchmarks``: run every benchmark against one pair of servers, print one
table, write JSON, and fail when a correctness claim broke.

Benchmarks of this package return figures; benchmarks written as their own programs
(``writer_bench``, ``buckets_bench``) run as subprocesses pointed at the same servers, and
their printed tables are shown and kept in the JSON as they printed them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flashsale.runtime.embedded import DATABASE_URL_ENV, REDIS_URL_ENV, EmbeddedStack, ServerError

from . import burst_bench, ceilings, generator_bench, inventory_bench, service_bench, strategies
from .goals import judge, render_goals
from .machine import describe_machine, engine_label, load_average
from .report import GENERATOR_BOUND, Claim, Figure, check_claims, render_table, write_json
from .servers import Servers, open_servers
from .settings import BenchSettings

__all__ = ["BENCHMARKS", "EXTERNAL", "add_arguments", "main", "run"]

Measure = Callable[[Servers, BenchSettings, list[Figure]], Awaitable[list[Figure]]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    measure: Measure


async def _strategies(servers: Servers, settings: BenchSettings, _done: list[Figure]) -> list[Figure]:
    return await strategies.compare(servers, settings)


async def _inventory(servers: Servers, settings: BenchSettings, _done: list[Figure]) -> list[Figure]:
    return await inventory_bench.measure_library(servers, settings)


def engine_figure(done: Sequence[Figure]) -> Figure | None:
    """The engine's steady-state rate: the library bench's coalesced figure, else the
    strategy comparison's engine row."""
    for section, name in (
        (inventory_bench.SECTION, inventory_bench.COALESCED),
        (strategies.SECTION, strategies.EngineHold.name),
    ):
        for f in done:
            if f.section == section and f.name == name:
                return f
    return None


async def _ceilings(servers: Servers, settings: BenchSettings, done: list[Figure]) -> list[Figure]:
    return ceilings.with_engine_share(await ceilings.measure_ceilings(servers, settings), engine_figure(done))


async def _service(servers: Servers, settings: BenchSettings, _done: list[Figure]) -> list[Figure]:
    return await service_bench.measure_service(servers, settings)


async def _burst(servers: Servers, settings: BenchSettings, _done: list[Figure]) -> list[Figure]:
    return await burst_bench.measure_burst(servers, settings)


async def _generator(servers: Servers, settings: BenchSettings, _done: list[Figure]) -> list[Figure]:
    return await generator_bench.measure_generators(servers, settings)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "strategies", "six ways of holding stock, run until sold out: speed and units oversold", _strategies
    ),
    Benchmark(
        "inventory",
        "the inventory library, coalesced and not, beside one raw EVALSHA per reservation",
        _inventory,
    ),
    Benchmark(
        "ceilings", "raw EVALSHA calls/s against the same Redis; the engine as a share of it", _ceilings
    ),
    Benchmark("service", "POST /api/orders beside a trivial aiohttp endpoint, same load generator", _service),
    Benchmark(
        "burst",
        "the opening burst: N buyers on fresh connections order at one instant, service vs trivial endpoint",
        _burst,
    ),
    Benchmark(
        "generator",
        "CPU per request of the rehearsal's Locust process vs a plain FastHttpUser, same request rate",
        _generator,
    ),
)

#: Benchmarks that are programs of their own, run as ``python -m benchmarks.<module>``.
EXTERNAL: dict[str, str] = {
    "writer": "writer_bench",
    "buckets": "buckets_bench",
    "instructions": "instructions_bench",
    "engine-instructions": "engine_instructions",
    "generator-instructions": "generator_instructions",
}


def _available(name: str) -> bool:
    if name in EXTERNAL:
        return importlib.util.find_spec(f"benchmarks.{EXTERNAL[name]}") is not None
    return True


def _all_names() -> list[str]:
    return [b.name for b in BENCHMARKS] + list(EXTERNAL)


_ROOT = Path(__file__).resolve().parent.parent


def _external_args(module: str, settings: BenchSettings, json_path: Path) -> list[str]:
    """Pass on --quick (else --seconds) and --json when the program accepts them (read
    from its --help)."""
    try:
        helptext = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=_ROOT,
        ).stdout
    except subprocess.TimeoutExpired:
        helptext = ""
    args: list[str] = []
    if settings.quick and "--quick" in helptext:
        args.append("--quick")
    elif "--seconds" in helptext:
        args += ["--seconds", f"{settings.seconds:g}"]
    if "--json" in helptext:
        args += ["--json", str(json_path)]
    return args


def _run_external(name: str, module: str, servers: Servers, settings: BenchSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flashsale-bench-") as tmp:
        json_path = Path(tmp) / f"{module}.json"
        args = _external_args(module, settings, json_path)
        env = dict(os.environ, **{REDIS_URL_ENV: servers.redis_url, DATABASE_URL_ENV: servers.database_url})
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=_ROOT,
            timeout=1800,
        )
        report = json.loads(json_path.read_text()) if json_path.exists() else None
    shown = [a for a in args if a != str(json_path)]
    if "--json" in shown:
        shown.remove("--json")
    return {
        "name": name,
        "command": " ".join(["python", "-m", f"benchmarks.{module}", *shown]),
        "exit_code": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "output": done.stdout,
        "report": report,
        "errors": done.stderr[-4000:] if done.returncode else "",
    }


_COLUMNS_EXPLAINED = f"""\
rate /s: units reserved (or calls, requests) per second of wall time; in parentheses when
  the strategy oversold: a wrong answer fast is not a throughput.
p50/p99 ms: latency of one attempt as its client saw it (closed loop: N clients, one attempt
  outstanding each, so queueing inside the system is included). max ms: the slowest; for
  the opening burst, the time from the release of all N orders until the last answer.
oversold: units granted minus units stocked, counted from the clients' answers and checked
  against the store's own counters after the run.
ratio: this figure over the named reference, both measured in this run; with rounds, the
  median of the per-round ratios and [lowest-highest].
gen CPU: CPU time of the process generating the load over wall time (100% = one core);
  above {GENERATOR_BOUND:.0%} it is SATURATED and the figure is what that process can push,
  not what the server can take. In-process benchmarks run the client library in the
  generator, as a service would: there the generator is the application.
gen µs/op, server µs/op: CPU time per operation (reservation, request, call) of the
  generator and of the server: Redis's (INFO cpu), the embedded PostgreSQL's, or the HTTP
  server process's CPU time, over the operations made.
server CPU: that CPU time over wall time (100% = one core).
Figures measured in rounds are medians; their notes give the rounds' lowest and highest."""


def _headline(machine: dict[str, Any], settings: BenchSettings) -> str:
    return (
        f"flashsale benchmarks ({'quick' if settings.quick else 'full'}: {settings.rounds} round(s) of "
        f"{settings.seconds:g} s per figure) on {machine['cpu_model']}, "
        f"{machine['cores']} cores, load average {machine['load_average_at_start']} at start; "
        f"Python {machine['python']} ({machine['event_loop']}), {engine_label(machine)}, "
        f"PostgreSQL {machine['postgresql']['version']} (fsync={machine['postgresql']['fsync']})\n"
        "Absolute figures move with whatever else the machine runs (a shared 2-core machine moves a lot); "
        "ratios measured in one run are what to compare."
    )


def _summary(figures: Sequence[Figure]) -> list[str]:
    lines = []
    for f in figures:
        if f.claim is Claim.MAY_OVERSELL:
            if f.oversold:
                lines.append(
                    f"{f.name}: OVERSOLD {f.oversold} units of {f.stock} with {f.clients} "
                    "concurrent clients: it looked fast because it sold what it did not have."
                )
            else:
                lines.append(f"{f.name}: did not oversell this time; it can, and did in other runs.")
    bound = [f"{f.section}/{f.name}" for f in figures if f.generator_bound]
    if bound:
        lines.append("generator-bound (the load generator saturated a core): " + ", ".join(bound))
    return lines


async def _run(selected: list[str], settings: BenchSettings, json_path: Path | None, event_loop: str) -> int:
    try:
        stack = EmbeddedStack().start()
    except ServerError as exc:
        print(f"benchmarks: cannot start the servers: {exc}", file=sys.stderr)
        return 2
    try:
        servers = open_servers(stack)
        machine = await describe_machine(servers, event_loop=event_loop)
        print(_headline(machine, settings), flush=True)
        figures: list[Figure] = []
        externals: list[dict[str, Any]] = []
        skipped: list[str] = []
        failed: list[str] = []
        for name in selected:
            if not _available(name):
                skipped.append(name)
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            if name in EXTERNAL:
                externals.append(
                    await asyncio.to_thread(_run_external, name, EXTERNAL[name], servers, settings)
                )
                continue
            bench = next(b for b in BENCHMARKS if b.name == name)
            try:
                figures += await bench.measure(servers, settings, figures)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                failed.append(f"{name}: could not run: {type(exc).__name__}: {exc}")
                print(f"!!! {failed[-1]}", file=sys.stderr, flush=True)
        machine["load_average_at_end"] = load_average()
    finally:
        stack.stop()
    problems = failed + check_claims(figures)
    problems += [
        f"{e['name']}: `{e['command']}` exited with {e['exit_code']}" for e in externals if e["exit_code"]
    ]
    if figures:
        print()
        print(render_table(figures))
    print()
    for line in _summary(figures):
        print(line)
    for e in externals:
        print(f"\n{e['name']} (`{e['command']}`, its own table):\n{e['output'].rstrip()}")
        if e["errors"]:
            print(textwrap.indent(e["errors"].rstrip(), "  ! "))
    if skipped:
        print(f"\nnot run (module not there yet): {', '.join(skipped)}")
    goals = judge(figures)
    print("\nIssue 15's goals, judged on this run (printed, never asserted):")
    print(render_goals(goals))
    print("\n" + _COLUMNS_EXPLAINED)
    if problems:
        print("\nPROBLEMS (the run fails):")
        for p in problems:
            print(f"  - {p}")
    if json_path is not None:
        write_json(
            json_path,
            machine=machine,
            settings=settings.as_json(),
            figures=figures,
            extra={"external": externals, "skipped": skipped, "goals": goals},
            problems=problems,
        )
        print(f"\nJSON written to {json_path}")
    return 1 if problems else 0


DESCRIPTION = (
    "Measure, side by side on this machine, the ways of holding stock under a surge and "
    "the ceilings around them. Servers: embedded Redis and PostgreSQL, or the ones named by "
    f"{REDIS_URL_ENV} / {DATABASE_URL_ENV} (nothing there is flushed). Exits 1 when a "
    "strategy broke its correctness claim or the harness's counts disagree with the store. "
    "Run from the repository root; results and how to read them: docs/benchmarks.md."
)


def epilog() -> str:
    names = (
        "\n".join(f"  {b.name:<11} {b.summary}" for b in BENCHMARKS)
        + "\n"
        + "\n".join(
            f"  {name:<11} benchmarks/{module}.py, run as its own program"
            for name, module in EXTERNAL.items()
        )
    )
    return "benchmarks:\n" + names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, shared by ``python -m benchmarks`` and ``flashsale bench``."""
    parser.add_argument(
        "--quick", action="store_true", help="about a second per figure (CI); same code paths"
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write machine, settings and figures here"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this benchmark (repeat or comma-separate for several)",
    )
    parser.add_argument(
        "--clients", type=int, help="concurrent clients in the strategy comparison (default 32)"
    )
    parser.add_argument("--callers", type=int, help="concurrent callers in the inventory bench (default 256)")
    parser.add_argument("--seconds", type=float, help="seconds per figure (default 5, quick 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of the inventory, service and burst benchmarks; figures are medians (default 5, quick 1)",
    )
    parser.add_argument(
        "--generator-rounds",
        type=int,
        help="rounds of the generator comparison, each a whole rehearsal (default 3, quick 1)",
    )
    parser.add_argument("--burst-buyers", type=int, help="buyers of the opening burst (default 1000)")
    parser.add_argument(
        "--surge-peak-rps",
        type=float,
        help="peak arrivals/s of the rehearsal the generator comparison measures (default 400, quick 100)",
    )
    parser.add_argument(
        "--surge-seconds", type=float, help="seconds of arrivals of that rehearsal (default 30, quick 6)"
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the loop the generator runs on (default uvloop, as the service does)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=DESCRIPTION,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` (from :func:`add_arguments`) selects; the exit code."""
    selected = _all_names()
    if args.only:
        selected = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in selected if n not in _all_names()]
        if unknown:
            print(
                f"benchmarks: unknown benchmark {', '.join(unknown)}; choose from {', '.join(_all_names())}",
                file=sys.stderr,
            )
            return 2
    try:
        settings = BenchSettings.from_env(quick=args.quick).with_overrides(
            clients=args.clients,
            callers=args.callers,
            seconds=args.seconds,
            rounds=args.rounds,
            generator_rounds=args.generator_rounds,
            burst_buyers=args.burst_buyers,
            surge_peak_rps=args.surge_peak_rps,
            surge_seconds=args.surge_seconds,
        )
    except ValueError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    loop_factory = None
    event_loop = "asyncio"
    if args.event_loop == "uvloop":
        try:
            import uvloop

            loop_factory, event_loop = uvloop.new_event_loop, f"uvloop {metadata.version('uvloop')}"
        except ImportError:
            event_loop = "asyncio (uvloop not installed)"
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run(selected, settings, args.json, event_loop))
