"""The servers a benchmark run measures: the project's embedded Redis and PostgreSQL
(``flashsale.runtime.embedded.EmbeddedStack``), or existing ones named by ``FLASHSALE_REDIS_URL`` /
``FLASHSALE_DATABASE_URL``. Every benchmark of a run uses the same two servers, so their
figures can be compared as ratios.

Benchmarks never flush a server: each one uses keys and tables named with the run's own
token and removes them afterwards, so pointing a run at a shared server is safe.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from flashsale.runtime.embedded import EmbeddedStack

__all__ = ["Servers", "open_servers"]


@dataclass(frozen=True)
class Servers:
    """Where the servers are, and what is known about them."""

    redis_url: str
    database_url: str
    #: Local process ids of servers this run started (None for external servers).
    redis_pid: int | None
    postgres_pid: int | None
    #: Unique to this run: prefixes every key and table a benchmark creates.
    token: str

    def redis(self, *, max_connections: int | None = None) -> Redis:
        """A new client (the caller closes it with ``aclose()``)."""
        kwargs: dict[str, Any] = {}
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        return Redis.from_url(self.redis_url, **kwargs)

    def name(self, what: str) -> str:
        """A key or table name private to this run."""
        return f"bench_{self.token}_{what}"


def open_servers(stack: EmbeddedStack) -> Servers:
    """Describe the servers of a started stack."""
    return Servers(
        redis_url=stack.redis_url,
        database_url=stack.database_url,
        redis_pid=stack.redis.pid if stack.redis is not None else None,
        postgres_pid=stack.postgres.pid if stack.postgres is not None else None,
        token=secrets.token_hex(4),
    )
