"""A sale split into buckets (``"buckets": N``) behaves like any other sale through the
API: it sells out exactly, per-user limits hold, orders are found, paid and cancelled by
their id (which names the bucket), and the admin view and metrics add the buckets up."""

from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis
from service_support import (
    ADMIN,
    Service,
    buyer,
    expect_json,
    new_id,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from inventory import BucketedInventory


async def test_bucketed_sale_sells_out_exactly_through_the_api(service: Service, redis_client: Redis) -> None:
    sale, sku = new_id("sale"), new_id("sku")
    created = await service.create_sale(
        [{"sku": sku, "stock": 40, "limit_per_user": 2}], sale=sale, buckets=4
    )
    assert created["buckets"] == 4 and created["skus"][sku]["available"] == 40
    # Every bucket's event stream is registered for the order writer.
    registered = {m.decode() for m in await redis_client.smembers("fs:sales")}
    assert {f"{sale}-b{k}" for k in range(4)} <= registered

    async def attempt(i: int) -> int:
        resp = await service.order(f"buyer{i % 30}", sku)
        return resp.status

    statuses = await asyncio.gather(*(attempt(i) for i in range(90)))
    assert statuses.count(201) == 40, "every unit sold once, none twice"
    assert set(statuses) <= {201, 409, 429}
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["total"]) == (0, 40, 40)


async def test_bucketed_orders_are_found_paid_and_cancelled(service: Service) -> None:
    sale, sku = new_id("sale"), new_id("sku")
    await service.create_sale({sku: 10}, sale=sale, buckets=3)
    first = await expect_json(await service.order("alice", sku), 201)
    second = await expect_json(await service.order("alice", sku), 201)
    assert first["order_id"].startswith(f"{sale}-b")
    got = await expect_json(
        await service.client.get(f"/api/orders/{first['order_id']}", headers=buyer("alice")), 200
    )
    assert got["status"] == "held"
    # Another buyer cannot see it; a made-up bucket number is no order.
    await expect_json(
        await service.client.get(f"/api/orders/{first['order_id']}", headers=buyer("bob")),
        404,
        "order_not_found",
    )
    await expect_json(
        await service.client.get(f"/api/orders/{sale}-b9.{'0' * 24}", headers=buyer("alice")), 404
    )
    paid = await service.client.post(f"/api/orders/{first['order_id']}/pay", headers=buyer("alice"))
    assert (await expect_json(paid, 200))["status"] == "paid"
    cancelled = await service.client.post(f"/api/orders/{second['order_id']}/cancel", headers=buyer("alice"))
    assert (await expect_json(cancelled, 200))["status"] == "cancelled"
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (9, 0, 1)


async def test_bucket_suffix_is_not_a_sale_id(service: Service) -> None:
    await service.create_sale({new_id("sku"): 1}, sale="d11-b2", expect=422)
    await service.create_sale({new_id("sku"): 1}, sale=new_id("sale"), buckets=65, expect=422)


async def test_restock_and_reserve_release_spread_over_buckets(service: Service) -> None:
    sale, sku = new_id("sale"), new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 12, "reserve": 6}], sale=sale, buckets=3)
    resp = await service.client.post(f"/api/admin/sales/{sale}/skus/{sku}/release-reserve", headers=ADMIN)
    assert (await expect_json(resp, 200))["available"] == 12
    resp = await service.client.post(
        f"/api/admin/sales/{sale}/skus/{sku}/restock", json={"units": 7}, headers=ADMIN
    )
    body = await expect_json(resp, 200)
    assert (body["total"], body["available"]) == (19, 19)
    metrics = await (await service.client.get("/metrics")).text()
    assert f'flashsale_stock_units{{sale="{sale}",sku="{sku}",state="available"}} 19.0' in metrics


async def test_units_in_transit_between_buckets_are_sold_not_cached_as_sold_out(
    service: Service, redis_client: Redis
) -> None:
    """A buyer refused while a pull's units are between buckets (written off by the
    donor, not yet added) is told they exist, and the service does not refuse the SKU's
    later buyers from its sold-out cache: they get the units once they land (a burst
    under load sold 58 of 60 units when this cached "sold out")."""
    sale, sku = new_id("sale"), new_id("sku")
    await service.create_sale({sku: 20}, sale=sale, buckets=2)
    inv = BucketedInventory(redis_client, sale, 2, prefix="fs", coalesce=False)
    donor, home = inv.buckets
    first, rival = (next(f"{who}{i}" for i in range(1000) if inv.home(f"{who}{i}") is home) for who in "ab")
    await expect_json(await service.order(rival, sku, 10), 201)  # the home bucket is empty
    xfer = "inflight" + new_id("x")
    intent = {"from": donor.sale, "sku": sku, "units": 10, "at_ms": str(int(time.time() * 1000))}
    await redis_client.hset(home.keys.transfers, xfer, json.dumps(intent))
    await donor._mutate("transfer_out", donor._stock_keys, [sku, 10, xfer, "move"], sku)

    refused = await expect_json(await service.order(first, sku), 409, "sold_out")
    assert refused["available"] == 10, refused
    await home._mutate("transfer_in", [*home._stock_keys, home.keys.transfers], [sku, 10, xfer], sku)
    await expect_json(await service.order(first, sku), 201)
