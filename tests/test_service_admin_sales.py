"""Operators creating and steering sales: POST /api/admin/sales (validation before the
first write, sale_exists, sku_taken), GET /api/admin/sales/{sale}, open and close."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    ADMIN,
    Service,
    ServiceFactory,
    changed_keys,
    command_calls,
    dump_redis,
    expect_json,
    new_id,
    now_ms,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.keys import ServiceKeys
from flashsale.service.sales import SaleBook
from inventory import SaleKeys


async def test_create_sale_with_every_setting(service: Service, redis_client: Redis) -> None:
    body = {
        "sale": "d11-2026",
        "opens_at": "2026-11-11T00:00:00+08:00",
        "early_access_s": 600,
        "hold_ttl_s": 900,
        "skus": [
            {"sku": "phone", "stock": 100, "reserve": 20, "limit_per_user": 2, "low_stock_line": 10},
            {"sku": "case", "stock": 5},
        ],
    }
    created = await expect_json(await service.client.post("/api/admin/sales", json=body, headers=ADMIN), 201)
    assert created["sale"] == "d11-2026"
    assert created["opens_at"] == "2026-11-10T16:00:00.000Z"
    assert created["opens_at_ms"] == 1_794_326_400_000
    assert (created["early_access_ms"], created["hold_ttl_ms"], created["state"]) == (
        600_000,
        900_000,
        "scheduled",
    )
    assert created["skus"]["phone"] == {
        "total": 100,
        "available": 80,
        "held": 0,
        "sold": 0,
        "reserve": 20,
        "limit_per_user": 2,
        "low_stock_line": 10,
        "state": "in_stock",
    }
    assert created["skus"]["case"]["total"] == 5 and created["skus"]["case"]["limit_per_user"] == 0
    assert await redis_client.smembers("fs:sales") == {b"d11-2026"}
    assert await redis_client.hgetall("fs:skus") == {b"phone": b"d11-2026", b"case": b"d11-2026"}
    shown = await expect_json(await service.client.get("/api/admin/sales/d11-2026", headers=ADMIN), 200)
    assert shown == created


async def test_defaults_open_now_with_a_30_minute_hold(service: Service) -> None:
    before = now_ms()
    created = await service.create_sale({new_id("sku"): 1}, sale="plain")
    assert created["hold_ttl_ms"] == 30 * 60 * 1000
    assert created["state"] == "open" and before <= created["opens_at_ms"] <= now_ms()


VALID_SKU = {"sku": "ok-sku", "stock": 5}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"skus": [VALID_SKU]}, "sale"),
        ({"sale": "Upper", "skus": [VALID_SKU]}, "sale"),
        ({"sale": "x" * 33, "skus": [VALID_SKU]}, "sale"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": "2026-11-11T00:00:00"}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": "tomorrow"}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": -1}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": 10**30}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": "0001-01-01T00:00:00+14:00"}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "opens_at": True}, "opens_at"),
        ({"sale": "s", "skus": [VALID_SKU], "early_access_s": -1}, "early_access_s"),
        ({"sale": "s", "skus": [VALID_SKU], "early_access_s": 1.5}, "early_access_s"),
        ({"sale": "s", "skus": [VALID_SKU], "hold_ttl_s": 0}, "hold_ttl_s"),
        ({"sale": "s", "skus": [VALID_SKU], "hold_ttl_s": "30m"}, "hold_ttl_s"),
        ({"sale": "s", "skus": [VALID_SKU], "hold_ttl_s": 10**9}, "hold_ttl_s"),
        ({"sale": "s", "skus": []}, "skus"),
        ({"sale": "s", "skus": {"ok-sku": 5}}, "skus"),
        ({"sale": "s", "skus": [VALID_SKU] * 2}, "sku"),
        ({"sale": "s", "skus": [VALID_SKU, "phone"]}, "skus"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "b\u00e4d", "stock": 1}]}, "sku"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "x" * 65, "stock": 1}]}, "sku"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "nostock"}]}, "stock"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "neg", "stock": -1}]}, "stock"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "big", "stock": 10**10}]}, "stock"),
        ({"sale": "s", "skus": [VALID_SKU, {"sku": "pool", "stock": 2, "reserve": 3}]}, "reserve"),
        (
            {"sale": "s", "skus": [VALID_SKU, {"sku": "lim", "stock": 2, "limit_per_user": "2"}]},
            "limit_per_user",
        ),
        (
            {"sale": "s", "skus": [VALID_SKU, {"sku": "low", "stock": 2, "low_stock_line": False}]},
            "low_stock_line",
        ),
    ],
)
async def test_invalid_sale_is_refused_before_anything_is_written(
    service: Service, redis_client: Redis, body: dict[str, Any], field: str
) -> None:
    await service.create_sale({new_id("sku"): 1})  # something in Redis to keep unchanged
    before = await dump_redis(redis_client)
    refused = await expect_json(
        await service.client.post("/api/admin/sales", json=body, headers=ADMIN), 422, "invalid_request"
    )
    assert refused["field"] == field
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_existing_sale_is_refused_and_kept(service: Service, redis_client: Redis) -> None:
    await service.create_sale({"first-sku": 5}, sale="dup")
    before = await dump_redis(redis_client)
    await service.create_sale({"other-sku": 9}, sale="dup", expect=409)
    refused = await service.client.post(
        "/api/admin/sales", json={"sale": "dup", "skus": [{"sku": "x", "stock": 1}]}, headers=ADMIN
    )
    await expect_json(refused, 409, "sale_exists")
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_sku_of_another_sale_is_refused_and_nothing_is_written(
    service: Service, redis_client: Redis
) -> None:
    await service.create_sale({"phone": 5, "case": 5}, sale="first")
    before = await dump_redis(redis_client)
    body = {"sale": "second", "skus": [{"sku": "fresh", "stock": 1}, {"sku": "case", "stock": 3}]}
    refused = await expect_json(
        await service.client.post("/api/admin/sales", json=body, headers=ADMIN), 409, "sku_taken"
    )
    assert refused["skus"] == ["case"]
    assert changed_keys(before, await dump_redis(redis_client)) == [], "a refused sale left keys behind"
    await expect_json(
        await service.client.get("/api/admin/sales/second", headers=ADMIN), 404, "sale_not_found"
    )
    # The SKU the refused sale would have had is still free.
    await service.create_sale({"fresh": 1}, sale="second")


async def test_open_now_and_close(service: Service) -> None:
    sku = new_id("sku")
    opens_at = now_ms() + 3_600_000
    sale = (await service.create_sale({sku: 5}, opens_at=opens_at))["sale"]
    await expect_json(await service.order("alice", sku), 409, "sale_not_open")
    opened = await expect_json(await service.client.post(f"/api/admin/sales/{sale}/open", headers=ADMIN), 200)
    assert opened["state"] == "open" and opened["opens_at_ms"] <= now_ms()
    await expect_json(await service.order("alice", sku), 201)
    closed = await expect_json(
        await service.client.post(f"/api/admin/sales/{sale}/close", headers=ADMIN), 200
    )
    assert closed["state"] == "closed"
    shown = await expect_json(await service.client.get(f"/api/admin/sales/{sale}", headers=ADMIN), 200)
    assert shown["state"] == "closed" and shown["skus"][sku]["held"] == 1


@pytest.mark.parametrize("sale", ["nope", "UPPER", "x" * 40, "%C3%A9"])
async def test_unknown_sale_is_404_everywhere(service: Service, sale: str) -> None:
    await expect_json(
        await service.client.get(f"/api/admin/sales/{sale}", headers=ADMIN), 404, "sale_not_found"
    )
    for action in ("open", "close"):
        await expect_json(
            await service.client.post(f"/api/admin/sales/{sale}/{action}", headers=ADMIN),
            404,
            "sale_not_found",
        )


async def test_a_sku_of_a_removed_sale_goes_on_sale_again(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """An operator removes a finished sale from Redis and puts its SKU in a new sale
    (through another process): the process that sold the SKU before takes orders for the
    new sale within its cache time, without a restart."""
    seller = await start_service(sale_cache_s=0.1)
    admin = await start_service()
    sku = new_id("sku")
    old = (await seller.create_sale({sku: 3}))["sale"]
    await expect_json(await seller.order("alice", sku), 201)
    keys = ServiceKeys("fs")
    await redis_client.delete(keys.sale(old), *SaleKeys("fs", old).all())
    await redis_client.hdel(keys.skus, sku)
    await redis_client.srem(keys.sales, old)
    new = (await admin.create_sale({sku: 5}))["sale"]
    deadline = time.monotonic() + 10
    while (resp := await seller.order("alice", sku)).status != 201:
        await expect_json(resp, 422, "unknown_sku")  # stale for a moment, and changes nothing
        assert time.monotonic() < deadline, "the process never saw the SKU's new sale"
        await asyncio.sleep(0.02)
    assert (await expect_json(resp, 201))["sale"] == new
    assert (await seller.sku_counters(new, sku))["held"] == 1


async def test_the_sku_index_is_reread_within_the_cache_time(redis_client: Redis) -> None:
    """Bounded staleness, like the sale settings: a SKU moved to another sale is seen there
    once ``ttl_s`` has passed."""
    book = SaleBook(redis_client, "fs", ttl_s=0.05)
    sku = new_id("sku")
    await redis_client.hset(ServiceKeys("fs").skus, sku, "first")
    assert await book.sale_of_sku(sku) == "first"
    await redis_client.hset(ServiceKeys("fs").skus, sku, "second")
    deadline = time.monotonic() + 10
    while await book.sale_of_sku(sku) != "second":
        assert time.monotonic() < deadline, "the SKU index was never read again"
        await asyncio.sleep(0.01)


async def test_orders_arriving_while_the_sale_book_is_read_share_that_read(redis_client: Redis) -> None:
    """At the peak, a lapsed sale-book entry is read once: the orders that arrive while
    that read is on its way wait for it instead of each sending their own (one HGET and one
    HGETALL per order when the entry lapsed, under load, before)."""
    book = SaleBook(redis_client, "fs", ttl_s=60)
    sku, sale = new_id("sku"), new_id("sale")
    await redis_client.hset(ServiceKeys("fs").skus, sku, sale)
    await redis_client.hset(ServiceKeys("fs").sale(sale), mapping={"opens_at_ms": 1, "state": "open"})
    hget, hgetall = await command_calls(redis_client, "hget"), await command_calls(redis_client, "hgetall")
    found = await asyncio.gather(*(book.sale_of_sku(sku) for _ in range(50)))
    settings = await asyncio.gather(*(book.sale(sale) for _ in range(50)))
    assert found == [sale] * 50 and {s.state if s else None for s in settings} == {"open"}
    assert await command_calls(redis_client, "hget") - hget == 1
    assert await command_calls(redis_client, "hgetall") - hgetall == 1
    # A read asked to be fresh (after a write) never takes one started before it.
    await redis_client.hset(ServiceKeys("fs").sale(sale), "state", "closed")
    stale, fresh = await asyncio.gather(book.sale(sale), book.sale(sale, fresh=True))
    assert stale is not None and fresh is not None and fresh.state == "closed"
