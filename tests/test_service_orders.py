"""POST /api/orders through the real app and Redis: every answer docs/http-api.md lists
for placing an order that is about the sale and its stock (admission shortcuts — rate
limit, shedding, the sold-out cache, unknown outcomes — are in test_service_admission.py;
malformed input in test_service_bad_input.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import cast

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
    holds_of_request,
    new_id,
    now_ms,
    sale_keys,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from inventory import BucketedInventory, Line, OrderEvent, parse_events


async def test_created_order_holds_stock_until_pay_by(service: Service, redis_client: Redis) -> None:
    sku = new_id("phone")
    sale = (await service.create_sale({sku: 5}, hold_ttl_s=600))["sale"]
    before = now_ms()
    order = await expect_json(await service.order("alice", sku, 2, request_id="r-1"), 201)
    after = now_ms()

    assert order["status"] == "held"
    assert order["sale"] == sale
    assert order["order_id"].startswith(sale + ".")
    assert order["lines"] == [{"sku": sku, "qty": 2}]
    assert order["request_id"] == "r-1"
    assert order["replayed"] is False
    assert before + 600_000 <= order["pay_by_ms"] <= after + 600_000
    parsed = datetime.fromisoformat(order["pay_by"].replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.astimezone(UTC) == datetime.fromtimestamp(
        order["pay_by_ms"] / 1000, UTC
    )
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (3, 2, 0)
    assert await holds_of_request(redis_client, sale, "r-1") == [order["order_id"]]


async def test_one_sku_short_form_and_lines_form_are_the_same_order(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    short = await expect_json(await service.order("alice", sku, 1, request_id="same"), 201)
    long = await expect_json(
        await service.order("alice", lines=[{"sku": sku, "qty": 1}], request_id="same"), 201
    )
    assert long["order_id"] == short["order_id"] and long["replayed"] is True
    # qty defaults to 1 in both forms.
    resp = await service.client.post(
        "/api/orders", json={"request_id": "no-qty", "sku": sku}, headers=buyer("bob")
    )
    assert (await expect_json(resp, 201))["lines"] == [{"sku": sku, "qty": 1}]
    assert (await service.sku_counters(sale, sku))["held"] == 2


async def test_replay_returns_the_first_order_and_takes_stock_once(
    service: Service, redis_client: Redis
) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 3}))["sale"]
    first = await expect_json(await service.order("alice", sku, 1, request_id="r-once"), 201)
    before = await dump_redis(redis_client)
    for _ in range(3):
        again = await expect_json(await service.order("alice", sku, 1, request_id="r-once"), 201)
        assert again["replayed"] is True
        assert {k: again[k] for k in ("order_id", "pay_by_ms", "created_ms", "lines")} == {
            k: first[k] for k in ("order_id", "pay_by_ms", "created_ms", "lines")
        }
    # A replay writes nothing at all: no second hold, no event, no counter moved.
    assert changed_keys(before, await dump_redis(redis_client)) == []
    assert (await service.sku_counters(sale, sku))["available"] == 2


async def test_request_id_reused_for_another_cart_is_a_conflict(
    service: Service, redis_client: Redis
) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    await expect_json(await service.order("alice", sku, 1, request_id="r-c"), 201)
    before = await dump_redis(redis_client)
    body = await expect_json(await service.order("alice", sku, 2, request_id="r-c"), 422, "request_conflict")
    assert body["message"]
    assert changed_keys(before, await dump_redis(redis_client)) == []


@pytest.mark.parametrize("buckets", [1, 4], ids=["plain", "bucketed"])
async def test_request_ids_are_each_buyers_own(service: Service, buckets: int) -> None:
    """A buyer sending ``alice-1`` first changes nothing for Alice's ``alice-1``, and no
    answer Mallory gets says whether Alice (or anyone) used an id."""
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 20, "limit_per_user": 2}], buckets=buckets))[
        "sale"
    ]
    settings = await service.state.sales.sale(sale)
    assert settings is not None
    engine = service.state.engine(settings)
    # On a bucketed sale, a buyer whose home bucket is Alice's: both meet the same records.
    mallory = next(
        name
        for name in (f"mallory{i}" for i in range(1000))
        if not isinstance(engine, BucketedInventory) or engine.home(name) is engine.home("alice")
    )
    theirs = await expect_json(await service.order(mallory, sku, 1, request_id="alice-1"), 201)
    mine = await expect_json(await service.order("alice", sku, 2, request_id="alice-1"), 201)
    assert mine["order_id"] != theirs["order_id"] and mine["replayed"] is False
    again = await expect_json(await service.order("alice", sku, 2, request_id="alice-1"), 201)
    assert again["order_id"] == mine["order_id"] and again["replayed"] is True
    # Past the per-user limit, a taken id and a fresh one get the same answer.
    answers = []
    for request_id in ("alice-1", "alice-2", new_id("r")):
        refused = await expect_json(await service.order("eve", sku, 3, request_id=request_id), 429)
        answers.append(refused)
    assert all(a == answers[0] for a in answers), answers
    assert answers[0]["error"] == "limit_exceeded"
    assert (await service.sku_counters(sale, sku))["held"] == 3


async def test_sold_out(service: Service, redis_client: Redis) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 2}))["sale"]
    await expect_json(await service.order("alice", sku, 2), 201)
    before = await dump_redis(redis_client)
    body = await expect_json(await service.order("bob", sku, 1), 409, "sold_out")
    assert body["sku"] == sku and body["available"] == 0
    assert changed_keys(before, await dump_redis(redis_client)) == []
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["state"]) == (0, 2, "sold_out")


async def test_more_than_is_left_is_sold_out_with_what_is_left(service: Service) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 3})
    body = await expect_json(await service.order("alice", sku, 4), 409, "sold_out")
    assert body["available"] == 3
    # Not a sold-out SKU: the next buyer asking for what is there gets it.
    await expect_json(await service.order("bob", sku, 3), 201)


async def test_per_user_limit(service: Service, redis_client: Redis) -> None:
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10, "limit_per_user": 2}])
    held = await expect_json(await service.order("alice", sku, 2), 201)
    before = await dump_redis(redis_client)
    body = await expect_json(await service.order("alice", sku, 1), 429, "limit_exceeded")
    assert (body["sku"], body["limit"], body["already"]) == (sku, 2, 2)
    assert changed_keys(before, await dump_redis(redis_client)) == []
    # The limit is per buyer...
    await expect_json(await service.order("bob", sku, 2), 201)
    # ...and units that went back on sale no longer count against it.
    cancel = await service.client.post(f"/api/orders/{held['order_id']}/cancel", headers=buyer("alice"))
    await expect_json(cancel, 200)
    await expect_json(await service.order("alice", sku, 2), 201)


async def test_cart_is_all_or_nothing(service: Service, redis_client: Redis) -> None:
    a, b = new_id("a"), new_id("b")
    sale = (await service.create_sale({a: 5, b: 2}))["sale"]
    before = await dump_redis(redis_client)
    body = await expect_json(
        await service.order("alice", lines=[{"sku": a, "qty": 1}, {"sku": b, "qty": 3}]), 409, "sold_out"
    )
    assert body["sku"] == b
    assert changed_keys(before, await dump_redis(redis_client)) == [], (
        "a refused cart must not keep its first line"
    )

    order = await expect_json(
        await service.order("alice", lines=[{"sku": b, "qty": 2}, {"sku": a, "qty": 1}]), 201
    )
    assert sorted((line["sku"], line["qty"]) for line in order["lines"]) == sorted([(a, 1), (b, 2)])
    assert (await service.sku_counters(sale, a))["held"] == 1
    assert (await service.sku_counters(sale, b))["held"] == 2


async def test_cart_spanning_two_sales_is_refused(service: Service, redis_client: Redis) -> None:
    a, b = new_id("a"), new_id("b")
    await service.create_sale({a: 5})
    await service.create_sale({b: 5})
    before = await dump_redis(redis_client)
    await expect_json(
        await service.order("alice", lines=[{"sku": a, "qty": 1}, {"sku": b, "qty": 1}]),
        422,
        "cart_spans_sales",
    )
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_before_t0_refused_with_opening_time_but_members_in_early_access_buy(
    service: Service, redis_client: Redis
) -> None:
    sku = new_id("sku")
    opens_at_ms = now_ms() + 3_600_000
    sale = (await service.create_sale({sku: 5}, opens_at=opens_at_ms, early_access_s=2 * 3600))["sale"]
    before = await dump_redis(redis_client)
    body = await expect_json(await service.order("alice", sku, 1), 409, "sale_not_open")
    assert body["opens_at_ms"] == opens_at_ms
    assert datetime.fromisoformat(body["opens_at"].replace("Z", "+00:00")).timestamp() * 1000 == opens_at_ms
    assert changed_keys(before, await dump_redis(redis_client)) == [], "a refusal before T0 touched stock"

    # T0 - 1 h is inside the 2 h early-access window: a member buys now.
    order = await expect_json(await service.order("vip", sku, 1, member=True), 201)
    assert order["sale"] == sale


async def test_members_wait_for_their_own_window(service: Service) -> None:
    sku = new_id("sku")
    opens_at = datetime.fromtimestamp(now_ms() / 1000 + 3 * 3600, UTC).isoformat()  # ISO with zone
    await service.create_sale({sku: 5}, opens_at=opens_at, early_access_s=3600)
    body = await expect_json(await service.order("vip", sku, 1, member=True), 409, "sale_not_open")
    assert body["opens_at_ms"] // 1000 == int(datetime.fromisoformat(opens_at).timestamp())


async def test_scheduled_sale_opens_by_itself_at_t0(service: Service) -> None:
    sku = new_id("sku")
    opens_at_ms = now_ms() + 600
    await service.create_sale({sku: 5}, opens_at=opens_at_ms)
    await expect_json(await service.order("alice", sku, 1), 409, "sale_not_open")
    await asyncio.sleep(max(0.0, (opens_at_ms - now_ms()) / 1000) + 0.05)
    await expect_json(await service.order("alice", sku, 1), 201)


async def test_closed_sale_refuses_orders_until_reopened(service: Service, redis_client: Redis) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    await expect_json(await service.client.post(f"/api/admin/sales/{sale}/close", headers=ADMIN), 200)
    before = await dump_redis(redis_client)
    await expect_json(await service.order("alice", sku, 1), 409, "sale_closed")
    assert changed_keys(before, await dump_redis(redis_client)) == []
    await expect_json(await service.client.post(f"/api/admin/sales/{sale}/open", headers=ADMIN), 200)
    await expect_json(await service.order("alice", sku, 1), 201)


async def test_fenced_sale_refuses_with_503_until_the_fence_is_lifted(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """A fence (set when Redis is found to have lost data; lifted by `flashsale recover`)
    is the ``fenced`` field of the sale's settings: every process refuses while it stands."""
    service = await start_service(sale_cache_s=0.0)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    await redis_client.hset(f"fs:sale:{sale}", "fenced", "Redis lost acknowledged writes")
    before = await dump_redis(redis_client)
    resp = await service.order("alice", sku, 1)
    body = await expect_json(resp, 503, "sale_fenced")
    assert "Redis lost acknowledged writes" in body["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert changed_keys(before, await dump_redis(redis_client)) == []
    await redis_client.hset(f"fs:sale:{sale}", "fenced", "")
    await expect_json(await service.order("alice", sku, 1), 201)


async def test_orders_are_recorded_in_the_sale_stream(service: Service, redis_client: Redis) -> None:
    """The order pipeline's input: a "reserved_batch" entry holding each created order (one
    reservation call's holds), none for a replay."""
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    order = await expect_json(await service.order("alice", sku, 2, request_id="r-ev"), 201)
    await expect_json(await service.order("alice", sku, 2, request_id="r-ev"), 201)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis_client.xrange(sale_keys(sale).events))
    reserved = [e for _, f in entries for e in parse_events(f) if isinstance(e, OrderEvent)]
    assert [(e.type, e.hold_id, e.lines) for e in reserved] == [
        ("reserved", order["order_id"], (Line(sku, 2),))
    ]


