"""A bad entry never blocks the others: it is found (the batch is split), set aside in the
sale's dead-letter stream with the error and its original fields, and acknowledged; the
rest of the batch is written. Entries that keep coming back uncommitted go there too. A
reservation call's entry of many holds is set aside once, whole."""

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


def reserved_batch(first: int, n: int, users: dict[int, str] | None = None) -> dict[str, str]:
    """A reservation call's entry: holds d11.<first> .. d11.<first + n - 1>."""
    fields = {"type": "reserved_batch", "at": "1800000000000"}
    for i in range(first, first + n):
        fields[f"d11.{i:06d}"] = f"{(users or {}).get(i, f'u{i}')} phone:1 r{i} 1900000000000"
    return fields


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
        # A reservation call's entry is read whole: one bad hold refuses all of it.
        {**reserved_batch(10, 2), "other-sale.123": "u9 phone:1 r9 1900000000000"},
        {**reserved_batch(10, 2), "d11.000011": "u11 phone:1 r11"},
    ],
    ids=[
        "missing-fields",
        "no-qty",
        "zero-qty",
        "bad-number",
        "foreign-order",
        "unknown-type",
        "batch-foreign-order",
        "batch-bad-hold",
    ],
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


async def test_a_reservation_call_with_refused_holds_is_set_aside_once_and_its_other_holds_written(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    """Two holds of one entry PostgreSQL refuses: the batch is split down to single holds,
    the entry is dead-lettered once (not once per refused hold) and acknowledged by it, and
    its 18 other holds are written like every other entry's."""
    bad = reserved_batch(100, 20, users={105: "mallory\x00", 112: "trudy\x00"})
    entries = [reserved(0), bad, reserved_batch(200, 3), reserved(1)]
    ids = await setup_stream(text_redis, entries)
    async with writer_running(batch=1000, max_attempts=2) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 1 and writer.stats.split_batches >= 1
    assert writer.stats.entries_committed == 3  # acknowledged once each: the other three
    (dead,) = await dead_letters(text_redis)
    assert dead["dead_stream_id"] == ids[1] and dead["dead_attempts"] == "2"
    assert "CharacterNotInRepertoire" in dead["dead_error"]
    assert {k: v for k, v in dead.items() if not k.startswith("dead_")} == bad
    written = {r["order_id"] for r in await pipeline_pool.fetch("SELECT order_id FROM orders")}
    assert written == {
        "d11.000000",
        "d11.000001",
        *(f"d11.{i:06d}" for i in range(100, 120) if i not in (105, 112)),
        *(f"d11.{i:06d}" for i in range(200, 203)),
    }
    assert (await text_redis.xpending(KEY, GROUP))["pending"] == 0


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
