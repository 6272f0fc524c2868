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


#: Arguments as the engine's coalesced reserve call sends them (a key, counts, bytes per
#: reservation), and the other kinds a command may carry.
PACKED_ARGS = [
    ("EVALSHA", "a" * 40, 2, "fs:{d11}:stock", "fs:{d11}:holds", 300)
    + tuple(
        a
        for n in range(300)
        for a in (b"r-%d" % n, b"d11.%024x" % n, b"buyer", b"1800000", b"1", b"hot", b"1")
    ),
    ("SET", "clé ünïcode", "välue"),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"x"),
    ("INCRBY", "k", -(2**62)),
    ("SET", "k", 2**70),
    ("SET", "k", 1.5),
    ("SET", "k", bytearray(b"ab")),
    ("SET", "k", memoryview(b"cd")),
]


@pytest.mark.parametrize("args", PACKED_ARGS, ids=lambda a: str(a[0]))
def test_a_command_is_framed_as_redis_py_frames_it(args: tuple[object, ...]) -> None:
    """The client's connections frame a command byte for byte as redis-py does."""
    from redis.asyncio import Connection

    from flashsale.redis_client import ResetAwareConnection

    ours, theirs = ResetAwareConnection(), Connection()
    assert b"".join(map(bytes, ours.pack_command(*args))) == b"".join(map(bytes, theirs.pack_command(*args)))


def test_a_large_command_is_framed_in_one_piece() -> None:
    """A coalesced reserve call (hundreds of arguments) is framed by hiredis in one call,
    one buffer: redis-py's own framing, one Python step per argument, cost about 7 µs per
    order of the service's CPU (issue 15)."""
    from flashsale.redis_client import ResetAwareConnection

    assert len(ResetAwareConnection().pack_command(*PACKED_ARGS[0])) == 1


@pytest.mark.parametrize("bad", [True, None, object()])
def test_a_command_redis_py_refuses_is_still_refused(bad: object) -> None:
    from redis.exceptions import DataError

    from flashsale.redis_client import ResetAwareConnection

    with pytest.raises(DataError):
        ResetAwareConnection().pack_command("SET", "k", bad)
