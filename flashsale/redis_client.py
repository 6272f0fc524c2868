"""The one place a Redis client is built (one server or a Redis Cluster, one pool policy),
and the one way a reply is read as text.

Every role asks :func:`connect` for its client with what it needs (a timeout, decoded
replies, how many re-sends, how long a command may wait for a connection); the pool
policy — a bounded pool, connect and socket timeouts, health checks on a single server —
is decided here.

A connection the network reset is a connection error, whatever the event loop: under uvloop
a write on a transport the peer already closed raises ``RuntimeError``, which redis-py passes
on as it is (the net-reset drill saw it answer 500 ``internal_error``);
:class:`ResetAwareConnection` turns it into the ``ConnectionError`` it is, which the client
re-sends and the service answers as 503 ``redis_unavailable``.

A full pool is not the caller's fault: redis-py's asyncio pools raise at once when every
connection is busy (a burst of payments past the pool's size got 503s while Redis was
healthy). Given ``wait_s``, a command waits its turn instead, first come first served,
and only a wait longer than ``wait_s`` fails (``ConnectionError("No connection
available.")``, as redis-py's ``BlockingConnectionPool`` words it). The turns are an
``asyncio.Semaphore``: free when a connection is free, so the common case costs what the
plain pool costs (``BlockingConnectionPool`` takes a lock, a condition and a timer per
command: measured about a third more client time for 200 GETs at once).

A node of a Redis Cluster reached by a client of one server (FLASHSALE_REDIS_CLUSTER
forgotten) answers PING and ROLE like any primary but MOVED for most keys: whether a server
is one is told here, once (:func:`says_cluster_node`, :func:`reaches_cluster_node`), for
every command and probe that asks, with the one line they stop with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

try:
    import hiredis
except ImportError:  # redis-py frames commands itself
    hiredis = None  # type: ignore[assignment]

from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "CLUSTER_NODE_AS_ONE_SERVER",
    "ConnectWatch",
    "RedisClient",
    "ResetAwareConnection",
    "TurnTakingCluster",
    "TurnTakingPool",
    "as_text",
    "cluster_node_as_one_server",
    "connect",
    "reaches_cluster_node",
    "refuses_client",
    "says_cluster_node",
]

#: What :func:`connect` builds: a client of one server, or of a Redis Cluster.
RedisClient: TypeAlias = "Redis | RedisCluster"

#: Connections a turn-taking cluster client may open per node beyond its turns: a
#: pipeline takes one connection per node and no turn.
PIPELINE_HEADROOM = 64


#: What hiredis frames exactly as redis-py's encoder encodes it, given UTF-8 (strict): bytes
#: as they are, text as UTF-8, whole numbers in decimal (bool, float and the rest go through
#: redis-py, which refuses or formats them its own way).
_FRAMED_AS_IS = frozenset((bytes, str, int))


class ResetAwareConnection(Connection):
    """A TCP connection to one server whose writes on a transport already closed under it
    (uvloop's ``RuntimeError``: "the handler is closed") raise ``ConnectionError``.

    Its commands are framed by hiredis (C) in one buffer when hiredis is installed and
    every argument is bytes, text or a whole number: redis-py's asyncio connections frame
    in Python, a step per argument, and the engine's coalesced reserve call carries 7 or
    more per order (about 7 µs of the service's CPU per order, issue 15). The bytes sent
    are the same (tests/test_redis_client.py compares them)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if (
            hiredis is not None
            and _FRAMED_AS_IS.issuperset(map(type, args))
            and encoder.encoding in ("utf-8", "utf8")
            and encoder.encoding_errors == "strict"
        ):
            first = args[0]  # "CONFIG GET": redis-py sends the words apart
            if (b" " if type(first) is bytes else " ") not in first:
                return [hiredis.pack_command(args)]
        return super().pack_command(*args)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:  # redis-py has disconnected it already
            raise RedisConnectionError(f"Error writing to {self.host}:{self.port}: {exc}") from exc


class _Turns:
    """``turns`` turns, taken in arrival order, waited for at most ``wait_s``."""

    def __init__(self, turns: int, wait_s: float) -> None:
        self._free = asyncio.Semaphore(turns)
        self._wait_s = wait_s

    async def take(self) -> None:
        if not self._free.locked():
            await self._free.acquire()  # returns at once: no timer on the common path
            return
        try:
            async with asyncio.timeout(self._wait_s):
                await self._free.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None

    def give_back(self) -> None:
        self._free.release()


class TurnTakingPool(ConnectionPool):
    """One server's connection pool whose callers wait (in arrival order, at most
    ``wait_s``) for one of its ``max_connections`` instead of failing when all are busy."""

    def __init__(self, *, wait_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turns = _Turns(self.max_connections, wait_s)
        self._holding: set[Any] = set()  # connections handed out with a turn

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns.take()
        try:
            connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # (redis-py releases a connection it failed to set up itself: that one was not
            # in _holding yet, so its turn is given back here, once.)
            self._turns.give_back()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._turns.give_back()


class TurnTakingCluster(RedisCluster):
    """A cluster client whose commands wait, in arrival order and at most ``wait_s``, for
    one of ``turns`` turns: what a ``BlockingConnectionPool`` does for one server (redis-py's
    cluster node pools raise ``MaxConnectionsError`` when full instead)."""

    def __init__(self, *args: Any, turns: int, wait_s: float, **kwargs: Any) -> None:
        kwargs["max_connections"] = turns + PIPELINE_HEADROOM
        super().__init__(*args, **kwargs)
        self._turns = _Turns(turns, wait_s)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns.take()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._turns.give_back()


class ConnectWatch:
    """A say in every connection a client opens, from its first to its last, for a role that
    must check each new connection before it carries a command (the fence guard asks each
    one which server it reached: a Redis restarted from an older copy is a new server).

    Given to :func:`connect` when the client is built, so that every connection of its pool
    calls :meth:`on_connect`; a watcher comes and goes with :meth:`watch`. With no watcher a
    connection sets itself up as it would without the watch.
    """

    Watcher = Callable[[Any], Awaitable[None]]

    def __init__(self) -> None:
        self._watcher: ConnectWatch.Watcher | None = None

    def watch(self, watcher: ConnectWatch.Watcher | None) -> None:
        """From now on, every new connection is handed to ``watcher`` once it is set up
        (None: to no one). The watcher may refuse it by raising a ``RedisError``."""
        self._watcher = watcher

    async def on_connect(self, connection: Any) -> None:
        await connection.on_connect()
        watcher = self._watcher
        if watcher is not None:
            await watcher(connection)


def connect(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float = 10.0,
    connect_timeout_s: float | None = None,
    decode: bool = False,
    resends: int | None = None,
    max_connections: int | None = None,
    wait_s: float | None = None,
    watch: ConnectWatch | None = None,
) -> RedisClient:
    """A client on ``url``: one server, or (``cluster``) a Redis Cluster ``url`` names a node
    of (it discovers the other shards and routes each key).

    ``resends``: how many times a command that timed out or lost its connection is sent
    again (None keeps redis-py's default). Scripts in this project are idempotent, so a
    re-send is safe, but each one adds a whole timeout before a caller hears "unknown".

    ``wait_s`` (with ``max_connections``): a command that finds all ``max_connections``
    busy waits up to that long for one, in arrival order, instead of failing at once.
    On a cluster ``max_connections`` is then the client's commands in flight.

    ``watch``: every connection the client opens is handed to it (one server only).
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
    queued = wait_s is not None and max_connections is not None
    if watch is not None:
        if cluster:
            raise ValueError("a connect watch sees one server's connections, not a cluster's")
        options["redis_connect_func"] = watch.on_connect
    if cluster:
        if queued:
            assert wait_s is not None and max_connections is not None
            return TurnTakingCluster.from_url(url, turns=max_connections, wait_s=wait_s, **options)
        if max_connections is not None:
            options["max_connections"] = max_connections
        return RedisCluster.from_url(url, **options)
    if max_connections is not None:
        options["max_connections"] = max_connections
    # (a unix:// or rediss:// URL names its own connection class, which from_url keeps)
    options["connection_class"] = ResetAwareConnection
    if queued:
        pool = TurnTakingPool.from_url(url, health_check_interval=30, wait_s=wait_s, **options)
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
    return Redis.from_url(url, health_check_interval=30, **options)


def as_text(value: Any) -> str:
    """A Redis reply (bytes, or whatever a decoding client gave) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------- a node of a Redis Cluster addressed as one server
#: Why a node of a Redis Cluster reached by a client of one server cannot be used, and what
#: to set: it answers PING and ROLE like any primary, but MOVED for most keys.
CLUSTER_NODE_AS_ONE_SERVER = (
    "a Redis Cluster node addressed as one server (its INFO says cluster_enabled:1; most keys "
    "would answer MOVED): set FLASHSALE_REDIS_CLUSTER=1"
)


def says_cluster_node(info: Any) -> bool:
    """True if a reply to ``INFO cluster`` says the server is a node of a Redis Cluster. The
    reply may be the error a pipeline kept in its place: a refused INFO (some proxies, an ACL
    without it) is no cluster node. The one test of the rule, for callers that pipeline INFO
    with their own commands (the readiness probe, the fence)."""
    return not isinstance(info, Exception) and str(info.get("cluster_enabled", 0)) == "1"


async def reaches_cluster_node(redis: RedisClient) -> bool:
    """True if ``redis``, a client of one server, reaches a node of a Redis Cluster (one round
    trip, ``INFO cluster``); False for a cluster client, which routes every key itself. The
    drivers' errors pass, but a refused INFO: see :func:`says_cluster_node`."""
    if isinstance(redis, RedisCluster):
        return False
    try:
        info: Any = await redis.info("cluster")
    except ResponseError as exc:
        info = exc
    return says_cluster_node(info)


def refuses_client(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing this client: a wrong or missing password, or an ACL
    user without the rights. A setting to fix (exit 64), never an outage to wait out; redis-py
    makes the first a ``ConnectionError``, so a retry loop must ask this before it waits."""
    return isinstance(exc, (AuthenticationError, NoPermissionError))


def cluster_node_as_one_server(url: str) -> str:
    """The one line every command stops with on such a node (``url`` as it may be shown)."""
    return f"Redis at {url} is {CLUSTER_NODE_AS_ONE_SERVER}"
