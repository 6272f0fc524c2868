"""Bad input changes nothing (invariant 7): every malformed order a client can send gets
a 4xx JSON error with a stable code, and afterwards every Redis key is byte for byte what
it was. The sale has stock, a held order and a request id in use, so there is state to
damage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    ADMIN,
    Service,
    buyer,
    changed_keys,
    dump_redis,
    expect_json,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

SKU = "phone"
OTHER = "case"


def order(**fields: Any) -> bytes:
    return json.dumps({"request_id": "r-new", **fields}).encode()


def lines(*items: Any) -> bytes:
    return order(lines=list(items))


# (case id, raw body, expected status, expected code)
BAD_ORDERS: list[tuple[str, bytes, int, str]] = [
    # not JSON at all
    ("empty body", b"", 422, "malformed_json"),
    ("not json", b"phone please", 422, "malformed_json"),
    ("truncated json", b'{"request_id": "r-new", "sku": "phone"', 422, "malformed_json"),
    ("invalid utf-8", b'{"request_id": "r-\xff", "sku": "phone"}', 422, "malformed_json"),
    ("deeply nested", b"[" * 5000 + b"]" * 5000, 422, "malformed_json"),
    (
        "number with 5000 digits",
        b'{"request_id": "r-new", "sku": "phone", "qty": ' + b"9" * 5000 + b"}",
        422,
        "malformed_json",
    ),
    # JSON, but not an object
    ("a list", b'[{"request_id": "r-new", "sku": "phone"}]', 422, "malformed_json"),
    ("a string", b'"phone"', 422, "malformed_json"),
    ("a number", b"1", 422, "malformed_json"),
    ("null", b"null", 422, "malformed_json"),
    # missing or mistyped fields
    ("no request_id", json.dumps({"sku": SKU}).encode(), 422, "invalid_request"),
    ("request_id a number", json.dumps({"request_id": 7, "sku": SKU}).encode(), 422, "invalid_request"),
    ("request_id null", json.dumps({"request_id": None, "sku": SKU}).encode(), 422, "invalid_request"),
    ("request_id empty", order(request_id="", sku=SKU), 422, "invalid_request"),
    ("neither lines nor sku", order(), 422, "invalid_request"),
    ("lines an object", order(lines={"sku": SKU, "qty": 1}), 422, "invalid_request"),
    ("lines a string", order(lines=SKU), 422, "invalid_request"),
    ("line not an object", lines(SKU), 422, "invalid_request"),
    ("line without sku", lines({"qty": 1}), 422, "invalid_request"),
    ("sku a number", order(sku=12), 422, "invalid_request"),
    ("sku null", order(sku=None), 422, "invalid_request"),
    ("qty a string", order(sku=SKU, qty="1"), 422, "invalid_quantity"),
    ("qty null", order(sku=SKU, qty=None), 422, "invalid_quantity"),
    # quantities
    ("qty zero", order(sku=SKU, qty=0), 422, "invalid_quantity"),
    ("qty negative", order(sku=SKU, qty=-1), 422, "invalid_quantity"),
    ("qty huge", order(sku=SKU, qty=10**12), 422, "invalid_quantity"),
    ("qty just over the cap", order(sku=SKU, qty=10_001), 422, "invalid_quantity"),
    ("qty float", order(sku=SKU, qty=1.5), 422, "invalid_quantity"),
    (
        "qty float that looks whole",
        b'{"request_id": "r-new", "sku": "phone", "qty": 1.0}',
        422,
        "invalid_quantity",
    ),
    ("qty exponent", b'{"request_id": "r-new", "sku": "phone", "qty": 1e0}', 422, "invalid_quantity"),
    ("qty true", order(sku=SKU, qty=True), 422, "invalid_quantity"),
    ("qty NaN", b'{"request_id": "r-new", "sku": "phone", "qty": NaN}', 422, "invalid_quantity"),
    ("qty Infinity", b'{"request_id": "r-new", "sku": "phone", "qty": Infinity}', 422, "invalid_quantity"),
    ("line qty negative", lines({"sku": SKU, "qty": -2}), 422, "invalid_quantity"),
    # ids
    ("unknown sku", order(sku="no-such-sku"), 422, "unknown_sku"),
    (
        "unknown sku in a cart",
        lines({"sku": SKU, "qty": 1}, {"sku": "no-such-sku", "qty": 1}),
        422,
        "unknown_sku",
    ),
    ("non-ascii sku", order(sku="t\u00e9l\u00e9phone"), 422, "invalid_request"),
    ("over-long sku", order(sku="p" * 65), 422, "invalid_request"),
    ("sku with a colon", order(sku="phone:held"), 422, "invalid_request"),
    ("non-ascii request_id", order(request_id="r-\u00e9", sku=SKU), 422, "invalid_request"),
    ("over-long request_id", order(request_id="r" * 65, sku=SKU), 422, "invalid_request"),
    ("request_id with a colon", order(request_id="op:x", sku=SKU), 422, "invalid_request"),
    ("request_id with a NUL", order(request_id="r\u0000", sku=SKU), 422, "invalid_request"),
    # carts
    ("empty cart", lines(), 422, "invalid_request"),
    ("duplicate lines", lines({"sku": SKU, "qty": 1}, {"sku": SKU, "qty": 1}), 422, "invalid_request"),
    ("too many lines", lines(*({"sku": f"s{i}", "qty": 1} for i in range(21))), 422, "invalid_request"),
    # idempotency
    ("request id reused, other qty", order(request_id="r-used", sku=SKU, qty=2), 422, "request_conflict"),
    ("request id reused, other sku", order(request_id="r-used", sku=OTHER, qty=1), 422, "request_conflict"),
    (
        "request id reused, as a cart",
        order(request_id="r-used", lines=[{"sku": SKU, "qty": 1}, {"sku": OTHER, "qty": 1}]),
        422,
        "request_conflict",
    ),
    # Request ids are each buyer's own: Bob's "r-paid" is no conflict for Alice, and past
    # her limit she hears about the limit, not about Bob's id.
    (
        "request id of another buyer, over the limit",
        order(request_id="r-paid", sku=SKU, qty=6),
        429,
        "limit_exceeded",
    ),
    # size
    ("body over the limit", order(sku=SKU, pad="x" * 20_000), 413, "body_too_large"),
]


@pytest.fixture
async def sale_with_history(service: Service) -> Service:
    """Stock, a held order (request id r-used) and a paid one: state a bug could damage."""
    await service.create_sale(
        [{"sku": SKU, "stock": 10, "reserve": 2, "limit_per_user": 5}, {"sku": OTHER, "stock": 3}]
    )
    await expect_json(await service.order("alice", SKU, 1, request_id="r-used"), 201)
    paid = await expect_json(await service.order("bob", OTHER, 1, request_id="r-paid"), 201)
    await expect_json(
        await service.client.post(f"/api/orders/{paid['order_id']}/pay", headers=buyer("bob")), 200
    )
    return service


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_ORDERS, ids=[c[0] for c in BAD_ORDERS])
async def test_bad_order_is_refused_and_changes_nothing(
    sale_with_history: Service, redis_client: Redis, case: str, body: bytes, status: int, code: str
) -> None:
    service = sale_with_history
    before = await dump_redis(redis_client)
    resp = await service.client.post(
        "/api/orders", data=body, headers=buyer("alice", extra={"Content-Type": "application/json"})
    )
    reply = await expect_json(resp, status, code)
    assert len(reply["message"]) > 10, "an error says what is wrong"
    assert changed_keys(before, await dump_redis(redis_client)) == [], f"{case}: Redis changed"


async def test_body_over_the_limit_sent_chunked_is_413(
    sale_with_history: Service, redis_client: Redis
) -> None:
    service = sale_with_history

    async def chunks() -> Any:
        for _ in range(40):
            yield b" " * 1000

    before = await dump_redis(redis_client)
    for path, headers in (("/api/orders", buyer("alice")), ("/api/admin/sales", ADMIN)):
        resp = await service.client.post(path, data=chunks(), headers=headers)
        await expect_json(resp, 413, "body_too_large")
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_limit_is_the_configured_one(start_service: Any, redis_client: Redis) -> None:
    service = await start_service(max_body_bytes=300)
    await service.create_sale({SKU: 5})
    await expect_json(
        await service.client.post("/api/orders", data=order(sku=SKU, pad="x" * 250), headers=buyer("a")), 201
    )
    resp = await service.client.post("/api/orders", data=order(sku=SKU, pad="x" * 300), headers=buyer("a"))
    body = await expect_json(resp, 413, "body_too_large")
    assert "300" in body["message"]


async def test_unknown_routes_and_methods_are_json(service: Service) -> None:
    await expect_json(await service.client.get("/api/nothing-here"), 404, "not_found")
    resp = await service.client.delete("/api/orders")
    await expect_json(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_a_body_is_parsed_once_for_all_its_readers(service: Service) -> None:
    """The fence guard reads an order's body to tell its sale, and the handler reads it
    again: both get the one object parsed from it (a second parse cost every order a few
    µs, issue 15); a body that is not a JSON object is refused to every reader alike."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from flashsale.service.errors import ApiError
    from flashsale.service.http import read_json
    from flashsale.service.state import STATE

    async def twice(request: web.Request) -> web.Response:
        try:
            first = await read_json(request)
        except ApiError as exc:
            try:
                await read_json(request)
            except ApiError as again:
                return web.json_response({"refused": [exc.code, again.code]})
            return web.json_response({"refused": [exc.code, None]})
        return web.json_response({"same": first is await read_json(request), "body": first})

    other = web.RequestKey("something_else", str)

    async def holding_something_else(request: web.Request) -> web.Response:
        request[other] = "not a body"  # a request that holds other keys: still parsed once
        return await twice(request)

    app = web.Application()
    app[STATE] = service.state
    app.router.add_post("/twice", twice)
    app.router.add_post("/other", holding_something_else)
    async with TestClient(TestServer(app)) as client:
        answer = await (await client.post("/twice", data=b'{"sku": "phone", "qty": 1}')).json()
        assert answer == {"same": True, "body": {"sku": "phone", "qty": 1}}
        answer = await (await client.post("/other", data=b'{"sku": "tablet"}')).json()
        assert answer == {"same": True, "body": {"sku": "tablet"}}
        answer = await (await client.post("/twice", data=b"[1, 2]")).json()
        assert answer == {"refused": ["malformed_json", "malformed_json"]}
