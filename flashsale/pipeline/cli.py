"""``flashsale migrate``, ``flashsale worker`` and ``flashsale audit``: the order pipeline's
commands (the worker process itself is :mod:`flashsale.pipeline.runner`).

Exit codes (:mod:`flashsale.exit_codes`): 0 done (audit: clean), 2 the audit found
violations, 4 the stores are unreachable or the schema is not ready (run ``flashsale
migrate``), 64 bad settings or arguments — among them a node of a Redis Cluster named as
one server (FLASHSALE_REDIS_CLUSTER forgotten), which the worker and the audit refuse before
they read or write anything.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashsale import exit_codes
from flashsale.cli import add_store_options, both_stores, exit_status, store_overrides
from flashsale.console import fail, run, store_failed, write_json
from flashsale.redis_client import cluster_node_as_one_server, connect, reaches_cluster_node
from flashsale.settings import SettingsError, check_database_url

if TYPE_CHECKING:
    from flashsale.settings import Settings

__all__ = ["register"]


def register(sub: Any) -> None:
    m = sub.add_parser(
        "migrate",
        help="apply the database schema migrations (safe to run from several processes at once)",
        description=(
            "Apply every pending schema migration to the PostgreSQL named by "
            "FLASHSALE_DATABASE_URL (or --database-url), each in its own transaction. "
            "Run it before the first `flashsale worker`, and after every upgrade."
        ),
        epilog=exit_status(
            {
                exit_codes.OK: "every migration applied (or already was); --status listed them",
                exit_codes.NOT_READY: "PostgreSQL does not answer, or a migration failed (the error "
                "says which): run it again once fixed",
                exit_codes.USAGE: "bad flags, or a database URL that cannot work (refused: check it)",
            }
        ),
    )
    add_store_options(m, redis=False)
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
            "FLASHSALE_KEY_PREFIX and FLASHSALE_WORKER_* / FLASHSALE_SWEEPER_* (see README); flags win. "
            "A store that does not answer yet is logged and waited for."
        ),
        epilog=exit_status(
            {
                exit_codes.OK: "stopped by SIGTERM or Ctrl-C (the batch in hand finished)",
                exit_codes.NOT_READY: "the schema is not migrated (`flashsale migrate`)",
                exit_codes.USAGE: "bad flags or settings; a PostgreSQL that refused this worker (a "
                "password, a database that does not exist); a node of a Redis Cluster given as one "
                "server (set FLASHSALE_REDIS_CLUSTER=1; nothing was read or written)",
            }
        ),
    )
    add_store_options(w)
    w.add_argument(
        "--consumer", help="this worker's name in the group (default: host name); one per worker process"
    )
    w.add_argument(
        "--batch",
        type=int,
        help="changes read at once and written per PostgreSQL transaction, about (default 1000)",
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
        help="compare Redis with PostgreSQL: oversold, lost, duplicated, leaked (exit 2 if anything is)",
        description=(
            "Wait until the order writer has committed the streams, then compare each sale in "
            "Redis with PostgreSQL, per SKU and per order: oversold units, lost orders, "
            "duplicates and conflicts, per-user limit breaches, leaked stock, dead letters. "
            "Prints a table.\n\n"
            "When: after a sale has ended, after an incident (a `flashsale recover`, a failover), "
            "or on a schedule; `POST /api/admin/audit` runs the same over the admin API."
        ),
        epilog=exit_status(
            {
                exit_codes.OK: "clean: nothing oversold, lost, duplicated or leaked",
                exit_codes.INVARIANT_VIOLATED: "a violation (the table says what and where); "
                "not_drained: the writer had not committed the streams within --wait",
                exit_codes.NOT_READY: "Redis or PostgreSQL does not answer, or the schema is not "
                "migrated (`flashsale migrate`)",
                exit_codes.USAGE: "bad flags or settings; a node of a Redis Cluster given as one "
                "server (set FLASHSALE_REDIS_CLUSTER=1; nothing was judged)",
            }
        ),
    )
    add_store_options(a)
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
def _configure_logs() -> None:
    import logging

    from flashsale.logs import configure

    configure(os.environ.get("FLASHSALE_LOG_LEVEL", "INFO") or "INFO")
    # During an outage asyncpg logs a traceback every time its pool fails to reconnect;
    # the worker's own postgres_unavailable / postgres_recovered events say it once.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


# ---------------------------------------------------------------------- migrate
def _migrate(args: argparse.Namespace) -> int:
    url = store_overrides(args, os.environ).get("FLASHSALE_DATABASE_URL", "")
    if not url:
        return fail("no database: set FLASHSALE_DATABASE_URL or pass --database-url")
    try:
        check_database_url(url)
    except SettingsError as exc:
        return fail(str(exc))
    return run(_migrate_async(url, status_only=args.status))


async def _migrate_async(url: str, *, status_only: bool) -> int:
    import asyncpg

    from flashsale.pgpool import is_transient
    from flashsale.pipeline.migrate import MigrationError, migrate, migration_status

    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return store_failed("PostgreSQL", url, exc, transient=is_transient(exc))
    try:
        if not status_only:
            applied = await migrate(conn)
            print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.label}" for m in applied))
        for st in await migration_status(conn):
            when = st.applied_at.isoformat(timespec="seconds") if st.applied_at else ""
            print(f"{st.version:04d}  {st.name:<24} {st.state:<8} {when}")
    except MigrationError as exc:
        return fail(str(exc), exit_codes.NOT_READY)
    finally:
        await conn.close(timeout=5)
    return 0


# ---------------------------------------------------------------------- worker
def _worker(args: argparse.Namespace) -> int:
    from flashsale.pipeline.worker_settings import WorkerSettings
    from flashsale.settings import SettingsError

    env = {**os.environ, **store_overrides(args, os.environ)}
    try:
        settings = WorkerSettings.from_env(
            env, consumer=args.consumer, batch=args.batch, write_method=args.write_method
        )
    except SettingsError as exc:
        return fail(str(exc))
    if "FLASHSALE_REDIS_URL" not in env:
        return fail(
            "set FLASHSALE_REDIS_URL (or --redis-url) to the service's Redis (e.g. redis://127.0.0.1:6379/0)"
        )
    if not settings.database_url and not args.sweeper_only:
        return fail(
            "set FLASHSALE_DATABASE_URL (or --database-url) to the PostgreSQL the orders go to "
            "(e.g. postgresql://user@127.0.0.1:5432/flashsale), or run --sweeper-only"
        )
    _configure_logs()
    import asyncpg
    from redis.exceptions import RedisError

    from flashsale.pgpool import is_transient
    from flashsale.pipeline.runner import run_worker
    from flashsale.redis_client import refuses_client

    try:
        return run(run_worker(settings, writer=not args.sweeper_only, sweeper=not args.no_sweeper))
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # it waits through outages, not these
        return store_failed("PostgreSQL", settings.database_url, exc, transient=is_transient(exc))
    except RedisError as exc:  # only a refusal gets here: a wrong or missing password, an ACL
        if not refuses_client(exc):
            raise
        return store_failed("Redis", settings.redis_url, exc, transient=False)


# ---------------------------------------------------------------------- audit
def _audit(args: argparse.Namespace) -> int:
    try:
        settings = both_stores(args, why="the audit compares Redis with PostgreSQL")
    except SettingsError as exc:
        return fail(str(exc))
    acknowledged: list[str] | None = None
    if args.acknowledged is not None:
        try:
            text = args.acknowledged.read_text()
        except OSError as exc:
            return fail(f"cannot read {args.acknowledged}: {exc}")
        stripped = text.strip()
        try:
            acknowledged = (
                json.loads(stripped)
                if stripped.startswith("[")
                else [ln.strip() for ln in text.splitlines() if ln.strip()]
            )
        except ValueError as exc:
            return fail(f"{args.acknowledged} is not a JSON list of order ids: {exc}")
        if not all(isinstance(o, str) for o in acknowledged):
            return fail(f"{args.acknowledged}: every acknowledged order id must be a string")
    if args.wait < 0 or args.grace < 0:
        return fail("--wait and --grace must not be negative")
    return run(_audit_async(settings, args, acknowledged))


async def _audit_async(settings: Settings, args: argparse.Namespace, acknowledged: list[str] | None) -> int:
    import asyncpg
    from redis.exceptions import RedisError

    from flashsale.pgpool import close_pool, create_pool, is_transient
    from flashsale.pipeline.audit import run_audit

    assert settings.database_url, "checked by _audit"
    redis = connect(settings.redis_url, cluster=settings.redis_cluster, decode=True)
    try:
        pool = await create_pool(settings.database_url, max_size=2, application_name="flashsale-audit")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        await redis.aclose()
        return store_failed("PostgreSQL", settings.database_url, exc, transient=is_transient(exc))
    try:
        if await reaches_cluster_node(redis):  # it would judge one shard's sales, the rest "lost"
            return fail(cluster_node_as_one_server(settings.redis_url))
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
        return fail(str(exc), exit_codes.NOT_READY)
    except (RedisError, OSError) as exc:
        return fail(f"cannot read Redis at {settings.redis_url}: {exc}", exit_codes.NOT_READY)
    finally:
        await close_pool(pool)
        await redis.aclose()
    write_json(args.json, report.to_json())
    if str(args.json) != "-":
        print(report.table())
    return exit_codes.OK if report.ok else exit_codes.INVARIANT_VIOLATED
