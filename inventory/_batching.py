"""Coalescing: reserve calls made in the same event-loop turn travel as one script call.

A flash-sale service receives thousands of reservations per second for the same few
SKUs. One Redis round trip per reservation spends most of its time on the network and
the client; sending everything that arrived during one loop turn as a single
``reserve`` call (the script decides each request on its own, in order) multiplies
throughput. Each caller still gets its own result, and idempotency is per (buyer,
request id) inside the script, so coalescing changes nothing about the guarantees.
The engine's idempotency-record lookups (``made_hold``) are coalesced the same way, into
one HMGET.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Coalescer"]

Call = Callable[[list[Any]], Awaitable[list[Any]]]


class Coalescer:
    """Collects argument groups and sends them together; one future per caller.

    The first caller of a batch starts the batch's task, and the task's first step closes
    the batch and sends it: every caller of the same loop turn runs before that step, so
    they travel together (at most ``max_batch`` per batch: the next caller starts another).
    The task sends the batch itself, not a callback that starts a task: under load a loop
    turn runs many requests, and each hop between turns delays every order of the batch
    by a turn (issue 15: orders that all wait on Redis leave a service nothing to run)."""

    def __init__(self, call: Call, *, max_batch: int) -> None:
        self._call = call
        self._max_batch = max_batch
        self._open: list[tuple[list[Any], asyncio.Future[Any]]] | None = None  # taking callers
        self._in_flight: set[asyncio.Task[None]] = set()

    def submit(self, group: list[Any]) -> asyncio.Future[Any]:
        """Queue ``group`` for the next batch; await the returned future for its reply.
        (A plain function, not a coroutine: one object and one await fewer per caller.)"""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        batch = self._open
        if batch is None or len(batch) >= self._max_batch:
            batch = self._open = []
            task = loop.create_task(self._close_and_send(batch))
            self._in_flight.add(task)
            task.add_done_callback(functools.partial(self._done, batch))
        batch.append((group, future))
        return future

    async def _close_and_send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        if self._open is batch:
            self._open = None
        await self._send(batch)

    def _done(self, batch: list[tuple[list[Any], asyncio.Future[Any]]], task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            # Cancelled before its first step (a loop shutting down): the batch never left.
            # Its callers learn it rather than wait, and the next caller starts a batch.
            if self._open is batch:
                self._open = None
            for _, future in batch:
                future.cancel()

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        argv: list[Any] = [b"%d" % len(batch)]
        for group, _ in batch:
            argv.extend(group)
        try:
            replies = await self._call(argv)
        except BaseException as exc:  # every caller learns what happened to its request
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    async def drain(self) -> None:
        """Wait for batches already sent (used on shutdown)."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
