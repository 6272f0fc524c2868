"""The one place a Redis client is built (one server or a Redis Cluster, one pool policy),
and the one way a reply is read as text.

Every role asks :func:`connect` for its client with what it needs (a timeout, decoded
replies, how many re-sends); the pool policy — a bounded pool, connect and socket
timeouts, health checks on a single server — is decided here.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

__all__ = ["as_text", "connect"]


def connect(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float = 10.0,
    connect_timeout_s: float | None = None,
    decode: bool = False,
    resends: int | None = None,
    max_connections: int | None = None,
) -> Any:
    """A client on ``url``: one server, or (``cluster``) a Redis Cluster ``url`` names a node
    of (it discovers the other shards and routes each key).

    ``resends``: how many times a command that timed out or lost its connection is sent
    again (None keeps redis-py's default). Scripts in this project are idempotent, so a
    re-send is safe, but each one adds a whole timeout before a caller hears "unknown".
    """
    options: dict[str, Any] = {
        "decode_responses": decode,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout_s if connect_timeout_s is not None else timeout_s,
    }
    if resends is not None:
        options["retry"] = (
            Retry(NoBackoff(), 0)
            if resends == 0
            else Retry(ExponentialBackoff(cap=0.05, base=0.005), resends)
        )
    if max_connections is not None:
        options["max_connections"] = max_connections
    if cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, health_check_interval=30, **options)


def as_text(value: Any) -> str:
    """A Redis reply (bytes, or whatever a decoding client gave) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
