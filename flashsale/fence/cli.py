"""``flashsale recover``: rebuild sales in Redis from PostgreSQL after Redis lost data, and
reopen them (``--check`` only reports what the fence finds)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashsale import exit_codes
from flashsale.cli import add_store_options, both_stores, exit_status
from flashsale.console import fail, run, store_failed, write_json

if TYPE_CHECKING:
    from flashsale.settings import Settings

__all__ = ["register"]


def register(sub: Any) -> None:
    r = sub.add_parser(
        "recover",
        help="rebuild sales in Redis from PostgreSQL after Redis lost data, then reopen them",
        description=(
            "Rebuild sales in Redis from PostgreSQL after Redis lost data, and reopen them.\n\n"
            "When: the service fenced a sale (orders, payments and cancellations answer 503 "
            'sale_fenced; /readyz reports "fenced: <sales>"; the FlashsaleSaleFenced alert '
            "fires), or Redis came back empty or from an older copy. First `flashsale recover "
            "--check` (changes nothing), then `flashsale recover`. Safe to run again; run it with "
            "the service and the worker running or stopped.\n\n"
            "What: compare Redis with what PostgreSQL has committed (lineage marker, hold "
            "records, sold counters, stream ids). For every sale found lost, or fenced, or named: "
            "fence it, write whatever its stream still holds to PostgreSQL, rebuild its stock, "
            "holds, idempotency records, per-user counts and deadlines from PostgreSQL, and "
            "reopen it.\n\n"
            "One Redis server only: on a Redis Cluster (FLASHSALE_REDIS_CLUSTER=1, or a node that "
            "says cluster_enabled:1) it refuses and changes nothing; see "
            "docs/running-at-scale.md for what keeps a cluster safe instead.\n\n"
            "Settings: FLASHSALE_REDIS_URL, FLASHSALE_DATABASE_URL, FLASHSALE_KEY_PREFIX (the "
            "flags win)."
        ),
        epilog=exit_status(
            {
                exit_codes.OK: "Redis agrees with PostgreSQL (--check); the sales were rebuilt and "
                "reopened, or there was nothing to recover; --forget done",
                exit_codes.INVARIANT_VIOLATED: "--check found a loss; or a sale could not be rebuilt "
                "(the report says which and what to do)",
                exit_codes.NOT_READY: "Redis or PostgreSQL does not answer, or the schema is not "
                "migrated (`flashsale migrate`): run it again once they do",
                exit_codes.USAGE: "bad flags or settings; a Redis Cluster (refused, nothing changed); "
                "a Redis that refused (a replica: point at the primary); --forget of a sale the "
                "fence never recorded",
            }
        ),
    )
    add_store_options(r)
    r.add_argument(
        "--sale", action="append", dest="sales", metavar="SALE", help="recover this sale (repeatable)"
    )
    r.add_argument("--force", action="store_true", help="rebuild every recorded sale, even those that verify")
    r.add_argument(
        "--check", action="store_true", help="only compare and report; change nothing (exit 2 on a loss)"
    )
    r.add_argument(
        "--forget",
        metavar="SALE",
        help="tell the fence SALE was removed from Redis on purpose (retired: the id may be created again)",
    )
    r.add_argument(
        "--json", type=Path, metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)"
    )
    r.set_defaults(func=_recover)


# --------------------------------------------------------------------- recover
def _recover(args: argparse.Namespace) -> int:
    from flashsale.settings import SettingsError

    try:
        settings = both_stores(args, why="recovery reads PostgreSQL and rewrites Redis")
    except SettingsError as exc:
        return fail(str(exc))
    if settings.redis_cluster:
        from flashsale.fence.verify import ON_A_CLUSTER

        return fail(f"{_REFUSED}FLASHSALE_REDIS_CLUSTER=1 names a Redis Cluster; {ON_A_CLUSTER}")
    return run(_recover_async(settings, args))


_REFUSED = "recover refused, nothing was changed: "

#: How long ``--forget`` asks Redis whether it is a node of a Redis Cluster (refused, as in
#: every mode) before it goes on without: retiring a sale needs only PostgreSQL.
FORGET_ASKS_REDIS_S = 10.0


async def _recover_async(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    import asyncpg
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from flashsale.fence import recovery
    from flashsale.fence import verify as fence
    from flashsale.pgpool import close_pool, create_pool, is_transient
    from flashsale.redis_client import connect

    assert settings.database_url, "checked by _recover"
    redis = connect(settings.redis_url, decode=True, timeout_s=30, connect_timeout_s=5)
    try:
        pool = await create_pool(settings.database_url, max_size=2, application_name="flashsale-recover")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        await redis.aclose()
        return store_failed("PostgreSQL", settings.database_url, exc, transient=is_transient(exc))
    prefix = settings.key_prefix
    try:
        where = f"the Redis at {settings.redis_url}"
        if args.forget:  # PostgreSQL only: a Redis that is down does not stop it, a cluster does
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
                await asyncio.wait_for(fence.require_one_server(redis, where), FORGET_ASKS_REDIS_S)
            done = await recovery.forget(pool, prefix=prefix, sale=args.forget)
            print(
                f"sale {args.forget} forgotten by the fence"
                if done
                else f"the fence has no sale {args.forget!r} recorded"
            )
            return exit_codes.OK if done else exit_codes.USAGE
        await fence.require_one_server(redis, where)
        if args.check:
            verdict = await fence.verify(redis, pool, prefix=prefix)
            body: dict[str, Any] = {
                "ok": verdict.ok,
                "run_id": verdict.run_id,
                "lost": verdict.lost_sales(),
                "losses": [loss.reason for loss in verdict.losses],
                "checked": list(verdict.checked),
            }
            write_json(args.json, body)
            if str(args.json) != "-":
                print(
                    "Redis agrees with PostgreSQL"
                    if verdict.ok
                    else "\n".join(["Redis lost data:", *body["losses"]])
                )
            return exit_codes.OK if verdict.ok else exit_codes.INVARIANT_VIOLATED
        report = await recovery.recover(redis, pool, prefix=prefix, sales=args.sales, force=args.force)
    except fence.ClusterUnsupported as exc:
        return fail(f"{_REFUSED}{exc}")
    except fence.FenceUnavailable as exc:
        return fail(str(exc), exit_codes.NOT_READY)
    except recovery.RecoveryError as exc:
        return fail(str(exc), exit_codes.INVARIANT_VIOLATED)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # (safe to run again)
        return store_failed("Redis", settings.redis_url, exc, transient=True)
    except RedisError as exc:  # answered and refused: a replica (READONLY), say
        return store_failed("Redis", settings.redis_url, exc, transient=False)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return store_failed("PostgreSQL", settings.database_url, exc, transient=is_transient(exc))
    finally:
        await close_pool(pool)
        await redis.aclose()
    write_json(args.json, report.to_json())
    if str(args.json) != "-":
        print(report.table())
    return exit_codes.OK if report.ok else exit_codes.INVARIANT_VIOLATED
