"""The operators' tools besides sales: the admin token guarding every /api/admin route,
the degraded-site switches, minting buyer tokens for drills, and live stats."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    ADMIN,
    ADMIN_TOKEN,
    Service,
    buyer,
    changed_keys,
    dump_redis,
    expect_json,
    new_id,
    now_ms,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.metrics import OUTCOMES
from flashsale.service.tokens import verify

WRONG_CREDENTIALS: list[tuple[str, dict[str, bytes]]] = [
    ("no header", {}),
    ("wrong token", {"Authorization": b"Bearer not-the-admin-token"}),
    ("admin token with another scheme", {"Authorization": b"Basic " + ADMIN_TOKEN.encode()}),
    ("prefix of the admin token", {"Authorization": b"Bearer " + ADMIN_TOKEN[:-1].encode()}),
    ("empty bearer", {"Authorization": b"Bearer "}),
    ("bytes that are not UTF-8", {"Authorization": b"Bearer \xff\xfe\xfd"}),
    ("a buyer's token", {"Authorization": buyer("alice")["Authorization"].encode()}),
]


def _admin_routes(service: Service) -> list[tuple[str, str]]:
    routes = set()
    for route in service.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/api/admin") and route.method != "HEAD":
            routes.add((route.method, path))
    return sorted(routes)


async def test_every_admin_route_refuses_wrong_credentials(service: Service, redis_client: Redis) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    routes = _admin_routes(service)
    assert len(routes) >= 11, routes  # the test really walks the admin API
    before = await dump_redis(redis_client)
    for method, template in routes:
        path = template.replace("{sale}", sale).replace("{sku}", sku)
        for label, headers in WRONG_CREDENTIALS:
            status, body = await service.raw(
                method, path, {**headers, "Content-Type": b"application/json"}, b'{"units": 1}'
            )
            assert (status, body.get("error")) == (401, "unauthorized"), (
                f"{method} {path} with {label}: {status} {body}"
            )
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_switches_read_and_write(service: Service) -> None:
    assert await expect_json(await service.client.get("/api/admin/switches", headers=ADMIN), 200) == {
        "browse": True,
        "order_lookup": True,
    }
    off = await service.client.post("/api/admin/switches", json={"browse": False}, headers=ADMIN)
    assert await expect_json(off, 200) == {"browse": False, "order_lookup": True}
    unchanged = await service.client.post("/api/admin/switches", json={}, headers=ADMIN)
    assert await expect_json(unchanged, 200) == {"browse": False, "order_lookup": True}
    assert await expect_json(await service.client.get("/api/admin/switches", headers=ADMIN), 200) == {
        "browse": False,
        "order_lookup": True,
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"checkout": False}, "invalid_request"),
        ({"browse": "off"}, "invalid_request"),
        ({"browse": 0}, "invalid_request"),
        ([{"browse": False}], "malformed_json"),
    ],
)
async def test_bad_switches_change_nothing(
    service: Service, redis_client: Redis, body: Any, code: str
) -> None:
    before = await dump_redis(redis_client)
    await expect_json(await service.client.post("/api/admin/switches", json=body, headers=ADMIN), 422, code)
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_minted_tokens_are_accepted_by_the_service(service: Service) -> None:
    minted = await expect_json(
        await service.client.post(
            "/api/admin/tokens", json={"users": ["alice", "bob@example"], "ttl_s": 600}, headers=ADMIN
        ),
        200,
    )
    assert set(minted["tokens"]) == {"alice", "bob@example"} and minted["expires_in_s"] == 600
    for user, token in minted["tokens"].items():
        assert verify("service-tests-token-secret", token).user == user
        resp = await service.client.get("/api/orders/none.x", headers={"Authorization": f"Bearer {token}"})
        await expect_json(resp, 404, "order_not_found")  # authenticated: 404, not 401

    members = await expect_json(
        await service.client.post(
            "/api/admin/tokens", json={"prefix": "vip", "count": 3, "member": True}, headers=ADMIN
        ),
        200,
    )
    assert sorted(members["tokens"]) == ["vip0", "vip1", "vip2"]
    assert members["expires_in_s"] == 3600
    token = members["tokens"]["vip1"]
    assert verify("service-tests-token-secret", token).member is True


async def test_member_tokens_carry_early_access(service: Service) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 5}, opens_at=now_ms() + 60_000, early_access_s=120)
    minted = await expect_json(
        await service.client.post("/api/admin/tokens", json={"users": ["vip", "plain"]}, headers=ADMIN), 200
    )
    members = await expect_json(
        await service.client.post(
            "/api/admin/tokens", json={"users": ["vip"], "member": True}, headers=ADMIN
        ),
        200,
    )

    def order(token: str) -> Any:
        return service.client.post(
            "/api/orders",
            json={"request_id": new_id("r"), "sku": sku},
            headers={"Authorization": f"Bearer {token}"},
        )

    await expect_json(await order(minted["tokens"]["plain"]), 409, "sale_not_open")
    await expect_json(await order(minted["tokens"]["vip"]), 409, "sale_not_open")
    await expect_json(await order(members["tokens"]["vip"]), 201)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"count": 0},
        {"count": 100_001},
        {"count": "3"},
        {"count": 2, "prefix": ""},
        {"count": 2, "prefix": "b\u00e4d"},
        {"count": 2, "prefix": "x" * 42},
        {"users": []},
        {"users": "alice"},
        {"users": ["alice", 7]},
        {"users": ["has space"]},
        {"users": ["x" * 65]},
        {"users": ["alice"], "member": "yes"},
        {"users": ["alice"], "ttl_s": 0},
        {"users": ["alice"], "ttl_s": 1.5},
    ],
)
async def test_bad_token_requests_are_422(service: Service, body: dict[str, Any]) -> None:
    await expect_json(
        await service.client.post("/api/admin/tokens", json=body, headers=ADMIN), 422, "invalid_request"
    )


async def test_stats_shape(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 5, "reserve": 1}]))["sale"]
    await expect_json(await service.order("alice", sku, 2), 201)
    await expect_json(await service.order("bob", sku, 9), 409, "sold_out")
    await asyncio.sleep(1.2)  # each process publishes its counters once a second
    stats = await expect_json(await service.client.get("/api/admin/stats", headers=ADMIN), 200)
    assert set(stats) == {"at", "processes", "orders", "latency_ms", "in_flight", "sales", "writer"}
    assert stats["processes"] == 1
    assert set(stats["orders"]) >= set(OUTCOMES)
    assert (stats["orders"]["created"], stats["orders"]["sold_out"], stats["orders"]["invalid"]) == (1, 1, 0)
    assert (
        set(stats["latency_ms"]) == {"p50", "p99"}
        and 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    )
    assert stats["in_flight"] == 0
    assert isinstance(stats["writer"], dict)
    view = stats["sales"][sale]
    assert view["skus"][sku] == {
        "total": 5,
        "available": 2,
        "held": 2,
        "sold": 0,
        "reserve": 1,
        "limit_per_user": 0,
        "low_stock_line": 0,
        "state": "in_stock",
    }
    assert view["holds_pending"] == 1
    assert view["backlog"] >= 2  # "stocked" and "reserved" events, none written to PostgreSQL yet
    assert view["dead_letters"] == 0
    assert view["state"] == "open"
