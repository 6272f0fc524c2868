"""``flashsale migrate``, ``flashsale worker`` and ``flashsale audit``: the order pipeline's
commands. Also runnable as ``python -m flashsale.pipeline_cli <command>``.

Exit codes: 0 done (audit: clean), 2 bad settings or arguments, 3 the audit found
violations, 4 the database schema is not ready (run ``flashsale migrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

__all__ = ["register", "main", "EXIT_VIOLATIONS", "EXIT_SCHEMA"]

EXIT_SETTINGS = 2
EXIT_VIOLATIONS = 3
EXIT_SCHEMA = 4


def register(sub: Any) -> None:
    m = sub.add_parser(
        "migrate",
        help="apply the database schema migrations (safe to run from several processes at once)",
        description=(
            "Apply every pending schema migration to the PostgreSQL named by "
            "FLASHSALE_DATABASE_URL (or --database-url), each in its own transaction. "
            "Run it before the first `flashsale worker`, and after every upgrade."
        ),
    )
    m.add_argument("--database-url", help="PostgreSQL URL (default: FLASHSALE_DATABASE_URL)")
    m.add_argument(
        "--status",
        action="store_true",
        help="list the migrations and whether each is applied; change nothing",
    )
    m.set_defaults(func=_migrate)

    w = sub.add_parser(
        "worker",
        help="drain the sales' order streams into PostgreSQL and expire unpaid holds",
        description=(
            "Run the order writer: read every sale's event stream with the consumer group "
            "'writers', write orders and stock events to PostgreSQL in batches, acknowledge "
            "only what is committed. The hold-expiry sweeper runs alongside unless "
            "--no-sweeper. Runs until SIGTERM or Ctrl-C, finishing the batch in hand. "
            "Settings: FLASHSALE_REDIS_URL (FLASHSALE_REDIS_CLUSTER=1 when it names a node of a "
            "Redis Cluster: the streams of every shard are read), FLASHSALE_DATABASE_URL, "
            "FLASHSALE_KEY_PREFIX and FLASHSALE_WORKER_* / FLASHSALE_SWEEPER_* (see README); flags win."
        ),
    )
    w.add_argument(
        "--consumer", help="this worker's name in the group (default: host name); one per worker process"
    )
    w.add_argument(
        "--batch", type=int, help="stream entries per PostgreSQL transaction, at most (default 1000)"
    )
    w.add_argument("--write-method", choices=("unnest", "copy"), help="how a batch is sent (default unnest)")
    mode = w.add_mutually_exclusive_group()
    mode.add_argument(
        "--no-sweeper", action="store_true", help="do not expire holds here (another process does)"
    )
    mode.add_argument(
        "--sweeper-only",
        action="store_true",
        help="only expire holds; write no orders (no PostgreSQL needed)",
    )
    w.set_defaults(func=_worker)

    a = sub.add_parser(
        "audit",
        help="compare Redis with PostgreSQL: oversold, lost, duplicated, leaked (exit 3 if anything is)",
        description=(
            "Wait until the order writer has committed the streams, then compare each sale in "
            "Redis with PostgreSQL, per SKU and per order: oversold units, lost orders, "
            "duplicates and conflicts, per-user limit breaches, leaked stock, dead letters. "
            "Prints a table; exits 0 when clean, 3 on any violation."
        ),
    )
    a.add_argument(
        "--sale",
        action="append",
        dest="sales",
        metavar="SALE",
        help="audit this sale (repeatable; default: every sale)",
    )
    a.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the streams to drain (default 30)",
    )
    a.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE ('-' for stdout)"
    )
    a.add_argument(
        "--acknowledged",
        type=Path,
        metavar="FILE",
        help="order ids clients were told exist (one per line, or a JSON list): each must be in both stores",
    )
    a.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="S",
        help="how long past its deadline a hold may still be held before it counts as stranded (default 5)",
    )
    a.set_defaults(func=_audit)


# ---------------------------------------------------------------------- helpers
def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (entry points only; never on import)."""
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coro)


def _configure_logs() -> None:
    import logging

    from .logs import configure

    configure(os.environ.get("FLASHSALE_LOG_LEVEL", "INFO") or "INFO")
    # During an outage asyncpg logs a traceback every time its pool fails to reconnect;
    # the worker's own postgres_unavailable / postgres_recovered events say it once.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


def _fail(message: str, code: int = EXIT_SETTINGS) -> int:
    print(f"flashsale: {message}", file=sys.stderr)
    return code


