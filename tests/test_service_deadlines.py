"""Deadlines on one timer (flashsale.service.deadlines) keep asyncio.timeout's contract: a
block that outlasts its deadline raises TimeoutError and leaves its task uncancelled, a
block that ends in time is untouched, a cancellation from elsewhere stays a cancellation —
whatever the other deadlines sharing the timer do. Each holds for ``async with`` and for a
plain ``with`` inside a task (the order path's form)."""

from __future__ import annotations

import asyncio

import pytest

from flashsale.service.deadlines import Deadlines

ENTRIES = pytest.mark.parametrize("entry", ["async with", "with"])


async def _outlast(deadlines: Deadlines, entry: str = "async with") -> None:
    if entry == "async with":
        async with deadlines() as deadline:
            await asyncio.Event().wait()  # never set: only the deadline ends this
    else:
        with deadlines() as deadline:
            await asyncio.Event().wait()
    raise AssertionError(f"the block ended without its deadline ({deadline.expired()=})")


@ENTRIES
async def test_a_block_that_outlasts_its_deadline_raises_timeout_error(entry: str) -> None:
    deadlines = Deadlines(0.05)
    with pytest.raises(TimeoutError):
        await _outlast(deadlines, entry)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancellation was the deadline's own
    await asyncio.sleep(0)  # and no cancellation is left pending on the task


async def test_blocks_that_end_in_time_are_untouched_and_forgotten_by_the_timer() -> None:
    deadlines = Deadlines(0.05)
    for n in range(1000):
        if n % 2:
            with deadlines() as deadline:
                await asyncio.sleep(0)
        else:
            async with deadlines() as deadline:
                await asyncio.sleep(0)
        assert not deadline.expired()
    # A later deadline comes due after all of them: once it has, the timer has passed over
    # (and dropped) every finished one before it.
    with pytest.raises(TimeoutError):
        await _outlast(deadlines)
    assert len(deadlines) == 0


async def test_a_finished_block_leaves_nothing_behind_and_none_passes_early() -> None:
    """A block that ends takes its deadline out at once: nothing a deadline's length of
    requests built up stays for the collector to walk (issue 15). And however the deadlines
    share their timers, none passes before its time."""
    deadlines = Deadlines(30.0)
    for _ in range(1000):
        with deadlines():
            await asyncio.sleep(0)
    assert len(deadlines) == 0
    loop = asyncio.get_running_loop()
    short = Deadlines(0.05)
    for _ in range(5):
        entered = loop.time()
        with pytest.raises(TimeoutError):
            await _outlast(short)
        assert loop.time() >= entered + 0.05


async def test_each_deadline_passes_in_its_turn_whatever_the_ones_before_it_did() -> None:
    deadlines = Deadlines(0.1)
    started = asyncio.Event()

    async def quick() -> str:
        async with deadlines():
            started.set()
            await asyncio.sleep(0)
        return "in time"

    async def slow() -> str:
        await started.wait()
        try:
            await _outlast(deadlines)
        except TimeoutError:
            return "timed out"
        return "not reached"

    # The first deadline (the timer's) ends early; the timer must be armed again for the next.
    assert await asyncio.gather(quick(), slow(), slow()) == ["in time", "timed out", "timed out"]


@ENTRIES
async def test_a_cancellation_from_elsewhere_stays_a_cancellation(entry: str) -> None:
    deadlines = Deadlines(30.0)
    task = asyncio.ensure_future(_outlast(deadlines, entry))
    await asyncio.sleep(0)  # the task runs first, up to its wait inside the block
    assert len(deadlines) == 1 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_error_inside_the_block_passes_through() -> None:
    deadlines = Deadlines(30.0)
    with pytest.raises(KeyError):
        async with deadlines():
            raise KeyError("mine")
    with pytest.raises(KeyError), deadlines():
        raise KeyError("mine too")


def test_a_deadline_is_kept_inside_a_task_only() -> None:
    async def outside() -> None:
        with Deadlines(1.0)():
            pass

    coroutine = outside()
    with pytest.raises(RuntimeError):  # run by hand: no task, and no loop either
        coroutine.send(None)
