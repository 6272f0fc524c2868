"""Deadlines of one length for many requests, on one timer.

``asyncio.timeout`` arms a timer of the event loop per use and cancels it on the way out:
two timer operations per order on the hot path, which the profile of ``POST /api/orders``
showed. Every order waits on Redis for the same length of time, so their deadlines come
due in the order they were set: :class:`Deadlines` keeps them in a queue and arms one
timer, for the oldest deadline still running. A finished request only marks its entry;
the timer drops finished entries when it fires.

``async with deadlines():`` behaves as ``async with asyncio.timeout(seconds):`` does: when
the deadline passes, the task is cancelled and the block raises :class:`TimeoutError`; a
cancellation from elsewhere stays a cancellation. Entering and leaving a deadline never
waits, so a plain ``with deadlines():`` inside a task does the same without the two
coroutines ``async with`` makes (the order path's choice).
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

__all__ = ["Deadline", "Deadlines"]

_RUNNING, _EXPIRED, _DONE = 0, 1, 2
#: A timer may fire this much early (the loop's clock resolution); a deadline that close
#: counts as passed, as asyncio's own timers do, so the timer is not armed again for it.
_RESOLUTION_S = 0.001


class Deadline:
    """One task's deadline (from :class:`Deadlines`), entered with ``with`` or ``async with``."""

    __slots__ = ("_deadlines", "_task", "_cancelling", "_state", "when")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._state = _RUNNING
        self.when = 0.0  # the loop's time at which it passes

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
        task, self._task = self._task, None  # the queue may keep the entry a while: not the task
        if self._state == _EXPIRED:
            assert task is not None
            # As asyncio.timeout: our own cancellation becomes TimeoutError, unless
            # someone else asked to cancel the task as well.
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        else:
            self._state = _DONE

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
        self._queue: deque[Deadline] = deque()  # in the order they come due
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's

    def __call__(self) -> Deadline:
        return Deadline(self)

    def __len__(self) -> int:
        """Entries kept: running deadlines, and finished ones the timer has not dropped yet."""
        return len(self._queue)

    def _arm(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> None:
        deadline.when = loop.time() + self.seconds
        self._queue.append(deadline)
        if self._timer is None or self._loop is not loop:  # (a timer of a loop gone is no timer)
            self._loop = loop
            self._timer = loop.call_at(deadline.when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + _RESOLUTION_S
        queue = self._queue
        while queue:
            head = queue[0]
            if head._state == _RUNNING:
                if head.when > now:
                    self._timer = loop.call_at(head.when, self._fire)
                    return
                head._expire()
            queue.popleft()
