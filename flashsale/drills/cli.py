"""The drill harness's commands: ``flashsale rehearse`` (the main job: replay a Double 11
opening and judge it), ``flashsale capacity`` (the highest arrival rate within the SLO) and
``flashsale drill`` (break a part of the stack mid-surge and prove nothing was lost).

Exit codes: the table in :mod:`flashsale.exit_codes` (a failed drill is an invariant
violated, 2; bad flags are 64).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flashsale import exit_codes
from flashsale.cli import add_store_options, store_overrides
from flashsale.console import fail, redact, write_json
from flashsale.redis_client import cluster_node_as_one_server, connect, reaches_cluster_node
from flashsale.settings import Settings, SettingsError, check_database_url, check_redis_url

__all__ = ["register"]


def register(sub: Any) -> None:
    _register_rehearse(sub)
    _register_drill(sub)


def _register_rehearse(sub: Any) -> None:
    r = sub.add_parser(
        "rehearse",
        help="replay a Double 11 opening against a real service and judge it (start here)",
        description=(
            "Start Redis and PostgreSQL (embedded, unless FLASHSALE_REDIS_URL and FLASHSALE_DATABASE_URL name "
            "servers), the order service and the worker; replay the midnight surge with Locust (open-model "
            "arrivals, a T0 rendezvous, browsers, buyers, abandoners, bots and retry storms); then check that "
            "nothing was oversold, lost or duplicated and how fast it went. About two minutes on a 2-core machine. "
            "Ctrl-C stops everything cleanly (the report is still written). Exit code: 0 all good, 1 SLO missed, "
            "2 invariant violated, 3 run invalid (the load generator could not keep up), 130 interrupted."
        ),
        epilog="Extra Locust drill options go after '--', e.g. -- --personas 'buyer=1,bot=1'. "
        "See docs/rehearsal.md for what the report shows.",
    )
    _common(r, peak=150.0)
    r.add_argument(
        "--shape",
        default="midnight_surge",
        choices=sorted(_SHAPE_SECONDS),
        help="arrival shape (default midnight_surge)",
    )
    r.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds of arrivals (sets --time-scale; midnight_surge is 75 s at scale 1)",
    )
    r.add_argument(
        "--time-scale", type=float, default=1.0, help="stretch every phase of the shape (default 1)"
    )
    room = r.add_argument_group(
        "waiting room",
        "put the sale behind the stock-aware waiting room (docs/waiting-room.md): buyers join and poll it, "
        "bots try to skip it, and the oracle checks its shuffle, its order, its tickets, its admissions and "
        "how soon waiting buyers heard of a sell-out",
    )
    room.add_argument("--waiting-room", action="store_true", help="put the drill's sale behind the room")
    room.add_argument(
        "--room-rate", type=float, default=50.0, metavar="N", help="buyers admitted per second (default 50)"
    )
    room.add_argument(
        "--room-oversubscribe",
        type=float,
        default=1.0,
        metavar="F",
        help="admit up to F buyers per unit available (default 1: never more buyers than units)",
    )
    room.add_argument(
        "--room-told-within",
        type=float,
        default=1.0,
        metavar="S",
        help="every waiting buyer of a sold-out SKU must hear it within S seconds (default 1)",
    )
    r.set_defaults(func=_rehearse)

    c = sub.add_parser(
        "capacity",
        help="find the highest arrival rate this machine sustains within the SLO, and plan for a peak",
        description=(
            "Run the capacity_step shape (stairs of rising arrival rate up to --peak-rps) against a real service, "
            "find the highest step within the SLO (corrected p99, error ratio, achieved arrivals), and print the "
            "rate per service process and a plan: how many service processes and Redis shards a peak would need "
            "(the published 50,000 orders/s of 2013 and 583,000 orders/s of 2020 by default), with the "
            "assumptions stated."
        ),
    )
    _common(c, peak=600.0)
    c.add_argument("--steps", type=int, default=6, help="stairs up to --peak-rps (default 6)")
    c.add_argument("--step-s", type=float, default=15.0, help="seconds per stair (default 15)")
    c.add_argument(
        "--p99-ms", type=float, default=1000.0, help="corrected p99 a step must stay under (default 1000)"
    )
    c.add_argument(
        "--plan-for",
        type=float,
        action="append",
        default=None,
        metavar="ORDERS_PER_S",
        help="peak orders/s to plan for (repeatable; default the published 50,000 and 583,000)",
    )
    c.set_defaults(func=_capacity)


def _register_drill(sub: Any) -> None:
    try:
        from flashsale.drills.drill import FAULTS
    except ImportError:  # the base install: registered all the same; running it names the extra
        FAULTS = {}

    d = sub.add_parser(
        "drill",
        help="break a part of the stack mid-surge and prove nothing was oversold, lost or doubled",
        description=(
            "Run a short surge against the real stack (embedded Redis with AOF and PostgreSQL, "
            "or the servers named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL), with "
            "`flashsale serve --workers 2` and `flashsale worker` as subprocesses, inject a fault "
            "a third of the way in, repair it, let holds lapse, then check every request's "
            "outcome against PostgreSQL and Redis and run the audit. Exits 2 if any check fails (see README, Exit codes)."
        ),
        epilog="faults:\n"
        + ("\n".join(f"  {name:<16} {what}" for name, what in FAULTS.items()) or "  (listed once installed)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--fault", choices=sorted(FAULTS) or None, metavar="NAME", help="the fault to inject (see below)"
    )
    which.add_argument("--all", action="store_true", help="every fault in turn, one table at the end")
    d.add_argument(
        "--duration",
        type=float,
        default=9.0,
        metavar="S",
        help="seconds of surge per drill (default 9, the CI size)",
    )
    d.add_argument("--concurrency", type=int, default=12, help="buyers sending at once (default 12)")
    d.add_argument("--seed", type=int, help="random seed for the buyers' choices")
    d.add_argument(
        "--json", type=Path, metavar="FILE", help="write the report(s) as JSON to FILE ('-' for stdout)"
    )
    d.add_argument(
        "--appendfsync",
        choices=("everysec", "always"),
        default="everysec",
        help="the embedded Redis's AOF fsync policy (default everysec; see docs/drills.md for what each loses)",
    )
    d.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep servers' data, histories and logs here (default: a temp dir removed at the end)",
    )
    add_store_options(d)
    d.set_defaults(func=_drill)


# ----------------------------------------------------------------------- drill
def _drill(args: argparse.Namespace) -> int:
    from flashsale.drills.drill import FAULTS, DrillSettings, DrillStack, run_drill, summary_table
    from flashsale.runtime.embedded import ServerError

    if not args.duration >= 3 or args.concurrency < 1:
        return fail("--duration must be at least 3 s and --concurrency at least 1")
    stores = store_overrides(args, os.environ)
    try:
        _check_store_urls(stores)
    except SettingsError as exc:
        return fail(f"drill: {exc}")
    settings = DrillSettings(duration_s=args.duration, concurrency=args.concurrency, seed=args.seed)
    faults = list(FAULTS) if args.all else [args.fault]
    quiet = str(args.json) == "-"
    out = sys.stderr if quiet else sys.stdout
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack = DrillStack(
            redis_url=stores.get("FLASHSALE_REDIS_URL"),
            database_url=stores.get("FLASHSALE_DATABASE_URL"),
            workdir=args.workdir,
            appendfsync=args.appendfsync,
        ).start()
    except ServerError as exc:
        return fail(f"cannot start the drill's servers: {exc}", exit_codes.NOT_READY)
    reports = []
    try:
        for fault in faults:
            print(
                f"drill {fault}: {settings.duration_s:.0f} s surge, fault at {settings.fault_start:.1f} s "
                f"for {settings.fault_length:.1f} s …",
                file=out,
                flush=True,
            )
            report = run_drill(stack, fault, settings)
            reports.append(report)
            print(report.text(), file=out, flush=True)
    finally:
        stack.stop()
    if len(reports) > 1:
        print("\n" + summary_table(reports), file=out)
    write_json(args.json, [r.to_json() for r in reports] if args.all else reports[0].to_json())
    return exit_codes.OK if all(r.passed for r in reports) else exit_codes.INVARIANT_VIOLATED


#: Seconds of arrivals of each shape at time scale 1 (see loadtests.shapes).
_SHAPE_SECONDS = {"midnight_surge": 75.0, "double11_day": 240.0, "capacity_step": 100.0, "soak": 600.0}


def _common(p: argparse.ArgumentParser, *, peak: float) -> None:
    p.add_argument(
        "--peak-rps", type=float, default=peak, help=f"peak arrivals per second (default {peak:g})"
    )
    p.add_argument(
        "--service-workers", type=int, default=2, help="service processes (default 2: one per core)"
    )
    p.add_argument(
        "--locust-workers",
        type=int,
        default=0,
        metavar="N",
        help="run Locust distributed: a master and N worker processes (default 0: one local process)",
    )
    p.add_argument(
        "--report-dir", type=Path, default=None, help="report folder (default reports/rehearsal-<time>)"
    )
    p.add_argument("--slo", default=None, help="';'-separated k6-style thresholds, e.g. 'latency:p(99)<300'")
    p.add_argument("--hold-ttl", type=float, default=None, metavar="S", help="hold TTL of the drill's sale")
    p.add_argument(
        "--audit-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds the audit may wait for the queue to drain (default 60)",
    )
    p.add_argument(
        "--locust-wrapper",
        type=shlex.split,
        default=[],
        metavar="CMD",
        help="run each Locust process under this command, its own command line appended: "
        "the load generator profiled in the run it drives (e.g. 'py-spy record -o locust.svg --')",
    )
    add_store_options(p)
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from flashsale.drills.rehearse import RehearsalSettings

    return RehearsalSettings(
        peak_rps=args.peak_rps,
        service_workers=args.service_workers,
        locust_workers=args.locust_workers,
        report_dir=args.report_dir,
        slo=args.slo,
        hold_ttl_s=args.hold_ttl,
        audit_wait_s=args.audit_wait,
        locust_args=tuple(_locust_args(args)),
        locust_wrapper=tuple(args.locust_wrapper),
        env=store_overrides(args, os.environ),
        **overrides,
    )


def _locust_args(args: argparse.Namespace) -> list[str]:
    extra = list(args.locust_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


# ------------------------------------------------- checked before anything starts
def _check_store_urls(stores: dict[str, str]) -> None:
    if "FLASHSALE_REDIS_URL" in stores:
        check_redis_url(stores["FLASHSALE_REDIS_URL"])
    if "FLASHSALE_DATABASE_URL" in stores:
        check_database_url(stores["FLASHSALE_DATABASE_URL"])
    _refuse_cluster_node(stores)


def _refuse_cluster_node(stores: dict[str, str]) -> None:
    """SettingsError with the line every command stops with when ``FLASHSALE_REDIS_URL``
    names a node of a Redis Cluster and ``FLASHSALE_REDIS_CLUSTER`` is not set: the service
    and the worker a drill starts would each stop on it, after the drill had started them
    and made its folder. A Redis that does not answer passes: the run says so itself."""
    url = stores.get("FLASHSALE_REDIS_URL")
    if not url or Settings.from_env({**os.environ, **stores}).redis_cluster:
        return  # embedded (one server the drill starts itself), or a cluster client's to route

    async def is_node() -> bool:
        from redis.exceptions import RedisError

        redis = connect(url, timeout_s=2.0, resends=0)
        try:
            return await asyncio.wait_for(reaches_cluster_node(redis), 5.0)
        except (RedisError, OSError, TimeoutError):
            return False
        finally:
            await redis.aclose()

    if asyncio.run(is_node()):
        raise SettingsError(cluster_node_as_one_server(redact(url)))


def _require(*modules: str) -> None:
    """ModuleNotFoundError (the CLI root names the extra) for the first module not
    installed — found without importing it: Locust patches the process it is imported in."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _drill_problem(
    args: argparse.Namespace, numbers: dict[str, tuple[float | None, float, bool]]
) -> str | None:
    """What is wrong with a rehearsal's or a capacity run's flags, found before any server
    starts (a bad threshold used to start Redis, PostgreSQL and the service first, then exit
    "run invalid" with the reason only in locust.log). ``numbers``: flag → (value, bound,
    whether the bound itself is allowed)."""
    from loadtests.latency import PERCENTILES
    from loadtests.slo import parse_slo

    for flag, (value, bound, inclusive) in numbers.items():
        if value is None:
            continue
        if not math.isfinite(value) or value < bound or (value == bound and not inclusive):
            return f"{flag} must be {'at least' if inclusive else 'above'} {bound:g}, not {value:g}"
    if args.slo is not None:
        try:
            parse_slo(args.slo, percentiles=PERCENTILES)
        except ValueError as exc:
            return f"--slo: {exc}"
        if not args.slo.strip():
            return "--slo is empty: leave it out for the default thresholds"
    if args.report_dir is not None and args.report_dir.exists() and not args.report_dir.is_dir():
        return f"--report-dir {args.report_dir} is a file, not a folder"
    if args.locust_wrapper and shutil.which(args.locust_wrapper[0]) is None:
        return f"--locust-wrapper: {args.locust_wrapper[0]!r} is not a command on PATH"
    try:
        _check_store_urls(store_overrides(args, os.environ))
    except SettingsError as exc:
        return str(exc)
    return _locust_problem(_locust_args(args))


