"""``flashsale drill`` and ``flashsale recover``: the fault drills and the recovery after a
Redis data loss. Also runnable as ``python -m flashsale.drill_cli <command>``.

Exit codes: 0 passed (recover: done, or nothing to do), 1 a drill failed its checks
(recover: data still missing, or ``--check`` found a loss), 2 bad settings or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "register"]


def register(sub: Any) -> None:
    from .drill import FAULTS

    d = sub.add_parser(
        "drill",
        help="break a part of the stack mid-surge and prove nothing was oversold, lost or doubled",
        description=(
            "Run a short surge against the real stack (embedded Redis with AOF and PostgreSQL, "
            "or the servers named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL), with "
            "`flashsale serve --workers 2` and `flashsale worker` as subprocesses, inject a fault "
            "a third of the way in, repair it, let holds lapse, then check every request's "
            "outcome against PostgreSQL and Redis and run the audit. Exits 1 if any check fails."
        ),
        epilog="faults:\n" + "\n".join(f"  {name:<16} {what}" for name, what in FAULTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--fault", choices=sorted(FAULTS), metavar="NAME", help="the fault to inject (see below)"
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
    d.set_defaults(func=_drill)

    r = sub.add_parser(
        "recover",
        help="rebuild sales in Redis from PostgreSQL after Redis lost data, then reopen them",
        description=(
            "Compare Redis with what PostgreSQL has committed (lineage marker, hold records, "
            "sold counters, stream ids). For every sale found lost, or fenced, or named: fence "
            "it, write whatever its stream still holds to PostgreSQL, rebuild its stock, holds, "
            "idempotency records, per-user counts and deadlines from PostgreSQL, and reopen it. "
            "Settings: FLASHSALE_REDIS_URL, FLASHSALE_DATABASE_URL, FLASHSALE_KEY_PREFIX. Safe to "
            "run again; run it with the worker running or stopped."
        ),
    )
    r.add_argument(
        "--sale", action="append", dest="sales", metavar="SALE", help="recover this sale (repeatable)"
    )
    r.add_argument("--force", action="store_true", help="rebuild every recorded sale, even those that verify")
    r.add_argument(
        "--check", action="store_true", help="only compare and report; change nothing (exit 1 on a loss)"
    )
    r.add_argument("--forget", metavar="SALE", help="tell the fence SALE was removed from Redis on purpose")
    r.add_argument(
        "--json", type=Path, metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)"
    )
    r.set_defaults(func=_recover)


def _fail(message: str, code: int = 2) -> int:
    print(f"flashsale: {message}", file=sys.stderr)
    return code


def _write_json(target: Path | None, body: Any) -> None:
    if target is None:
        return
    text = json.dumps(body, indent=2, default=str)
    if str(target) == "-":
        print(text)
    else:
        target.write_text(text + "\n")


# ----------------------------------------------------------------------- drill
def _drill(args: argparse.Namespace) -> int:
    from .drill import FAULTS, DrillSettings, DrillStack, run_drill, summary_table
    from .embedded import ServerError

    if args.duration < 3 or args.concurrency < 1:
        return _fail("--duration must be at least 3 s and --concurrency at least 1")
    settings = DrillSettings(duration_s=args.duration, concurrency=args.concurrency, seed=args.seed)
    faults = list(FAULTS) if args.all else [args.fault]
    quiet = str(args.json) == "-"
    out = sys.stderr if quiet else sys.stdout
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack = DrillStack(
            redis_url=os.environ.get("FLASHSALE_REDIS_URL") or None,
            database_url=os.environ.get("FLASHSALE_DATABASE_URL") or None,
            workdir=args.workdir,
            appendfsync=args.appendfsync,
        ).start()
    except ServerError as exc:
        return _fail(f"cannot start the drill's servers: {exc}")
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
    _write_json(args.json, [r.to_json() for r in reports] if args.all else reports[0].to_json())
    return 0 if all(r.passed for r in reports) else 1


# --------------------------------------------------------------------- recover
def _recover(args: argparse.Namespace) -> int:
    from .settings import Settings

    settings = Settings.from_env()
    if not os.environ.get("FLASHSALE_REDIS_URL") or not settings.database_url:
        return _fail(
            "recovery reads PostgreSQL and rewrites Redis: set FLASHSALE_REDIS_URL and FLASHSALE_DATABASE_URL "
            "(and FLASHSALE_KEY_PREFIX if not 'fs')"
        )
    return asyncio.run(_recover_async(settings, args))


async def _recover_async(settings: Any, args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from . import fence, recovery
    from .pgpool import close_pool, create_pool

    redis = Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=30, socket_connect_timeout=5
    )
    try:
        pool = await create_pool(settings.database_url, max_size=2, application_name="flashsale-recover")
    except (OSError, TimeoutError) as exc:
        await redis.aclose()
        return _fail(f"cannot connect to PostgreSQL: {exc}")
    prefix = settings.key_prefix
    try:
        if args.forget:
            done = await recovery.forget(pool, prefix=prefix, sale=args.forget)
            print(
                f"sale {args.forget} forgotten by the fence"
                if done
                else f"the fence has no sale {args.forget!r} recorded"
            )
            return 0 if done else 2
        if args.check:
            verdict = await fence.verify(redis, pool, prefix=prefix)
            body: dict[str, Any] = {
                "ok": verdict.ok,
                "run_id": verdict.run_id,
                "lost": verdict.lost_sales(),
                "losses": [loss.reason for loss in verdict.losses],
                "checked": list(verdict.checked),
            }
            _write_json(args.json, body)
            if str(args.json) != "-":
                print(
                    "Redis agrees with PostgreSQL"
                    if verdict.ok
                    else "\n".join(["Redis lost data:", *body["losses"]])
                )
            return 0 if verdict.ok else 1
        report = await recovery.recover(redis, pool, prefix=prefix, sales=args.sales, force=args.force)
    except fence.FenceUnavailable as exc:
        return _fail(str(exc))
    except recovery.RecoveryError as exc:
        return _fail(str(exc), 1)
    finally:
        await close_pool(pool)
        await redis.aclose()
    _write_json(args.json, report.to_json())
    if str(args.json) != "-":
        print(report.table())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m flashsale.drill_cli <drill|recover> …``"""
    parser = argparse.ArgumentParser(prog="python -m flashsale.drill_cli")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