def _redis(url: str, *, cluster: bool = False, decode: bool = True) -> Any:
    """A client on one Redis server, or on the Redis Cluster ``url`` names a node of
    (FLASHSALE_REDIS_CLUSTER=1): it discovers the other shards and routes each key."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    if cluster:
        return RedisCluster.from_url(
            url, decode_responses=decode, socket_timeout=10, socket_connect_timeout=5
        )
    # Socket timeout well above XREADGROUP's BLOCK, so an idle wait is never taken for an outage.
    return Redis.from_url(
        url, decode_responses=decode, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
    )


# ---------------------------------------------------------------------- migrate
def _migrate(args: argparse.Namespace) -> int:
    url = args.database_url or os.environ.get("FLASHSALE_DATABASE_URL", "").strip()
    if not url:
        return _fail("no database: set FLASHSALE_DATABASE_URL or pass --database-url")
    return _run(_migrate_async(url, status_only=args.status))


async def _migrate_async(url: str, *, status_only: bool) -> int:
    import asyncpg

    from .migrate import MigrationError, migrate, migration_status

    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"cannot connect to PostgreSQL at {url}: {exc}")
    try:
        if not status_only:
            applied = await migrate(conn)
            print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.label}" for m in applied))
        for st in await migration_status(conn):
            when = st.applied_at.isoformat(timespec="seconds") if st.applied_at else ""
            print(f"{st.version:04d}  {st.name:<24} {st.state:<8} {when}")
    except MigrationError as exc:
        return _fail(str(exc), EXIT_SCHEMA)
    finally:
        await conn.close(timeout=5)
    return 0


# ---------------------------------------------------------------------- worker
def _worker(args: argparse.Namespace) -> int:
    from .settings import SettingsError
    from .worker import WorkerSettings

    try:
        settings = WorkerSettings.from_env(
            consumer=args.consumer, batch=args.batch, write_method=args.write_method
        )
    except SettingsError as exc:
        return _fail(str(exc))
    if "FLASHSALE_REDIS_URL" not in os.environ:
        return _fail("set FLASHSALE_REDIS_URL to the service's Redis (e.g. redis://127.0.0.1:6379/0)")
    if not settings.database_url and not args.sweeper_only:
        return _fail(
            "set FLASHSALE_DATABASE_URL to the PostgreSQL the orders go to "
            "(e.g. postgresql://user@127.0.0.1:5432/flashsale), or run --sweeper-only"
        )
    _configure_logs()
    return _run(run_worker(settings, writer=not args.sweeper_only, sweeper=not args.no_sweeper))


async def run_worker(settings: Any, *, writer: bool = True, sweeper: bool = True) -> int:
    """Run the order writer and/or the sweeper until SIGTERM/SIGINT; returns an exit code."""
    import logging

    from .pgpool import close_pool, create_pool
    from .sweeper import HoldSweeper
    from .worker import OrderWriter

    log = logging.getLogger("flashsale.worker")
    redis = _redis(settings.redis_url, cluster=settings.redis_cluster)
    pool = None
    stops: list[Callable[[], None]] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stopping.set()
        for stop in stops:
            stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        jobs: list[Awaitable[None]] = []
        if settings.redis_cluster and not await _wait_for_cluster(redis, stopping, log):
            return 0
        if writer:
            pool = await _wait_for_pool(settings, stopping, create_pool, log)
            if pool is None:
                return 0
            problem = await _schema_problem(pool)
            if problem:
                return _fail(problem, EXIT_SCHEMA)
            order_writer = OrderWriter(redis, pool, settings)
            stops.append(order_writer.stop)
            jobs.append(order_writer.run())
        if sweeper:
            hold_sweeper = HoldSweeper(
                redis,
                prefix=settings.prefix,
                interval_s=settings.sweep_interval_ms / 1000,
                limit=settings.sweep_limit,
                sales_refresh_s=settings.sales_refresh_s,
            )
            stops.append(hold_sweeper.stop)
            jobs.append(hold_sweeper.run())
        if stopping.is_set():
            on_signal()
        await asyncio.gather(*jobs)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if pool is not None:
            await close_pool(pool)
        await redis.aclose()


async def _wait_for_cluster(redis: Any, stopping: asyncio.Event, log: Any) -> bool:
    """Learn the cluster's slot map before the writer and the sweeper share the client:
    redis-py 8.1 breaks commands that race a cold cluster client's first use (AttributeError
    on a connection it closed meanwhile). Waits for the cluster like for PostgreSQL; False
    if told to stop first."""
    from redis.exceptions import RedisClusterException, RedisError

    def outage(exc: Exception) -> bool:
        return isinstance(exc, (RedisError, RedisClusterException, OSError))

    return await _keep_trying(redis.initialize, outage, "redis_unavailable", stopping, log) is not None


async def _wait_for_pool(settings: Any, stopping: asyncio.Event, create_pool: Any, log: Any) -> Any:
    """Open the pool, waiting (with backoff) for PostgreSQL to come up; None if told to stop."""
    from .pgpool import is_transient

    def open_pool() -> Awaitable[Any]:
        return create_pool(  # type: ignore[no-any-return]
            settings.database_url,
            max_size=settings.pool_size,
            statement_timeout_ms=settings.statement_timeout_ms,
            application_name=f"flashsale-worker:{settings.consumer}",
        )

    return await _keep_trying(open_pool, is_transient, "postgres_unavailable", stopping, log)


async def _keep_trying(
    attempt: Callable[[], Awaitable[Any]],
    retryable: Callable[[Exception], bool],
    event: str,
    stopping: asyncio.Event,
    log: Any,
) -> Any:
    """``await attempt()`` until it succeeds, through the failures ``retryable`` accepts
    (logged once, as ``event``), waiting 0.2 s doubling up to 5 s; None if told to stop."""
    delay = 0.2
    warned = False
    while not stopping.is_set():
        try:
            return await attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            if not warned:
                log.warning(event, extra={"error": f"{type(exc).__name__}: {exc}"})
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, 5.0)
    return None


async def _schema_problem(pool: Any) -> str | None:
    from .migrate import migration_status

    async with pool.acquire() as conn:
        states = await migration_status(conn)
    behind = [f"{s.version:04d}_{s.name}" for s in states if s.state in ("pending", "changed")]
    if behind:
        return (
            f"the database schema is not up to date ({', '.join(behind)} not applied): "
            "run `flashsale migrate` first"
        )
    return None


# ---------------------------------------------------------------------- audit
def _audit(args: argparse.Namespace) -> int:
    from .settings import Settings

    settings = Settings.from_env()
    if not settings.database_url or "FLASHSALE_REDIS_URL" not in os.environ:
        return _fail(
            "the audit compares Redis with PostgreSQL: set FLASHSALE_DATABASE_URL (and FLASHSALE_REDIS_URL)"
        )
    acknowledged: list[str] | None = None
    if args.acknowledged is not None:
        try:
            text = args.acknowledged.read_text()
        except OSError as exc:
            return _fail(f"cannot read {args.acknowledged}: {exc}")
        stripped = text.strip()
        try:
            acknowledged = (
                json.loads(stripped)
                if stripped.startswith("[")
                else [ln.strip() for ln in text.splitlines() if ln.strip()]
            )
        except ValueError as exc:
            return _fail(f"{args.acknowledged} is not a JSON list of order ids: {exc}")
        if not all(isinstance(o, str) for o in acknowledged):
            return _fail(f"{args.acknowledged}: every acknowledged order id must be a string")
    if args.wait < 0 or args.grace < 0:
        return _fail("--wait and --grace must not be negative")
    return _run(_audit_async(settings, args, acknowledged))


async def _audit_async(settings: Any, args: argparse.Namespace, acknowledged: list[str] | None) -> int:
    from redis.exceptions import RedisError

    from .audit import run_audit
    from .pgpool import close_pool, create_pool

    redis = _redis(settings.redis_url, cluster=settings.redis_cluster)
    try:
        pool = await create_pool(settings.database_url, max_size=2, application_name="flashsale-audit")
    except (OSError, TimeoutError) as exc:
        await redis.aclose()
        return _fail(f"cannot connect to PostgreSQL: {exc}")
    try:
        report = await run_audit(
            redis,
            pool,
            prefix=settings.key_prefix,
            sales=args.sales,
            acknowledged=acknowledged,
            wait_drain_s=args.wait,
            expiry_grace_s=args.grace,
        )
    except RuntimeError as exc:
        return _fail(str(exc), EXIT_SCHEMA)
    except (RedisError, OSError) as exc:
        return _fail(f"cannot read Redis at {settings.redis_url}: {exc}")
    finally:
        await close_pool(pool)
        await redis.aclose()
    if args.json is not None:
        body = json.dumps(report.to_json(), indent=2)
        if str(args.json) == "-":
            print(body)
        else:
            args.json.write_text(body + "\n")
    if str(args.json) != "-":
        print(report.table())
    return 0 if report.ok else EXIT_VIOLATIONS


def main(argv: list[str] | None = None) -> int:
    """``python -m flashsale.pipeline_cli <migrate|worker|audit> …``"""
    parser = argparse.ArgumentParser(prog="python -m flashsale.pipeline_cli")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