def _locust_problem(extra: Sequence[str]) -> str | None:
    """Options passed through to the drill (after ``--``), checked by Locust's own parser with
    the drill's options (``--list`` parses everything, runs nothing)."""
    if not extra:
        return None
    from flashsale.drills.rehearse import surge_locustfile

    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(surge_locustfile()), "--headless", *extra, "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode == 0:
        return None
    errors = [ln for ln in done.stderr.splitlines() if "error:" in ln] or done.stderr.strip().splitlines()[
        -1:
    ]
    return (
        f"after '--': {errors[-1].split('error:', 1)[-1].strip() if errors else 'Locust refused the options'}"
    )


def _rehearse(args: argparse.Namespace) -> int:
    from flashsale.drills.rehearse import Rehearsal

    _require("locust", "aiohttp", "asyncpg")
    problem = _drill_problem(
        args,
        {
            **_common_numbers(args),
            "--duration": (args.duration, 0, False),
            "--time-scale": (args.time_scale, 0, False),
        },
    )
    if problem:
        return fail(f"rehearse: {problem}")
    time_scale = args.time_scale
    if args.duration is not None:
        time_scale = args.duration / _SHAPE_SECONDS[args.shape]
    if not (
        0 < args.room_rate <= 100_000 and 0 <= args.room_oversubscribe <= 100 and args.room_told_within > 0
    ):
        return fail(
            "rehearse: --room-rate must be in (0, 100000], --room-oversubscribe in [0, 100], --room-told-within > 0"
        )
    room = {
        "waiting_room": args.waiting_room,
        "room_rate": args.room_rate,
        "room_oversubscribe": args.room_oversubscribe,
        "room_told_within_s": args.room_told_within,
    }
    return Rehearsal(_settings(args, shape=args.shape, time_scale=time_scale, **room)).run()


