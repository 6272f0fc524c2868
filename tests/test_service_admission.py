"""Admission before inventory, and what a buyer hears when Redis does not answer: the
per-buyer rate limit, shedding past the in-flight limit (429 + Retry-After: concurrency is
what clients send, so its refusal is a 4xx), the local
sold-out shortcut (answered without running the reserve script, yet a retry still finds
its order), and 504 outcome_unknown followed by a retry with the same request id that
learns the truth."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from service_support import (
    FrozenRedis,
    Service,
    ServiceFactory,
    buyer,
    changed_keys,
    command_calls,
    dump_redis,
    expect_json,
    holds_of_request,
    new_id,
    start_service,  # noqa: F401  (fixture)
)


async def test_rate_limit_is_per_buyer_and_refills(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service(user_rate=4.0, user_burst=2)
    sku = new_id("sku")
    await service.create_sale({sku: 100})
    await expect_json(await service.order("bot", sku), 201)
    await expect_json(await service.order("bot", sku), 201)
    before = await dump_redis(redis_client)
    refused = await service.order("bot", sku)
    await expect_json(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    assert changed_keys(before, await dump_redis(redis_client)) == [], (
        "a rate-limited order reached the stock"
    )
    # Another buyer is not slowed down by the bot.
    await expect_json(await service.order("human", sku), 201)
    # 4 tokens a second: after 0.3 s there is one again.
    await asyncio.sleep(0.3)
    await expect_json(await service.order("bot", sku), 201)


async def test_invalid_requests_do_not_spend_the_buyers_rate(start_service: ServiceFactory) -> None:
    service = await start_service(user_rate=0.01, user_burst=1)
    sku = new_id("sku")
    await service.create_sale({sku: 10})
    for _ in range(3):
        await expect_json(await service.order("alice", sku, 0), 422, "invalid_quantity")
    await expect_json(await service.order("alice", sku, 1), 201)


async def test_sheds_with_429_past_the_in_flight_limit(
    start_service: ServiceFactory, redis_client: Redis, redis_url: str
) -> None:
    """Concurrency is something clients send, so being at capacity is answered with a 4xx
    (429 ``overloaded``, RFC 6585) and a Retry-After, never a 5xx, and touches nothing."""
    service = await start_service(max_in_flight=1, redis_timeout_s=5.0)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 10}))["sale"]
    async with FrozenRedis(redis_url, 0.8):
        # The first order is held up inside Redis; it occupies the one in-flight slot.
        stuck = asyncio.ensure_future(service.order("alice", sku, request_id="r-stuck"))
        while service.state.in_flight.current < 1:
            await asyncio.sleep(0.005)
        shed = await service.order("bob", sku, request_id="r-shed")
        body = await expect_json(shed, 429, "overloaded")
        assert int(shed.headers["Retry-After"]) >= 1
        assert "request_id" in body["message"] and "capacity" in body["message"]
    await expect_json(await stuck, 201)
    # The shed order reached no stock: no hold, and nothing of Bob's anywhere in Redis.
    assert await holds_of_request(redis_client, sale, "r-shed") == [], "a shed order left a hold"
    dump = await dump_redis(redis_client)
    assert not [key for key, (_, payload, _) in dump.items() if b"bob" in key or b"r-shed" in payload]
    # Shedding is about load, not about the buyer: the same request goes through now.
    await expect_json(await service.order("bob", sku, request_id="r-shed"), 201)
    assert service.state.in_flight.current == 0


async def _sold_out_and_cached(service: Service, redis_client: Redis) -> tuple[str, str, dict[str, Any]]:
    """A one-unit SKU Alice holds (request ``r-alice``), which this process has been told
    is sold out and now refuses from its cache: (sale, sku, Alice's order)."""
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 1}))["sale"]
    first = await expect_json(await service.order("alice", sku, request_id="r-alice"), 201)
    await expect_json(await service.order("bob", sku), 409, "sold_out")  # Redis says so; remembered
    return sale, sku, first


