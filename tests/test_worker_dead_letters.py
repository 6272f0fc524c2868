"""A bad entry never blocks the others: it is found (the batch is split), set aside in the
sale's dead-letter stream with the error and its original fields, and acknowledged; the
rest of the batch is written. Entries that keep coming back uncommitted go there too."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from flashsale.streams import GROUP, dead_letter_key, ensure_group, events_key

pytestmark = pytest.mark.usefixtures("pipeline_pool")

KEY = events_key("fs", "d11")
DEAD = dead_letter_key("fs", "d11")


def reserved(n: int, **override: str) -> dict[str, str]:
    return {
        "type": "reserved",
        "order": f"d11.{n:06d}",
        "user": f"u{n}",
        "lines": "phone:1",
        "request": f"r{n}",
        "deadline": "1900000000000",
        "at": "1800000000000",
        **override,
    }


async def setup_stream(redis: Redis, entries: list[dict[str, str]]) -> list[str]:
    await redis.sadd("fs:sales", "d11")
    await ensure_group(redis, KEY)
    return [await redis.xadd(KEY, e) for e in entries]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    return [f for _, f in await redis.xrange(DEAD)]


async def test_a_value_postgres_refuses_is_set_aside_and_the_rest_written(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    # A NUL byte: Redis takes it, PostgreSQL text cannot hold it (SQLSTATE 22021). It only
    # fails inside PostgreSQL, so the whole batch fails first and must be split to find it.
    entries = [reserved(i) for i in range(50)]
    entries[37] = reserved(37, user="mallory\x00")
    ids = await setup_stream(text_redis, entries)
    async with writer_running(batch=1000, max_attempts=2) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.split_batches >= 1
    assert writer.stats.dead_letters == 1
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 49
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders WHERE order_id = 'd11.000037'") == 0
    (dead,) = await dead_letters(text_redis)
    assert dead["dead_stream_id"] == ids[37]
    assert "CharacterNotInRepertoire" in dead["dead_error"] and dead["dead_attempts"] == "2"
    # The original fields are kept, so the entry can be fixed and put back.
    assert {k: v for k, v in dead.items() if not k.startswith("dead_")} == entries[37]
    assert (await text_redis.xpending(KEY, GROUP))["pending"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "reserved", "order": "d11.x", "at": "1"},  # fields missing
        reserved(1, lines="phone"),  # no quantity
        reserved(1, lines="phone:0"),
        reserved(1, deadline="soon"),
        reserved(1, order="other-sale.123"),  # not this sale's order
        {"type": "teleported", "sku": "phone", "at": "1"},  # an event type the writer does not know
    ],
    ids=["missing-fields", "no-qty", "zero-qty", "bad-number", "foreign-order", "unknown-type"],
)
async def test_a_malformed_entry_is_set_aside_at_once(
    bad: dict[str, str], text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    await setup_stream(text_redis, [reserved(0), bad, reserved(2)])
    async with writer_running() as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 1 and writer.stats.split_batches == 0
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 2
    (dead,) = await dead_letters(text_redis)
    assert {k: v for k, v in dead.items() if not k.startswith("dead_")} == bad
    assert dead["dead_error"].startswith("EntryError")


async def test_an_entry_delivered_too_often_is_set_aside(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    """An entry that keeps coming back uncommitted (it crashed every worker that read it)
    is dead-lettered on its next delivery instead of crashing the next one too."""
    ids = await setup_stream(text_redis, [reserved(0), reserved(1)])
    for _ in range(3):  # three workers named w1 read it and died
        await text_redis.xreadgroup(GROUP, "w1", {KEY: "0" if _ else ">"}, count=1)
    async with writer_running(consumer="w1", max_deliveries=3, claim_interval_s=0) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 1
    (dead,) = await dead_letters(text_redis)
    assert dead["dead_stream_id"] == ids[0] and dead["dead_deliveries"] == "4"
    assert "delivered 4 times" in dead["dead_error"]
    assert [r["order_id"] for r in await pipeline_pool.fetch("SELECT order_id FROM orders")] == ["d11.000001"]


async def test_a_reclaimed_entry_delivered_too_often_is_set_aside(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    ids = await setup_stream(text_redis, [reserved(0)])
    await text_redis.xreadgroup(GROUP, "gone", {KEY: ">"}, count=1)
    await text_redis.xreadgroup(GROUP, "gone", {KEY: "0"}, count=1)
    async with writer_running(
        consumer="w2", max_deliveries=2, claim_idle_ms=50, claim_interval_s=0.05
    ) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.reclaimed == 1 and writer.stats.dead_letters == 1
    assert (await dead_letters(text_redis))[0]["dead_stream_id"] == ids[0]
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 0
