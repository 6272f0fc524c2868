"""``flashsale serve`` and ``flashsale token``.

``serve --embedded`` is the try-out: embedded Redis and PostgreSQL, the schema, the service
and a worker (the order writer and the hold sweeper) — without one, orders would never
reach PostgreSQL and holds would never lapse while the war room looked healthy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flashsale import exit_codes
from flashsale.cli import add_store_options, exit_status, store_overrides
from flashsale.console import fail, redact
from flashsale.settings import Settings, SettingsError

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the order service (N processes sharing one port)",
        description=(
            "Run the order service. Settings come from FLASHSALE_* environment variables "
            "(see README), overridden by these flags. FLASHSALE_REDIS_URL, "
            "FLASHSALE_TOKEN_SECRET and FLASHSALE_ADMIN_TOKEN are required unless --embedded "
            "starts Redis and PostgreSQL here and generates the secrets (printed once).\n\n"
            "With a migrated database, every process runs the fence: if Redis comes back without its "
            "data, the sales it lost answer 503 sale_fenced until `flashsale recover` rebuilds "
            "them. The fence checks one Redis server: on a Redis Cluster "
            "(FLASHSALE_REDIS_CLUSTER=1) it is off, and /readyz says so.\n\n"
            "Before it starts, serve asks Redis and PostgreSQL once. One that does not answer yet "
            "is logged and waited for (/readyz answers 503 until Redis does); one that can never "
            "work stops the start with one line."
        ),
        epilog=exit_status(
            {
                exit_codes.OK: "stopped by SIGTERM or Ctrl-C",
                exit_codes.USAGE: "bad flags or settings; a store that refused this service (a "
                "password, a database that does not exist); a node of a Redis Cluster given as one "
                "server (set FLASHSALE_REDIS_CLUSTER=1); a service process that exited before it "
                "listened (is the port taken?)",
            }
        ),
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8080)")
    p.add_argument(
        "--workers", type=int, help="service processes sharing the port (default 1; use one per core)"
    )
    add_store_options(p)
    p.add_argument(
        "--embedded",
        action="store_true",
        help=(
            "start embedded Redis and PostgreSQL, and a worker (order writer and hold sweeper), "
            "for this run (try-outs; data is thrown away)"
        ),
    )
    p.set_defaults(func=_serve)

    t = sub.add_parser(
        "token",
        help="mint a buyer token (for load tests and curl)",
        description="Print a signed buyer token. The secret is FLASHSALE_TOKEN_SECRET (or --secret).",
    )
    t.add_argument("--user", required=True, help="user id (1-64 characters of A-Z a-z 0-9 _ @ -)")
    t.add_argument("--member", action="store_true", help="a member: may buy during the early-access window")
    t.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    t.add_argument("--secret", help="HMAC secret (default: FLASHSALE_TOKEN_SECRET)")
    t.set_defaults(func=_token)


def _serve(args: argparse.Namespace) -> int:
    from flashsale.service.identity import JwtVerifier
    from flashsale.service.serve import serve

    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            workers=args.workers,
            redis_url=args.redis_url,
            database_url=args.database_url,
        )
        if not args.embedded:
            if "FLASHSALE_REDIS_URL" not in os.environ and not args.redis_url:
                raise SettingsError(
                    "no Redis configured: set FLASHSALE_REDIS_URL (or --redis-url), "
                    "or add --embedded to start one for a try-out"
                )
            JwtVerifier.from_settings(settings)  # a JWT key that cannot be used: say so now
            return serve(settings)
        return _serve_embedded(settings, store_overrides(args, os.environ))
    except SettingsError as exc:
        return fail(f"serve: {exc}")


def _serve_embedded(settings: Settings, given: dict[str, str]) -> int:
    """``given``: the store URLs named by the environment or a flag; the rest are embedded."""
    import secrets
    from dataclasses import replace

    from flashsale.runtime.embedded import EmbeddedStack
    from flashsale.service.serve import serve

    with EmbeddedStack(environ=given) as stack:
        settings = replace(
            settings,
            redis_url=stack.redis_url,
            database_url=stack.database_url,
            token_secret=settings.token_secret or secrets.token_hex(16),
            admin_token=settings.admin_token or secrets.token_hex(16),
        )
        _migrate(settings)
        # Exported only what was made here (and carries no password); a server named by the
        # environment or a flag is already known to whoever started us.
        for var, server, url in (
            ("FLASHSALE_REDIS_URL", stack.redis, settings.redis_url),
            ("FLASHSALE_DATABASE_URL", stack.postgres, settings.database_url),
        ):
            print(
                f"export {var}={url}"
                if server is not None
                else f"# {var}={redact(url or '')} (given; used as it is)"
            )
        print(f"export FLASHSALE_TOKEN_SECRET={settings.token_secret}")
        print(f"export FLASHSALE_ADMIN_TOKEN={settings.admin_token}")
        with _worker(settings):
            print("# order writer and hold sweeper: running beside it (their log lines are on stderr)")
            print(
                f"# serving on http://{settings.host}:{settings.port}  (Ctrl-C stops everything)", flush=True
            )
            return serve(settings)


@contextmanager
def _worker(settings: Settings) -> Iterator[None]:
    """``flashsale worker`` (order writer and hold sweeper) beside the try-out's service,
    on the same stores; stopped before the servers are."""
    from flashsale.runtime.embedded import parent_death_signal
    from flashsale.service.serve import settings_env

    env = {**os.environ, **settings_env(settings)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "worker"],
        env=env,
        stdin=subprocess.DEVNULL,
        # Killed with us (kill -9, a closed terminal): the servers it writes to go too, so
        # it stops rather than retry vanished stores for ever.
        preexec_fn=parent_death_signal(signal.SIGTERM),
    )
    try:
        yield
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # it finishes the batch in hand
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _migrate(settings: Settings) -> None:
    import asyncio

    from flashsale.pipeline.migrate import migrate_url

    assert settings.database_url
    asyncio.run(migrate_url(settings.database_url))


def _token(args: argparse.Namespace) -> int:
    from flashsale.service.tokens import mint

    secret = args.secret or os.environ.get("FLASHSALE_TOKEN_SECRET")
    if not secret:
        return fail("token: set FLASHSALE_TOKEN_SECRET or pass --secret")
    try:
        print(mint(secret, args.user, ttl_s=args.ttl, member=args.member))
    except ValueError as exc:
        return fail(f"token: {exc}")
    return 0
