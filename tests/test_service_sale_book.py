"""The sale book's cache on the order path: a sale's settings and its SKU index are read
again *before* they lapse, while a caller still gets the cached answer, so at the peak no
order waits for a round trip each time an entry lapses — and nothing older than
``ttl_s`` is ever answered. Time is a clock the test moves, never a sleep."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from redis.asyncio import Redis

from flashsale.service.sales import SaleBook, SaleSettings, now_ms
from tests.redis_mode import single_server_only

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def at_once(call: Coroutine[Any, Any, T]) -> T:
    """The answer of a call that needs no round trip (it finishes without suspending)."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise AssertionError("the call waited (a round trip) instead of answering from memory")


@single_server_only("one server's keys are enough to show the cache's timing")
async def test_a_sale_read_again_before_it_lapses_is_answered_from_memory_after(redis_client: Redis) -> None:
    clock = Clock()
    book = SaleBook(redis_client, "fs", ttl_s=10.0, clock=clock)
    await book.create(SaleSettings("ahead", now_ms(), state="open"), ["ahead-sku"], ["ahead"])
    assert (await book.sale("ahead")) is not None and await book.sale_of_sku("ahead-sku") == "ahead"

    await redis_client.hset("fs:sale:ahead", "state", "closed")
    clock.now += 4  # fresh: from memory, nothing read again
    assert at_once(book.sale("ahead")).state == "open"  # type: ignore[union-attr]
    clock.now += 3  # past the refresh point, not yet lapsed: still the cached answer, at once...
    assert at_once(book.sale("ahead")).state == "open"  # type: ignore[union-attr]
    assert at_once(book.sale_of_sku("ahead-sku")) == "ahead"
    await book.settle()  # ...and meanwhile each was read again (once)
    clock.now += 5  # the first read has lapsed; the one made ahead of it answers, at once
    assert at_once(book.sale("ahead")).state == "closed"  # type: ignore[union-attr]
    assert at_once(book.sale_of_sku("ahead-sku")) == "ahead"


@single_server_only("one server's keys are enough to show the cache's timing")
async def test_nothing_older_than_the_ttl_is_answered(redis_client: Redis) -> None:
    """An entry nobody asked for between its refresh point and its lapse is read again
    by the next caller, who waits for it: never the lapsed answer."""
    clock = Clock()
    book = SaleBook(redis_client, "fs", ttl_s=10.0, clock=clock)
    await book.create(SaleSettings("stale", now_ms(), state="open"), ["stale-sku"], ["stale"])
    assert (await book.sale("stale")) is not None
    await redis_client.hset("fs:sale:stale", "state", "closed")
    clock.now += 10.5
    settings = await book.sale("stale")
    assert settings is not None and settings.state == "closed"


@single_server_only("one server's keys are enough to show the cache's timing")
async def test_the_cached_peeks_answer_what_the_book_holds_and_read_ahead_as_it_does(
    redis_client: Redis,
) -> None:
    """``cached_sale`` / ``cached_sale_of_sku`` answer from memory what ``sale`` /
    ``sale_of_sku`` would, start the same read ahead of a lapse, and say None — ask the
    book — for what it does not hold now: never a lapsed answer."""
    clock = Clock()
    book = SaleBook(redis_client, "fs", ttl_s=10.0, clock=clock)
    await book.create(SaleSettings("peek", now_ms(), state="open"), ["peek-sku"], ["peek"])
    assert book.cached_sale("peek") is None and book.cached_sale_of_sku("peek-sku") is None
    assert (await book.sale("peek")) is not None and await book.sale_of_sku("peek-sku") == "peek"
    assert book.cached_sale("peek") == await book.sale("peek")
    assert book.cached_sale_of_sku("peek-sku") == "peek"

    await redis_client.hset("fs:sale:peek", "state", "closed")
    clock.now += 7  # past the refresh point: the cached answer, and a read ahead started
    cached = book.cached_sale("peek")
    assert cached is not None and cached.state == "open"
    await book.settle()
    clock.now += 5  # the first read lapsed; the one made ahead of it is what is held
    cached = book.cached_sale("peek")
    assert cached is not None and cached.state == "closed"

    clock.now += 11  # nobody asked meanwhile: everything lapsed, nothing stale is answered
    assert book.cached_sale("peek") is None and book.cached_sale_of_sku("peek-sku") is None
    assert book.cached_sale_of_sku("no-such-sku") is None
