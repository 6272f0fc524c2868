"""Deadlines of one length for many requests, on a few timers.

``asyncio.timeout`` arms a timer of the event loop per use and cancels it on the way out:
two timer operations per order on the hot path, which the profile of ``POST /api/orders``
showed. Every order waits on Redis for the same length of time, so :class:`Deadlines`
groups them by when they come due: time is cut into slots of 1/64 of the length, each
slot keeps the set of its deadlines still running and arms one timer, for the slot's end.
A request that finishes takes its deadline out of its slot's set, so nothing outlives its
request: an earlier version kept every deadline in a queue until the timer passed it, a
deadline's length of objects (~28,000 at 7,000 orders/s and 4 s) that the garbage collector
walked again and again — 22k instructions per order, 5% of it (callgrind, issue 15). A
deadline passes at most a slot (1/64 of its length) late, never early.

``async with deadlines():`` behaves as ``async with asyncio.timeout(seconds):`` does: when
the deadline passes, the task is cancelled and the block raises :class:`TimeoutError`; a
cancellation from elsewhere stays a cancellation. Entering and leaving a deadline never
waits, so a plain ``with deadlines():`` inside a task does the same without the two
coroutines ``async with`` makes (the order path's choice).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

__all__ = ["Deadline", "Deadlines"]

_RUNNING, _EXPIRED, _DONE = 0, 1, 2
#: Slots per deadline length: a deadline passes at most 1/SLOTS of its length late.
SLOTS = 64
#: A timer may fire this much early (the loop's clock resolution): a deadline's slot ends at
#: least this long after it, so an early timer still passes no deadline before its time.
_RESOLUTION_S = 0.001


class Deadline:
    """One task's deadline (from :class:`Deadlines`), entered with ``with`` or ``async with``."""

    __slots__ = ("_deadlines", "_task", "_cancelling", "_state", "when", "_slot")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._state = _RUNNING
        self.when = 0.0  # the loop's time at which it passes
        self._slot: set[Deadline] | None = None  # the running deadlines of its slot

    def expired(self) -> bool:
        return self._state == _EXPIRED

    def __enter__(self) -> Deadline:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline is kept inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines._arm(self, loop)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if self._state == _EXPIRED:
            assert task is not None
            # As asyncio.timeout: our own cancellation becomes TimeoutError, unless
            # someone else asked to cancel the task as well.
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        else:
            self._state = _DONE
            if self._slot is not None:
                self._slot.discard(self)
                self._slot = None

    async def __aenter__(self) -> Deadline:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _expire(self) -> None:
        assert self._task is not None
        self._state = _EXPIRED
        self._task.cancel()


class Deadlines:
    """Deadlines ``seconds`` after they are entered; ``deadlines()`` makes one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._width = seconds / SLOTS  # of a slot, in the loop's seconds
        self._slots: dict[int, set[Deadline]] = {}  # slot number -> its deadlines still running
        self._loop: asyncio.AbstractEventLoop | None = None  # the timers'

    def __call__(self) -> Deadline:
        return Deadline(self)

    def __len__(self) -> int:
        """Deadlines running."""
        return sum(len(running) for running in self._slots.values())

    def _arm(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> None:
        deadline.when = when = loop.time() + self.seconds
        slot = math.ceil((when + _RESOLUTION_S) / self._width)
        running = self._slots.get(slot)
        if running is None or self._loop is not loop:  # (a timer of a loop gone is no timer)
            if self._loop is not loop:
                self._loop, self._slots = loop, {}
            running = self._slots[slot] = set()
            loop.call_at(slot * self._width, self._fire, slot)
        running.add(deadline)
        deadline._slot = running

    def _fire(self, slot: int) -> None:
        for deadline in self._slots.pop(slot, ()):
            deadline._slot = None
            deadline._expire()
