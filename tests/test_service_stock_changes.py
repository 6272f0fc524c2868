"""Operators adding stock: restock and release-reserve — their answers and refusals,
and that a SKU this process (or another one sharing Redis) refused from its sold-out
cache becomes orderable as soon as the stock is back."""

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
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)


def _path(sale: str, sku: str, action: str) -> str:
    return f"/api/admin/sales/{sale}/skus/{sku}/{action}"


async def test_restock_adds_to_total_and_available(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 5, "reserve": 2}]))["sale"]
    await expect_json(await service.order("alice", sku, 1), 201)
    body = await expect_json(
        await service.client.post(_path(sale, sku, "restock"), json={"units": 10}, headers=ADMIN), 200
    )
    assert body == {
        "sku": sku,
        "total": 15,
        "available": 12,
        "held": 1,
        "sold": 0,
        "reserve": 2,
        "state": "in_stock",
    }
    counters = await service.sku_counters(sale, sku)
    assert (counters["total"], counters["available"], counters["held"], counters["reserve"]) == (15, 12, 1, 2)


async def test_release_reserve_part_then_all(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 10, "reserve": 4}]))["sale"]
    part = await expect_json(
        await service.client.post(_path(sale, sku, "release-reserve"), json={"units": 1}, headers=ADMIN), 200
    )
    assert (part["total"], part["available"], part["reserve"]) == (10, 7, 3)
    rest = await expect_json(
        await service.client.post(_path(sale, sku, "release-reserve"), headers=ADMIN), 200
    )
    assert (rest["total"], rest["available"], rest["reserve"]) == (10, 10, 0)


@pytest.mark.parametrize(
    ("action", "body", "status", "code"),
    [
        ("restock", None, 422, "invalid_request"),
        ("restock", {}, 422, "invalid_request"),
        ("restock", {"units": 0}, 422, "invalid_request"),
        ("restock", {"units": -3}, 422, "invalid_request"),
        ("restock", {"units": 1.5}, 422, "invalid_request"),
        ("restock", {"units": "3"}, 422, "invalid_request"),
        ("restock", {"units": True}, 422, "invalid_request"),
        ("restock", {"units": 10**12}, 422, "invalid_request"),
        ("release-reserve", {"units": 0}, 422, "invalid_request"),
        ("release-reserve", {"units": 5}, 409, "insufficient_stock"),
        ("release-reserve", {"units": "all"}, 422, "invalid_request"),
        ("restock", [1], 422, "malformed_json"),
    ],
)
async def test_refused_stock_changes_change_nothing(
    service: Service, redis_client: Redis, action: str, body: Any, status: int, code: str
) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 10, "reserve": 4}]))["sale"]
    before = await dump_redis(redis_client)
    kwargs = {} if body is None else {"json": body}
    await expect_json(
        await service.client.post(_path(sale, sku, action), headers=ADMIN, **kwargs), status, code
    )
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_unknown_sale_is_404_and_unknown_sku_is_422(service: Service, redis_client: Redis) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 1}))["sale"]
    before = await dump_redis(redis_client)
    for action in ("restock", "release-reserve"):
        await expect_json(
            await service.client.post(_path("no-such-sale", sku, action), json={"units": 1}, headers=ADMIN),
            404,
            "sale_not_found",
        )
        await expect_json(
            await service.client.post(_path("Bad_Sale!", sku, action), json={"units": 1}, headers=ADMIN),
            404,
            "sale_not_found",
        )
        await expect_json(
            await service.client.post(_path(sale, "other", action), json={"units": 1}, headers=ADMIN),
            422,
            "unknown_sku",
        )
        await expect_json(
            await service.client.post(_path(sale, "b%C3%A4d", action), json={"units": 1}, headers=ADMIN),
            422,
            "invalid_request",
        )
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def _sold_out_and_cached(service: Service, redis_client: Redis, **spec: Any) -> tuple[str, str]:
    """A sale whose one SKU is sold out, and this process refusing it from its cache."""
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, **spec}]))["sale"]
    await expect_json(await service.order("alice", sku, spec["stock"] - spec.get("reserve", 0)), 201)
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 409, "sold_out")
    scripts = await command_calls(redis_client, "evalsha")
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 409, "sold_out")
    assert await command_calls(redis_client, "evalsha") == scripts, (
        "precondition: the refusal came from the cache"
    )
    return sale, sku


@pytest.mark.parametrize(
    ("action", "spec"), [("restock", {"stock": 1}), ("release-reserve", {"stock": 3, "reserve": 1})]
)
async def test_stock_back_clears_this_processs_sold_out_cache_at_once(
    start_service: ServiceFactory, redis_client: Redis, action: str, spec: dict[str, int]
) -> None:
    service = await start_service(sold_out_cache_s=60.0)
    sale, sku = await _sold_out_and_cached(service, redis_client, **spec)
    await expect_json(
        await service.client.post(_path(sale, sku, action), json={"units": 1}, headers=ADMIN), 200
    )
    await expect_json(await service.order("bob", sku, request_id="r-bob"), 201)


async def test_stock_back_reaches_another_processs_cache_within_sale_cache_s(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    sale_cache_s = 0.3
    operator = await start_service(sold_out_cache_s=60.0, sale_cache_s=sale_cache_s)
    shop = await start_service(sold_out_cache_s=60.0, sale_cache_s=sale_cache_s)
    sale, sku = await _sold_out_and_cached(shop, redis_client, stock=1)

    await expect_json(
        await operator.client.post(_path(sale, sku, "restock"), json={"units": 1}, headers=ADMIN), 200
    )
    restocked = time.monotonic()
    # Same request id each time: refusals are not stored, and the one that succeeds makes
    # exactly one hold whatever the number of attempts.
    while True:
        resp = await shop.order("bob", sku, request_id="r-bob")
        if resp.status == 201:
            break
        await expect_json(resp, 409, "sold_out")
        assert time.monotonic() - restocked < sale_cache_s + 0.5, (
            "the other process kept refusing the restocked SKU"
        )
        await asyncio.sleep(0.02)
    assert (await shop.sku_counters(sale, sku))["held"] == 2