async def test_sold_out_refusals_skip_the_script_and_a_retry_still_finds_its_order(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service(sold_out_cache_s=60.0)
    sale, sku, first = await _sold_out_and_cached(service, redis_client)
    scripts = await command_calls(redis_client, "evalsha")
    for _ in range(5):
        body = await expect_json(await service.order("carol", sku), 409, "sold_out")
        assert body["sku"] == sku and body["available"] == 0
    assert await command_calls(redis_client, "evalsha") == scripts, "a cached sold-out refusal ran a script"

    # Alice did not hear her answer (a 504, a cut connection) and retries as any client
    # would, with the same request id and no special header: she learns she has the order,
    # although the SKU is marked sold out here.
    again = await expect_json(await service.order("alice", sku, request_id="r-alice"), 201)
    assert again["order_id"] == first["order_id"] and again["replayed"] is True
    assert await command_calls(redis_client, "evalsha") == scripts + 1
    assert await holds_of_request(redis_client, sale, "r-alice") == [first["order_id"]]
    # Her request id is hers alone: another buyer sending it still meets the shortcut.
    await expect_json(await service.order("carol", sku, request_id="r-alice"), 409, "sold_out")
    assert await command_calls(redis_client, "evalsha") == scripts + 1


async def test_no_header_takes_a_request_past_the_sold_out_shortcut(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """Any client could send ``X-Retry-Attempt``: it no longer sends a request to the
    reserve script (retries are recognised by their request id instead)."""
    service = await start_service(sold_out_cache_s=60.0)
    _, sku, _ = await _sold_out_and_cached(service, redis_client)
    scripts = await command_calls(redis_client, "evalsha")
    for attempt in ("1", "7"):
        retry = {"X-Retry-Attempt": attempt}
        await expect_json(await service.order("carol", sku, headers=retry), 409, "sold_out")
    assert await command_calls(redis_client, "evalsha") == scripts, (
        "a header made a sold-out order run a script"
    )


async def test_sold_out_shortcut_expires_because_cancels_return_stock(start_service: ServiceFactory) -> None:
    service = await start_service(sold_out_cache_s=0.3)
    sku = new_id("sku")
    await service.create_sale({sku: 1})
    held = await expect_json(await service.order("alice", sku), 201)
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 409, "sold_out")
    cancel = await service.client.post(f"/api/orders/{held['order_id']}/cancel", headers=buyer("alice"))
    await expect_json(cancel, 200)
    # The unit is back on sale, but this process still believes the SKU is sold out...
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 409, "sold_out")
    # ...only for sold_out_cache_s.
    await asyncio.sleep(0.35)
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 201)


async def test_redis_silent_is_504_outcome_unknown_and_a_retry_learns_the_outcome(
    start_service: ServiceFactory, redis_client: Redis, redis_url: str
) -> None:
    service = await start_service(redis_timeout_s=0.2)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    await expect_json(await service.order("warmup", sku), 201)  # connections and scripts ready

    async with FrozenRedis(redis_url, 1.2):
        unknown = await service.order("alice", sku, request_id="r-unknown")
        body = await expect_json(unknown, 504, "outcome_unknown")
        assert body["request_id"] == "r-unknown"
        assert "same request_id" in body["message"]

    # Redis woke up and may have run the reservation it had queued: the truth is in Redis.
    stored = await holds_of_request(redis_client, sale, "r-unknown")
    assert len(stored) <= 1
    retry = await service.order("alice", sku, request_id="r-unknown", headers={"X-Retry-Attempt": "1"})
    order = await expect_json(retry, 201)
    if stored:
        assert order["order_id"] == stored[0] and order["replayed"] is True
    else:
        assert order["replayed"] is False
    # Whichever way it went, exactly one hold and one unit for this request.
    assert await holds_of_request(redis_client, sale, "r-unknown") == [order["order_id"]]
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"]) == (3, 2)
    again = await expect_json(
        await service.order("alice", sku, request_id="r-unknown", headers={"X-Retry-Attempt": "2"}), 201
    )
    assert again["order_id"] == order["order_id"] and again["replayed"] is True


async def test_outcomes_are_counted(start_service: ServiceFactory) -> None:
    service: Service = await start_service(user_rate=0.01, user_burst=1)
    sku = new_id("sku")
    await service.create_sale({sku: 1})
    await expect_json(await service.order("alice", sku, request_id="r-1"), 201)
    await expect_json(await service.order("alice", sku, request_id="r-1"), 429, "rate_limited")
    await expect_json(await service.order("bob", sku, request_id="r-2"), 409, "sold_out")
    await expect_json(await service.order("carol", sku, 0), 422, "invalid_quantity")
    counts = service.state.metrics.counts
    assert (counts["created"], counts["rate_limited"], counts["sold_out"], counts["invalid"]) == (1, 1, 1, 1)
