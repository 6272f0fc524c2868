"""Loading the Lua scripts: ``lua/<name>.lua`` with ``-- @include <snippet>`` lines
replaced by ``lua/includes/<snippet>.lua``. Scripts are registered with redis-py's
Script objects, which run EVALSHA and reload the script on NOSCRIPT (after a Redis
restart or failover the script cache is empty). A coalesced batch, hundreds of arguments
in one call, is framed and sent by :class:`BatchScript` instead (same EVALSHA, same
NOSCRIPT reload, same re-send policy), at a fraction of the client's CPU."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

__all__ = [
    "ROOM_SCRIPT_NAMES",
    "SCRIPT_NAMES",
    "BatchScript",
    "frame",
    "register_all",
    "register_room",
    "script_source",
]

SCRIPT_NAMES = (
    "reserve",
    "confirm",
    "release",
    "expire",
    "stock",
    "adjust",
    "release_reserve",
    "transfer_begin",
    "transfer_out",
    "transfer_in",
    "transfer_due",
)
#: The waiting room's scripts (``_room.py``): registered by a WaitingRoom, not an Inventory.
ROOM_SCRIPT_NAMES = ("room_configure", "room_join", "room_poll", "room_use", "room_settle")
_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)


def _read(path: str) -> str:
    return resources.files("inventory").joinpath("lua", path).read_text(encoding="utf-8")


@cache
def script_source(name: str) -> str:
    """The full text of a script, includes inlined."""
    if name not in SCRIPT_NAMES and name not in ROOM_SCRIPT_NAMES:
        raise KeyError(name)
    return _INCLUDE.sub(lambda m: _read(f"includes/{m.group(1)}.lua"), _read(f"{name}.lua"))


def register_all(redis: Any) -> dict[str, Any]:
    """Register every script on a client; returns name -> callable Script object."""
    return {name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES}


def register_room(redis: Any) -> dict[str, Any]:
    """Register the waiting room's scripts on a client."""
    return {name: redis.register_script(script_source(name)) for name in ROOM_SCRIPT_NAMES}


class _BulkHeads(dict[int, bytes]):
    """``\\r\\n$<length>\\r\\n`` by length: the end of the previous element and the head
    of a bulk string, made once per length (lengths past 4096 are made each time)."""

    def __missing__(self, length: int) -> bytes:
        head = b"\r\n$%d\r\n" % length
        if length <= 4096:
            self[length] = head
        return head


_BULK_HEADS = _BulkHeads()


def frame(args: Sequence[bytes]) -> bytes:
    """Arguments framed as RESP bulk strings, each led by the CRLF that ends the element
    before it (``\\r\\n$<len>\\r\\n<bytes>``): a command is ``*<n>\\r\\n``, its first
    element, these, and a last CRLF. One pass, its loops in C: redis-py's asyncio connection
    frames argument by argument in Python, re-joining its buffer each time (its cost grows
    with the square of a batch's size)."""
    parts: list[bytes] = [b""] * (2 * len(args))
    parts[::2] = map(_BULK_HEADS.__getitem__, map(len, args))
    parts[1::2] = args
    return b"".join(parts)


class BatchScript:
    """A script called with a whole coalesced batch: its arguments framed here, in one pass,
    and sent over a connection of the client's own pool, as redis-py's ``execute_command``
    does (its retry policy re-sends after a timeout or a lost connection, the connection is
    dropped on error and returned to the pool after), minus the per-argument work.

    On a cluster client, or one with a single dedicated connection, the batch goes through
    redis-py's ``Script`` as any other script call does. NOSCRIPT (a Redis restarted or
    flushed) loads the script and sends the batch again, once, as ``Script`` does.
    """

    def __init__(self, redis: Any, script: Any, keys: list[str]) -> None:
        self._redis = redis
        self._script = script  # redis-py's Script: its sha and source, the generic path
        self._keys = keys
        # Everything before the arguments: EVALSHA <sha> <numkeys> <keys...>.
        self._head = b"$7\r\nEVALSHA" + frame(
            [script.sha.encode(), b"%d" % len(keys), *(k.encode() for k in keys)]
        )
        self._head_argc = 3 + len(keys)
        self._direct = isinstance(redis, Redis) and not redis.single_connection_client

    async def __call__(self, args: list[bytes]) -> Any:
        if not self._direct:
            return await self._script(keys=self._keys, args=args)
        command = b"*%d\r\n%b%b\r\n" % (self._head_argc + len(args), self._head, frame(args))
        pool = self._redis.connection_pool
        connection = await pool.get_connection()
        try:
            try:
                return await self._send(connection, command)
            except NoScriptError:
                await self._redis.script_load(self._script.script)
                return await self._send(connection, command)
        finally:
            await pool.release(connection)

    @staticmethod
    async def _send(connection: Any, command: bytes) -> Any:
        async def exchange() -> Any:
            await connection.send_packed_command(command)
            return await connection.read_response()

        async def drop(error: Exception) -> None:  # reconnects on the next send
            await connection.disconnect(error=error)

        return await connection.retry.call_with_retry(exchange, drop)
