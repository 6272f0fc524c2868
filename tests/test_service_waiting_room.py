"""The waiting room through the HTTP API: a sale created behind its room refuses orders
without a ticket; buyers join and poll (rate-limited, never a 5xx); admitted buyers get a
signed ticket that admits one order attempt series; forged, expired, spent and other
buyers' tickets are refused and change nothing; waiting buyers of a sold-out SKU hear it;
a restarted service process loses nobody's place; operators switch the room."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    ADMIN,
    Service,
    ServiceFactory,
    buyer,
    changed_keys,
    dump_redis,
    expect_json,
    new_id,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.waiting_room import TICKET_HEADER


async def _room_sale(service: Service, stock: int = 5, **room: Any) -> tuple[str, str]:
    sale, sku = new_id("room"), new_id("sku")
    await service.create_sale(
        [{"sku": sku, "stock": stock, "limit_per_user": 1}],
        sale=sale,
        waiting_room={"rate_per_s": 1000, "ticket_ttl_s": 60, **room},
    )
    return sale, sku


async def _join(service: Service, sale: str, user: str, sku: str, expect: int = 200) -> Any:
    resp = await service.client.post(f"/api/sales/{sale}/room", json={"skus": [sku]}, headers=buyer(user))
    return await expect_json(resp, expect)


async def _poll(service: Service, sale: str, user: str, expect: int = 200) -> Any:
    return await expect_json(await service.client.get(f"/api/sales/{sale}/room", headers=buyer(user)), expect)


async def _order(service: Service, user: str, sku: str, ticket: str | None, request_id: str) -> Any:
    extra = {TICKET_HEADER: ticket} if ticket is not None else None
    return await service.client.post(
        "/api/orders", json={"request_id": request_id, "sku": sku}, headers=buyer(user, extra=extra)
    )


async def test_orders_behind_the_room_need_the_buyers_own_ticket(
    service: Service, redis_client: Redis
) -> None:
    sale, sku = await _room_sale(service)
    before = await dump_redis(redis_client)
    await expect_json(await _order(service, "alice", sku, None, "r-1"), 401, "ticket_required")
    assert changed_keys(before, await dump_redis(redis_client)) == []

    alice = await _join(service, sale, "alice", sku)
    assert alice["state"] == "admitted" and alice["ticket_header"] == TICKET_HEADER
    bob = await _join(service, sale, "bob", sku)
    payload, _, signature = alice["ticket"].partition(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**fields, "u": "mallory"}).encode()).rstrip(b"=").decode()

    before = await dump_redis(redis_client)
    for user, ticket, status, code in [
        ("mallory", f"{forged}.{signature}", 401, "ticket_invalid"),  # tampered
        ("alice", "not-a-ticket", 401, "ticket_invalid"),
        ("alice", alice["ticket"][:-2] + "xx", 401, "ticket_invalid"),  # forged signature
        ("bob", alice["ticket"], 403, "ticket_not_yours"),  # another buyer's
        ("mallory", bob["ticket"], 403, "ticket_not_yours"),
    ]:
        await expect_json(await _order(service, user, sku, ticket, "r-x"), status, code)
    assert changed_keys(before, await dump_redis(redis_client)) == []

    first = await expect_json(await _order(service, "alice", sku, alice["ticket"], "r-1"), 201)
    again = await expect_json(await _order(service, "alice", sku, alice["ticket"], "r-1"), 201)
    assert again["order_id"] == first["order_id"] and again["replayed"]  # a retry passes
    await expect_json(await _order(service, "alice", sku, alice["ticket"], "r-2"), 403, "ticket_used")
    assert (await _poll(service, sale, "alice"))["state"] == "used"


async def test_a_lapsed_ticket_is_refused_and_its_place_given_back(start_service: ServiceFactory) -> None:
    service = await start_service()
    sale, sku = await _room_sale(service, stock=1, ticket_ttl_s=1)
    alice = await _join(service, sale, "alice", sku)
    assert (await _join(service, sale, "bob", sku))["state"] == "waiting"
    while (await _poll(service, sale, "bob"))["state"] != "admitted":  # alice's ticket lapses
        await asyncio.sleep(0.2)
    await expect_json(await _order(service, "alice", sku, alice["ticket"], "r-late"), 401, "ticket_expired")


async def test_waiting_buyers_of_a_sold_out_sku_are_told_on_their_next_poll(service: Service) -> None:
    sale, sku = await _room_sale(service, stock=2)
    users = [f"w{i}" for i in range(12)]
    answers = {u: await _join(service, sale, u, sku) for u in users}
    admitted = [u for u, a in answers.items() if a["state"] == "admitted"]
    assert len(admitted) == 2
    assert [answers[u]["ahead"] for u in users if u not in admitted] == list(range(10))
    for user in admitted:
        order = await expect_json(await _order(service, user, sku, answers[user]["ticket"], f"r-{user}"), 201)
        await expect_json(
            await service.client.post(f"/api/orders/{order['order_id']}/pay", headers=buyer(user)), 200
        )
    told = [await _poll(service, sale, u) for u in users if u not in admitted]
    assert {t["state"] for t in told} == {"sold_out"}
    assert all(0 <= t["told_after_ms"] for t in told)


async def test_polling_is_rate_limited_per_buyer_and_never_5xx(start_service: ServiceFactory) -> None:
    service = await start_service(room_poll_rate=1.0, room_poll_burst=3)
    sale, sku = await _room_sale(service, stock=1)
    await _join(service, sale, "alice", sku)
    await _join(service, sale, "bob", sku)
    statuses = [
        (await service.client.get(f"/api/sales/{sale}/room", headers=buyer("bob"))).status for _ in range(30)
    ]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 20, statuses
    assert (await service.client.get(f"/api/sales/{sale}/room", headers=buyer("carol"))).status == 404
    for i, body in enumerate(({}, {"skus": []}, {"skus": "x"}, {"skus": [1]}, {"skus": ["nope"]})):
        resp = await service.client.post(f"/api/sales/{sale}/room", json=body, headers=buyer(f"dave{i}"))
        assert resp.status == 422, (body, await resp.text())
    resp = await service.client.get(f"/api/sales/{sale}/room")
    assert resp.status == 401
    resp = await service.client.get("/api/sales/no-such-sale/room", headers=buyer("erin"))
    assert resp.status == 404


async def test_a_restarted_service_process_loses_nobodys_place(start_service: ServiceFactory) -> None:
    first = await start_service()
    sale, sku = await _room_sale(first, stock=1, rate_per_s=0.01)
    places = {u: (await _join(first, sale, u, sku))["ahead"] for u in ("u0", "u1", "u2", "u3")}
    await first.client.close()
    second = await start_service()
    assert {u: (await _poll(second, sale, u))["ahead"] for u in places} == places


async def test_operators_switch_the_room(service: Service) -> None:
    sale, sku = await _room_sale(service)
    off = await expect_json(
        await service.client.post(f"/api/admin/sales/{sale}/room", json={"on": False}, headers=ADMIN), 200
    )
    assert off["room"] is False
    await expect_json(await _order(service, "alice", sku, None, "r-1"), 201)  # no ticket needed
    await expect_json(
        await service.client.get(f"/api/sales/{sale}/room", headers=buyer("bob")), 409, "room_off"
    )
    on = await expect_json(
        await service.client.post(
            f"/api/admin/sales/{sale}/room", json={"on": True, "rate_per_s": 5}, headers=ADMIN
        ),
        200,
    )
    assert on["room"] is True and on["seed"] == off["seed"]  # the recorded shuffle seed stays
    await expect_json(await _order(service, "bob", sku, None, "r-2"), 401, "ticket_required")
    for body in ({"on": "yes"}, {"rate_per_s": 0}, {"seed": 0}):
        await expect_json(
            await service.client.post(f"/api/admin/sales/{sale}/room", json=body, headers=ADMIN), 422
        )


@pytest.mark.parametrize("room", [{"rate_per_s": 0}, {"oversubscribe": -1}, {"ticket_ttl_s": 0}, "yes", 3])
async def test_bad_room_settings_refuse_the_sale_and_leave_nothing(
    service: Service, redis_client: Redis, room: Any
) -> None:
    before = await dump_redis(redis_client)
    await service.create_sale({new_id("sku"): 5}, waiting_room=room, expect=422)
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_a_bucketed_sale_admits_by_its_buckets_summed_stock(service: Service) -> None:
    sale, sku = new_id("rb"), new_id("sku")
    await service.create_sale(
        [{"sku": sku, "stock": 6}], sale=sale, buckets=3, waiting_room={"rate_per_s": 1000}
    )
    answers = [await _join(service, sale, f"b{i}", sku) for i in range(10)]
    assert sum(a["state"] == "admitted" for a in answers) == 6