def test_an_order_is_written_field_by_field_from_its_hold() -> None:
    """What an order's JSON says, for every state, a cart of several lines, a bucket's
    hold id, a first answer and a replay: each field straight from the hold."""
    from flashsale.service.buyer_api import order_json
    from inventory import Hold, HoldState, Line

    for state, hold_id, replayed in [
        (HoldState.HELD, "spring.abc123", False),
        (HoldState.PAID, "spring-b3.xyz789", True),
        (HoldState.CANCELLED, "s1.q", False),
        (HoldState.EXPIRED, "s1.r", True),
    ]:
        lines = (Line("a-sku", 2), Line("b-sku", 1))
        hold = Hold(hold_id, "alice", lines, state, 1_767_225_600_123, 1_767_223_800_000, "r-9", replayed)
        response = order_json(hold, status=201)
        assert response.status == 201 and response.content_type == "application/json"
        assert response.charset == "utf-8"
        assert response.body is not None and json.loads(bytes(response.body)) == {
            "order_id": hold_id,
            "status": state.value,
            "sale": hold_id.split(".")[0],
            "lines": [{"sku": "a-sku", "qty": 2}, {"sku": "b-sku", "qty": 1}],
            "pay_by": "2026-01-01T00:00:00.123Z",
            "pay_by_ms": 1_767_225_600_123,
            "created_ms": 1_767_223_800_000,
            "request_id": "r-9",
            "replayed": replayed,
        }
