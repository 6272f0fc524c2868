"""Ids at the edges, at once: one request id sent fifty times at the same instant makes one
hold (and on a sale of the last unit, beside a buyer it sells out for); one request id used
by many buyers at once makes each of them their own hold; a sale id used again (the
yearly ``d11``) starts with nothing the process remembered of its earlier creation.

Against a real service process and Redis; every request of a burst is in flight at once
(the buyer's cap is raised where the test needs it, and said where it is not)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    Service,
    ServiceFactory,
    buyer,
    expect_json,
    holds_of_request,
    new_id,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.keys import ServiceKeys
from inventory import SaleKeys


async def orders_at_once(
    service: Service, requests: list[tuple[str, dict[str, Any]]]
) -> list[tuple[int, Any]]:
    """Every (user, body) posted at once; each answer's status and JSON."""

    async def post(user: str, body: dict[str, Any]) -> tuple[int, Any]:
        resp = await service.client.post("/api/orders", json=body, headers=buyer(user))
        return resp.status, json.loads(await resp.text())

    return await asyncio.gather(*(post(user, body) for user, body in requests))


@pytest.mark.parametrize("buckets", [1, 4])
async def test_one_request_id_fifty_times_at_once_makes_one_hold_of_the_last_unit(
    start_service: ServiceFactory, redis_client: Redis, buckets: int
) -> None:
    service = await start_service(buyer_in_flight=64)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: buckets}, buckets=buckets))["sale"]
    # Every unit but one goes first, so the burst races for the last (and a bucketed sale
    # may have to move it from another bucket to the buyer's own).
    for i in range(buckets - 1):
        await expect_json(await service.order(f"early{i}", sku), 201)
    burst = [("alice", {"request_id": "r-once", "sku": sku})] * 50 + [
        ("bob", {"request_id": "r-bob", "sku": sku})
    ]
    answers = await orders_at_once(service, burst)
    alices, bobs = answers[:50], answers[50]
    assert bobs[0] in (201, 409), bobs
    if bobs[0] == 201:  # bob got the last unit first: every one of alice's is sold out
        assert Counter((s, b["error"]) for s, b in alices) == {(409, "sold_out"): 50}, alices
        return
    assert {s for s, _ in alices} == {201}, Counter(s for s, _ in alices)
    assert len({b["order_id"] for _, b in alices}) == 1, "one request id, one order"
    assert sum(not b["replayed"] for _, b in alices) == 1, "one answer made it; the others replayed it"
    parts = [sale] if buckets == 1 else [f"{sale}-b{k}" for k in range(buckets)]
    holds = [h for part in parts for h in await holds_of_request(redis_client, part, "r-once")]
    assert holds == [alices[0][1]["order_id"]]
    assert (await service.sku_counters(sale, sku))["held"] == buckets


async def test_past_the_buyers_cap_a_burst_of_one_request_id_is_refused_or_the_one_hold(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """With the default cap (8 in progress per buyer) most of the burst hears 429; the
    rest all name the one hold."""
    service = await start_service()
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    answers = await orders_at_once(service, [("alice", {"request_id": "r-capped", "sku": sku})] * 50)
    served = [b for s, b in answers if s == 201]
    assert Counter(s for s, _ in answers).keys() <= {201, 429}, answers
    assert all(b["error"] == "too_many_in_progress" for s, b in answers if s == 429)
    assert served and len({b["order_id"] for b in served}) == 1
    assert await holds_of_request(redis_client, sale, "r-capped") == [served[0]["order_id"]]


async def test_one_request_id_used_by_twenty_buyers_at_once_is_twenty_holds(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service()
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 20}))["sale"]
    users = [f"buyer{i}" for i in range(20)]
    answers = await orders_at_once(service, [(user, {"request_id": "r-same", "sku": sku}) for user in users])
    assert {s for s, _ in answers} == {201}, answers
    order_ids = [b["order_id"] for _, b in answers]
    assert len(set(order_ids)) == 20 and not any(b["replayed"] for _, b in answers)
    assert sorted(await holds_of_request(redis_client, sale, "r-same")) == sorted(order_ids)
    for user, order_id in zip(users, order_ids):
        await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer(user)), 200)
        other = users[(users.index(user) + 1) % len(users)]
        await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer(other)), 404)


async def test_a_sale_id_used_again_is_not_sold_out_from_its_earlier_creation(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """Last year's ``d11`` sold out; an operator removed it and created ``d11`` again with
    new stock. A process that remembered "sold out" for the old creation must not refuse
    the new one's first buyers (both creations start at epoch 0: the epoch alone cannot
    tell them apart)."""
    service = await start_service(sold_out_cache_s=3600.0)  # remembered for the whole test
    sku = "phone"
    await service.create_sale({sku: 1}, sale="d11")
    await expect_json(await service.order("alice", sku), 201)
    await expect_json(await service.order("bob", sku), 409, "sold_out")  # remembered as sold out
    keys = ServiceKeys("fs")
    await redis_client.delete(keys.sale("d11"), *SaleKeys("fs", "d11").all())
    await redis_client.hdel(keys.skus, sku)
    await redis_client.srem(keys.sales, "d11")
    await service.create_sale({sku: 5}, sale="d11")
    answer = await expect_json(await service.order("carol", sku), 201)
    assert answer["sale"] == "d11"
    assert (await service.sku_counters("d11", sku))["held"] == 1


async def test_pay_and_cancel_of_one_order_fifty_at_once_have_one_winner(service_with_cap: Service) -> None:
    service = service_with_cap
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    order_id = (await expect_json(await service.order("alice", sku), 201))["order_id"]

    async def close(action: str) -> tuple[str, int, Any]:
        resp = await service.client.post(f"/api/orders/{order_id}/{action}", headers=buyer("alice"))
        return action, resp.status, json.loads(await resp.text())

    answers = await asyncio.gather(*(close(a) for a in ["pay", "cancel"] * 25))
    winner = "pay" if any(a == "pay" and s == 200 for a, s, _ in answers) else "cancel"
    final = {"pay": "paid", "cancel": "cancelled"}[winner]
    loser_code = {"pay": "hold_paid", "cancel": "hold_cancelled"}[winner]
    for action, status, body in answers:
        if action == winner:
            assert (status, body["status"]) == (200, final), (action, status, body)
        else:
            assert (status, body["error"]) == (409, loser_code), (action, status, body)
    counters = await service.sku_counters(sale, sku)
    sold = 1 if winner == "pay" else 0
    assert (counters["sold"], counters["held"], counters["available"]) == (sold, 0, 5 - sold), counters


@pytest.fixture
async def service_with_cap(start_service: ServiceFactory) -> Service:
    """A service that lets one buyer have 64 requests in progress (a burst of 50 all in)."""
    return await start_service(buyer_in_flight=64)
