"""GET /api/skus/{sku}: the product page's availability — its states, its short local
cache (cheap at the peak), 404 for unknown SKUs, and the degraded-site switch."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis
from service_support import (
    ADMIN,
    ServiceFactory,
    command_calls,
    expect_json,
    new_id,
    start_service,  # noqa: F401  (fixture)
)


async def test_in_stock_then_low_then_sold_out(start_service: ServiceFactory) -> None:
    service = await start_service(sku_cache_s=0.0)
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 5, "low_stock_line": 2}]))["sale"]
    page = await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
    assert page == {
        "sku": sku,
        "sale": sale,
        "state": "in_stock",
        "available": 5,
        "opens_at": page["opens_at"],
        "open": True,
    }
    await expect_json(await service.order("alice", sku, 3), 201)
    page = await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
    assert (page["state"], page["available"]) == ("low", 2)
    await expect_json(await service.order("bob", sku, 2), 201)
    page = await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
    assert (page["state"], page["available"]) == ("sold_out", 0)


async def test_reserve_pool_is_not_on_sale(start_service: ServiceFactory) -> None:
    service = await start_service(sku_cache_s=0.0)
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10, "reserve": 4}])
    assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["available"] == 6


async def test_before_t0_the_page_shows_the_opening_time(start_service: ServiceFactory) -> None:
    service = await start_service(sku_cache_s=0.0)
    sku = new_id("sku")
    await service.create_sale({sku: 5}, opens_at="2099-11-11T00:00:00+08:00")
    page = await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
    assert (page["open"], page["opens_at"], page["state"]) == (False, "2099-11-10T16:00:00.000Z", "in_stock")


async def test_closed_sale_page_is_not_open(start_service: ServiceFactory) -> None:
    service = await start_service(sku_cache_s=0.0)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    await expect_json(await service.client.post(f"/api/admin/sales/{sale}/close", headers=ADMIN), 200)
    assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["open"] is False


async def test_page_is_cached_forsku_cache_s_without_asking_redis(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service(sku_cache_s=1.0)
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["available"] == 5
    cached_until = time.monotonic() + 1.0
    await expect_json(await service.order("alice", sku), 201)
    reads = await command_calls(redis_client, "hmget")
    for _ in range(5):
        assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["available"] == 5
    assert time.monotonic() < cached_until, "the machine was too slow to see the cache"
    assert await command_calls(redis_client, "hmget") == reads, "a cached page read the stock"
    await asyncio.sleep(max(0.0, cached_until - time.monotonic()) + 0.05)
    assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["available"] == 4


async def test_restock_refreshes_the_page_at_once(start_service: ServiceFactory) -> None:
    service = await start_service(sku_cache_s=60.0)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 1}))["sale"]
    await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
    resp = await service.client.post(
        f"/api/admin/sales/{sale}/skus/{sku}/restock", json={"units": 4}, headers=ADMIN
    )
    await expect_json(resp, 200)
    assert (await expect_json(await service.client.get(f"/api/skus/{sku}"), 200))["available"] == 5


async def test_unknown_sku_is_404(start_service: ServiceFactory) -> None:
    service = await start_service()
    await service.create_sale({new_id("sku"): 1})
    for sku in ("nope", "x" * 200, "%C3%A9t%C3%A9"):
        body = await expect_json(await service.client.get(f"/api/skus/{sku}"), 404, "unknown_sku")
        assert "sku" in body


async def test_browse_switched_off_is_503_degraded_while_orders_go_on(start_service: ServiceFactory) -> None:
    service = await start_service(sale_cache_s=0.3)
    other = await start_service(sale_cache_s=0.3)
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    await expect_json(await other.client.get(f"/api/skus/{sku}"), 200)
    switched = await service.client.post("/api/admin/switches", json={"browse": False}, headers=ADMIN)
    assert await expect_json(switched, 200) == {"browse": False, "order_lookup": True}
    resp = await service.client.get(f"/api/skus/{sku}")
    await expect_json(resp, 503, "degraded")
    assert int(resp.headers["Retry-After"]) >= 1
    await expect_json(await service.order("alice", sku), 201)
    # The other process follows within its sale_cache_s.
    await asyncio.sleep(0.35)
    await expect_json(await other.client.get(f"/api/skus/{sku}"), 503, "degraded")
    await expect_json(
        await service.client.post("/api/admin/switches", json={"browse": True}, headers=ADMIN), 200
    )
    await expect_json(await service.client.get(f"/api/skus/{sku}"), 200)
