"""The one Redis client factory (:mod:`flashsale.redis_client`): what a broken connection
looks like to its callers.

A surge meets a network that resets connections (the drills' net-reset fault). Under uvloop —
what every flashsale process runs on — writing to a connection whose transport the peer has
already closed raises ``RuntimeError`` ("unable to perform operation on <TCPTransport
closed=True>; the handler is closed"), which redis-py passes on as it is. A command that
meets one must read as the connection error it is (retried once, then 503
``redis_unavailable``), never as an unknown error (500 ``internal_error``: the net-reset
drill saw 17 of them in one run).
"""

from __future__ import annotations

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from flashsale.redis_client import connect


def _closed_under_it(redis_url: str, *, resends: int) -> str:
    """Open a pooled connection, close its transport under it (as a reset from the network
    does between the pool's liveness check and the write), then send on it."""

    async def scenario() -> str:
        client = connect(redis_url, timeout_s=2, resends=resends, max_connections=2, wait_s=2)
        try:
            pool = client.connection_pool
            connection = await pool.get_connection()
            try:
                connection._writer.transport.abort()  # the peer's reset, as uvloop sees it
                try:
                    await connection.send_command("PING")
                except RedisConnectionError as exc:
                    return f"ConnectionError: {exc}"
                return "sent"
            finally:
                await pool.release(connection)
        finally:
            await client.aclose()

    return uvloop.run(scenario())


def test_a_write_on_a_connection_closed_under_it_is_a_connection_error(redis_url: str) -> None:
    try:
        outcome = _closed_under_it(redis_url, resends=0)
    except RuntimeError as exc:  # what redis-py alone lets through under uvloop
        pytest.fail(f"a closed transport surfaced as RuntimeError: {exc}")
    assert outcome.startswith("ConnectionError"), outcome


def test_a_command_after_a_reset_is_resent_on_a_new_connection(redis_url: str) -> None:
    """Through the client (one re-send, the service's policy): the command that met the
    closed connection is sent again on a fresh one and answers."""

    async def scenario() -> object:
        client = connect(redis_url, timeout_s=2, resends=1, max_connections=1, wait_s=2)
        try:
            await client.set("redis-client:reset", "still here")
            pool = client.connection_pool
            connection = await pool.get_connection()
            connection._writer.transport.abort()
            await pool.release(connection)
            return await client.get("redis-client:reset")
        finally:
            await client.aclose()

    assert uvloop.run(scenario()) == b"still here"
