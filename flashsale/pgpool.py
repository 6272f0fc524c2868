"""The asyncpg connection pool the pipeline uses, and what counts as a passing outage.

A pool's connections all go stale when PostgreSQL restarts: each one fails once, on its
next use. :func:`is_transient` tells those failures (and the other "try again later"
errors: shutdown, too many connections, deadlock, timeouts) apart; callers that see one
call :func:`forget_connections` so every pooled connection is replaced instead of
failing one by one. :func:`is_data_error` says when the values sent were refused.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

__all__ = ["close_pool", "create_pool", "forget_connections", "is_data_error", "is_transient"]

logger = logging.getLogger(__name__)


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    statement_timeout_ms: int = 30_000,
    connect_timeout_s: float = 5.0,
    application_name: str = "flashsale",
) -> asyncpg.Pool:
    """A pool whose every connection has a server-side statement timeout, so a query stuck
    behind a lock fails (transiently) instead of hanging the worker."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout_s,
        # Client-side too: a server that stopped answering (paused, network gone) must not
        # hang a query forever. Slightly above the server's own timeout.
        command_timeout=statement_timeout_ms / 1000 + 5,
        server_settings={
            "statement_timeout": str(statement_timeout_ms),
            "application_name": application_name,
        },
    )
    return pool


def is_transient(exc: BaseException) -> bool:
    """True for failures that say nothing about the data: retrying later may succeed."""
    if isinstance(exc, (OSError, TimeoutError)):  # refused, reset, unreachable, timed out
        return True
    if isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,  # class 08: the connection broke
            asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, restart, cancelled
            asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk
            asyncpg.exceptions.TransactionRollbackError,  # 40: deadlock, serialization
        ),
    ):
        return True
    # A connection dropped mid-query can leave asyncpg's protocol half-way through an
    # operation; the next use of it says "cannot switch to state …; another operation is
    # in progress". A broken connection, not the data's fault nor the database's state.
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return True
    # The client noticed the connection is gone ("connection is closed").
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL (or asyncpg, encoding a value) refused the *values* sent: SQLSTATE
    class 22 (data exception: out of range, NUL byte, bad encoding) or 23 (a constraint).
    Only these can be blamed on one bad row; anything else (no such table, read-only
    server, permissions) is the database's state and must not condemn the data."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    return str(getattr(exc, "sqlstate", "") or "")[:2] in ("22", "23")


async def forget_connections(pool: asyncpg.Pool) -> None:
    """After an outage: close every pooled connection at its next use and open a new one."""
    await pool.expire_connections()


async def close_pool(pool: asyncpg.Pool, timeout_s: float = 5.0) -> None:
    """Close gracefully, or terminate if PostgreSQL does not answer within ``timeout_s``."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        logger.warning("PostgreSQL pool did not close cleanly (%s); terminating it", exc)
        pool.terminate()