def _common_numbers(args: argparse.Namespace) -> dict[str, tuple[float | None, float, bool]]:
    return {
        "--peak-rps": (args.peak_rps, 0, False),
        "--service-workers": (args.service_workers, 1, True),
        "--locust-workers": (args.locust_workers, 0, True),
        "--hold-ttl": (args.hold_ttl, 0, False),
        "--audit-wait": (args.audit_wait, 0, True),
    }


def _capacity(args: argparse.Namespace) -> int:
    from flashsale.drills.rehearse import Rehearsal
    from loadtests.capacity import PUBLISHED_PEAKS, CapacityLimits, plan_for, read_steps, sustained

    _require("locust", "aiohttp", "asyncpg")
    numbers = {
        **_common_numbers(args),
        "--steps": (args.steps, 1, True),
        "--step-s": (args.step_s, 0, False),
        "--p99-ms": (args.p99_ms, 0, False),
        "--plan-for": (min(args.plan_for) if args.plan_for else None, 0, False),
    }
    problem = _drill_problem(args, numbers)
    if problem:
        return fail(f"capacity: {problem}")
    settings = _settings(args, shape="capacity_step", time_scale=args.step_s / 20.0)  # 20 s stairs at scale 1
    settings = replace(settings, locust_args=(*settings.locust_args, "--steps", str(args.steps)))
    rehearsal = Rehearsal(settings)
    code = rehearsal.run()
    summary_path = rehearsal.report_dir / "summary.json"
    if not summary_path.exists():
        return code
    summary = json.loads(summary_path.read_text())
    steps = read_steps(summary, CapacityLimits(p99_corrected_ms=args.p99_ms))
    print("\ncapacity steps (arrivals/s; orders/s counts every order request, sold out or not)")
    print(f"  {'step':<22}{'target/s':>9}{'sent/s':>8}{'orders/s':>9}{'p99 corr':>10}{'errors':>8}  verdict")
    for s in steps:
        print(
            f"  {s.name:<22}{s.target_rps:>9.0f}{s.sent_rps:>8.0f}{s.orders_per_s:>9.0f}{s.p99_corrected_ms:>9.0f}ms"
            f"{s.error_ratio:>8.1%}  {'within SLO' if s.within_slo else s.why_not}"
        )
    best = sustained(steps)
    if best is None:
        print("no step stayed within the SLO: lower --peak-rps")
        return code
    per_process = best.orders_per_s / settings.service_workers
    print(
        f"\nsustained within the SLO: {best.sent_rps:.0f} arrivals/s, {best.orders_per_s:.0f} orders/s with "
        f"{settings.service_workers} service process(es): {per_process:.0f} orders/s per process "
        f"(measured here, load generator and databases on the same cores)"
    )
    if best is steps[-1]:
        print("  (the top step was still within the SLO: raise --peak-rps to find the limit)")
    peaks = args.plan_for or list(PUBLISHED_PEAKS.values())
    names = {v: k for k, v in PUBLISHED_PEAKS.items()}
    for peak in peaks:
        plan = plan_for(peak, per_process)
        label = f" (published Double 11 peak, {names[peak]})" if peak in names else ""
        print(
            f"plan for {peak:,.0f} orders/s{label}: {plan.service_processes:,} service processes, "
            f"{plan.redis_shards} Redis shards"
        )
    print("assumptions: " + "; ".join(plan_for(1.0, max(per_process, 1e-9)).assumptions))
    return code
