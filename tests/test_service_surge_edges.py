"""The edges a real surge creates, against one real service process: concurrency past the
Redis pool (payments, product pages of a 64-bucket SKU) waits its turn instead of failing;
slow and hostile clients hold only their own turns (read deadline, 408; per-buyer cap,
429) and never the in-flight slots other buyers' orders need; payments and cancellations
of a fenced sale are refused from the flag in Redis; the fence guard knows the buyer before
it reads a body. And the burst: 1,000 requests at once on every buyer endpoint, no 5xx.

No test here asserts a duration: Redis gets a generous timeout, so a 5xx could only come
from the service's own concurrency, and every wait is on a condition."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis_mode import on_cluster, single_server_only
from service_support import (
    ADMIN,
    TOKEN_SECRET,
    FrozenRedis,
    Service,
    ServiceFactory,
    buyer,
    changed_keys,
    dump_redis,
    expect_json,
    holds_of_request,
    new_id,
    read_response,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.redis_client import connect
from flashsale.service.fence_guard import GUARD
from flashsale.service.tokens import mint

#: A Redis timeout no healthy run comes near: a 5xx in these tests is the service's doing.
PATIENT = 60.0


async def until(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Wait for ``check()`` to hold (bounded generously; a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without aiohttp's default cap of 100 connections: a thousand requests at
    once are a thousand connections."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        yield session


Call = Callable[[], Awaitable[tuple[int, Any]]]


def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Call:
    async def send() -> tuple[int, Any]:
        async with http.request(method, url, **kwargs) as resp:
            text = await resp.text()
            assert resp.content_type == "application/json", f"{method} {url}: {resp.status} {text[:200]}"
            return resp.status, json.loads(text)

    return send


async def burst(calls: list[Call]) -> list[tuple[int, Any]]:
    """Every call at once; asserts none answered 5xx."""
    answers = await asyncio.gather(*(c() for c in calls))
    errors = Counter(f"{s} {b.get('error')}" for s, b in answers if s >= 500)
    assert not errors, f"5xx answers under the burst: {dict(errors)}"
    return answers


def hold_state(raw: bytes | None) -> str | None:
    return None if raw is None else str(json.loads(raw)["s"])


async def stored_state(redis: Redis, order_id: str) -> str | None:
    """The order's status as Redis has it (the order id names its engine: sale or bucket)."""
    engine = order_id.partition(".")[0]
    return hold_state(await redis.hget(f"{{fs:{engine}}}:holds", order_id))


# ----------------------------------------------------------------- 1. past the pool


async def test_a_full_pool_makes_commands_wait_and_gives_every_turn_back(
    redis_client: Redis, redis_url: str
) -> None:
    """Two connections, fifty commands at once, some of them failing: all are answered,
    round after round (a turn lost would leave the pool short and the waits would run out;
    a turn given back twice would let a third connection be asked for, which raises)."""
    redis = connect(redis_url, cluster=on_cluster(), timeout_s=PATIENT, max_connections=2, wait_s=PATIENT)
    try:
        await redis_client.set("{surge}:text", "not a number")
        for _ in range(5):
            answers = await asyncio.gather(
                *(redis.incr("{surge}:turns" if i % 5 else "{surge}:text") for i in range(50)),
                return_exceptions=True,
            )
            assert sum(isinstance(a, ResponseError) for a in answers) == 10
            assert all(isinstance(a, (int, ResponseError)) for a in answers), answers
        assert int(await redis_client.get("{surge}:turns")) == 200
    finally:
        await redis.aclose()


async def test_a_wait_for_a_connection_past_its_bound_fails_as_redis_unavailable(
    redis_client: Redis, redis_url: str
) -> None:
    redis = connect(redis_url, cluster=on_cluster(), timeout_s=PATIENT, max_connections=1, wait_s=0.2)
    try:
        # A blocking pop holds the one connection (Redis itself stays responsive).
        blocker = asyncio.ensure_future(redis.blpop(["{surge}:nothing"], timeout=int(PATIENT)))
        deadline = time.monotonic() + 120
        while await _blocked_clients(redis_client) < 1:
            assert time.monotonic() < deadline, "the blocking pop never reached Redis"
            await asyncio.sleep(0.01)
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await redis.get("{surge}:k")
        await redis_client.lpush("{surge}:nothing", "x")
        assert list(await blocker) == [b"{surge}:nothing", b"x"]
        assert await redis.ping()  # the turn came back
    finally:
        await redis.aclose()


async def _blocked_clients(redis: Any) -> int:
    if isinstance(redis, RedisCluster):
        infos = list((await redis.info("clients", target_nodes=RedisCluster.PRIMARIES)).values())
    else:
        infos = [await redis.info("clients")]
    return sum(int(i.get("blocked_clients", 0)) for i in infos)


async def test_payments_past_the_redis_pool_wait_their_turn_and_all_pay(
    start_service: ServiceFactory, redis_client: Redis, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """400 buyers pay at the same instant while Redis is busy for a moment: every
    connection of the pool (256) is taken, and the rest wait for one instead of 503."""
    service = await start_service(redis_timeout_s=PATIENT)
    sku = new_id("sku")
    await service.create_sale({sku: 400})
    orders = {
        f"payer{i}": (await expect_json(await service.order(f"payer{i}", sku), 201))["order_id"]
        for i in range(400)
    }
    pays = [
        call(http, "POST", f"{service.url}/api/orders/{order_id}/pay", headers=buyer(user))
        for user, order_id in orders.items()
    ]
    seen = service.requests_seen
    async with FrozenRedis(redis_url, 2.0):
        answers = asyncio.ensure_future(burst(pays))
        # While Redis sleeps, every payment arrives and holds or waits for a connection.
        await until(
            lambda: service.requests_seen - seen >= len(pays) or answers.done(), "all payments arrived"
        )
    statuses = Counter(s for s, _ in await answers)
    assert statuses == {200: 400}
    assert [await stored_state(redis_client, o) for o in orders.values()] == ["paid"] * 400


async def test_a_crowd_on_a_64_bucket_product_page_does_not_fail_anyone(
    start_service: ServiceFactory, http: aiohttp.ClientSession
) -> None:
    """Each uncached page of a 64-bucket SKU reads 64 buckets: one pipeline now, and one
    read shared by the viewers arriving meanwhile — a crowd neither fails nor starves an
    order made at the same time."""
    service = await start_service(sku_cache_s=0.0, redis_timeout_s=PATIENT)
    hot, plain = new_id("hot"), new_id("sku")
    await service.create_sale({hot: 640}, sale=new_id("b")[:20], buckets=64)
    await service.create_sale({plain: 50})
    views = [call(http, "GET", f"{service.url}/api/skus/{hot}") for _ in range(300)]
    orders = [
        call(
            http,
            "POST",
            f"{service.url}/api/orders",
            json={"request_id": f"r-{i}", "sku": plain},
            headers=buyer(f"shopper{i}"),
        )
        for i in range(30)
    ]
    answers = await burst(views + orders)
    assert {(s, b["available"]) for s, b in answers[:300]} == {(200, 640)}
    assert Counter(s for s, _ in answers[300:]) == {201: 30}


# ----------------------------------------------------------------- 2. slow clients


def _order_head(token: str, length: int) -> bytes:
    return (
        "POST /api/orders HTTP/1.1\r\nHost: flashsale\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_thousand_half_bodies_of_one_buyer_do_not_starve_the_others(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service(read_timeout_s=2.0, redis_timeout_s=PATIENT)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 100}))["sale"]
    body = json.dumps({"request_id": "r-mallory", "sku": sku}).encode()
    half = _order_head(mint(TOKEN_SECRET, "mallory"), len(body)) + body[: len(body) // 2]
    seen = service.requests_seen

    async def hold_open() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await service.open_raw()
        writer.write(half)
        await writer.drain()
        return reader, writer

    sockets = await asyncio.gather(*(hold_open() for _ in range(1000)))
    try:
        await until(lambda: service.requests_seen - seen >= 1000, "the service took in every socket")
        # Mallory's thousand requests are in; everyone else still buys.
        for i in range(20):
            await expect_json(await service.order(f"honest{i}", sku), 201)
        answers = await asyncio.gather(*(read_response(reader) for reader, _ in sockets))
    finally:
        for _, writer in sockets:
            writer.close()
    codes = Counter((status, json.loads(payload)["error"]) for status, _, payload in answers)
    assert set(codes) <= {(429, "too_many_in_progress"), (408, "request_timeout")}, codes
    assert codes[(429, "too_many_in_progress")] > 0, "the per-buyer cap never engaged"
    assert await holds_of_request(redis_client, sale, "r-mallory") == []
    await until(lambda: service.state.buyers.in_progress("mallory") == 0, "mallory's turns given back")
    assert service.state.in_flight.current == 0
    await expect_json(await service.order("mallory", sku, request_id="r-mallory"), 201)


async def test_a_body_that_never_finishes_gets_408_json_and_changes_nothing(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await start_service(read_timeout_s=0.3)
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    before = await dump_redis(redis_client)
    body = json.dumps({"request_id": "r-slow", "sku": sku}).encode()
    reader, writer = await service.open_raw()
    try:
        writer.write(_order_head(mint(TOKEN_SECRET, "sloth"), len(body)) + body[:10])
        await writer.drain()
        status, headers, payload = await asyncio.wait_for(read_response(reader), 60)
    finally:
        writer.close()
    assert (status, headers["content-type"].split(";")[0]) == (408, "application/json")
    assert json.loads(payload)["error"] == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert changed_keys(before, await dump_redis(redis_client)) == []
    assert service.state.in_flight.current == 0 and service.state.buyers.in_progress("sloth") == 0


async def test_one_buyer_past_the_cap_hears_429_on_every_endpoint(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """The cap counts a buyer's requests in progress, whatever they are: with two turns
    taken by slow orders, a third request — lookup, pay, order — is refused at once."""
    service = await start_service(buyer_in_flight=2, read_timeout_s=PATIENT)
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    order_id = (await expect_json(await service.order("greedy", sku), 201))["order_id"]
    before = await dump_redis(redis_client)
    token = mint(TOKEN_SECRET, "greedy")
    slow = []
    for _ in range(2):
        reader, writer = await service.open_raw()
        writer.write(_order_head(token, 100) + b'{"request_id": ')
        await writer.drain()
        slow.append(writer)
    try:
        await until(lambda: service.state.buyers.in_progress("greedy") == 2, "both slow orders admitted")
        for method, path in [
            ("GET", f"/api/orders/{order_id}"),
            ("POST", f"/api/orders/{order_id}/pay"),
            ("POST", f"/api/orders/{order_id}/cancel"),
            ("POST", "/api/orders"),
        ]:
            resp = await service.client.request(
                method, path, json={"request_id": "r-more", "sku": sku}, headers=buyer("greedy")
            )
            await expect_json(resp, 429, "too_many_in_progress")
            assert int(resp.headers["Retry-After"]) >= 1
        assert changed_keys(before, await dump_redis(redis_client)) == []
        await expect_json(await service.order("other", sku), 201)  # another buyer is not capped
    finally:
        for writer in slow:
            writer.close()
    assert await stored_state(redis_client, order_id) == "held"
    await until(lambda: service.state.buyers.in_progress("greedy") == 0, "the slow orders' turns given back")
    await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("greedy")), 200)


# ------------------------------------------------------- 10. the fence, from the flag


async def test_pay_and_cancel_of_a_sale_fenced_in_redis_are_refused(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    """A fence raised by another process (or standing when this one started) is the
    ``fenced`` flag in Redis: orders checked it, payments and cancellations did not."""
    service = await start_service(sale_cache_s=0.0)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    order_id = (await expect_json(await service.order("alice", sku), 201))["order_id"]
    await redis_client.hset(f"fs:sale:{sale}", "fenced", "drill: Redis lost acknowledged writes")
    before = await dump_redis(redis_client)
    for action in ("pay", "cancel"):
        resp = await service.client.post(f"/api/orders/{order_id}/{action}", headers=buyer("alice"))
        body = await expect_json(resp, 503, "sale_fenced")
        assert "Redis lost" in body["message"] and int(resp.headers["Retry-After"]) >= 1
    assert changed_keys(before, await dump_redis(redis_client)) == []
    await redis_client.hset(f"fs:sale:{sale}", "fenced", "")
    paid = await expect_json(
        await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 200
    )
    assert paid["status"] == "paid"


@single_server_only("the fence guard is off on a Redis Cluster (it checks one server)")
async def test_while_fenced_the_guard_knows_the_buyer_before_it_reads_the_body(
    start_service: ServiceFactory, redis_client: Redis, pipeline_db_url: str, pipeline_pool: asyncpg.Pool
) -> None:
    """The fence guard names the sale of an order from its body: it used to read (without
    a deadline) and parse that body before anyone checked the token."""
    service = await start_service(database_url=pipeline_db_url, read_timeout_s=0.3)
    guard = service.app[GUARD]
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    await until(lambda: guard.sale_of_sku(sku) == sale, "the guard recorded the sale")
    await redis_client.hset(f"fs:sale:{sale}", "fenced", "drill")
    guard.fenced[sale] = "drill"  # what the guard sets when it finds the loss itself
    body = json.dumps({"request_id": "r-x", "sku": sku})
    for headers in ({}, {"Authorization": "Bearer forged.1.0.sig"}):
        resp = await service.client.post("/api/orders", data=body, headers=headers)
        await expect_json(resp, 401, "unauthorized")
    # A buyer with a body that never ends is not waited on forever.
    reader, writer = await service.open_raw()
    try:
        writer.write(_order_head(mint(TOKEN_SECRET, "alice"), len(body)) + body[:5].encode())
        await writer.drain()
        status, _, payload = await asyncio.wait_for(read_response(reader), 60)
    finally:
        writer.close()
    assert (status, json.loads(payload)["error"]) == (408, "request_timeout")
    await expect_json(await service.order("alice", sku, request_id="r-x"), 503, "sale_fenced")
    # (The guard itself writes to Redis in the background: look at the sale's stock only.)
    assert await holds_of_request(redis_client, sale, "r-x") == []
    assert (await service.sku_counters(sale, sku))["available"] == 5


# ------------------------------------------------------------------- the burst


@pytest.mark.timeout(600)
async def test_a_thousand_at_once_on_every_buyer_endpoint(
    start_service: ServiceFactory, redis_client: Redis, http: aiohttp.ClientSession
) -> None:
    """1,000 concurrent requests per phase on one process: orders (a plain SKU and a
    64-bucket SKU that sells out), product pages, lookups, then payments and cancellations
    with refusals mixed in. No 5xx; every 200 pay is paid in Redis; refusals change nothing."""
    service = await start_service(sku_cache_s=0.0, redis_timeout_s=PATIENT)
    plain, hot = new_id("sku"), new_id("hot")
    await service.create_sale([{"sku": plain, "stock": 600, "limit_per_user": 1}])
    await service.create_sale({hot: 300}, sale=new_id("b")[:20], buckets=64)
    url = service.url
    buyers = [f"b{i}" for i in range(1000)]
    plain_buyers, hot_buyers = buyers[:600], buyers[600:]

    def order_of(user: str, sku: str) -> Call:
        body = {"request_id": f"r-{user}", "sku": sku}
        return call(http, "POST", f"{url}/api/orders", json=body, headers=buyer(user))

    # Orders: 600 on the plain SKU, 400 on the 300 units of the bucketed one.
    answers = await burst([order_of(u, plain) for u in plain_buyers] + [order_of(u, hot) for u in hot_buyers])
    held = {u: b["order_id"] for u, (s, b) in zip(buyers, answers, strict=True) if s == 201}
    assert {(s, b["error"]) for s, b in answers if s != 201} <= {(409, "sold_out")}
    assert all(u in held for u in plain_buyers)
    skus = await _counters(service)
    assert (skus[plain]["held"], skus[plain]["available"]) == (600, 0)
    # Every unit of the hot SKU is held or still on sale (a refusal took nothing): none
    # twice. (A buyer can be told sold out while units are in transit between buckets.)
    assert skus[hot]["held"] == len(held) - 600 > 0
    assert skus[hot]["held"] + skus[hot]["available"] == skus[hot]["total"] == 300

    # Product pages, both SKUs, nothing cached.
    pages = await burst([call(http, "GET", f"{url}/api/skus/{(plain, hot)[i % 2]}") for i in range(1000)])
    assert {s for s, _ in pages} == {200}
    assert {b["available"] for _, b in pages[0::2]} == {0}

    # Lookups: every holder its own order, and 100 asking for someone else's (404; past
    # the snoop's own cap, 429).
    holders = list(held)
    lookups = [call(http, "GET", f"{url}/api/orders/{held[u]}", headers=buyer(u)) for u in holders]
    lookups += [
        call(http, "GET", f"{url}/api/orders/{held[u]}", headers=buyer("snoop")) for u in holders[:100]
    ]
    answers = await burst(lookups)
    assert all(s == 200 and b["status"] == "held" for s, b in answers[: len(holders)])
    assert {(s, b["error"]) for s, b in answers[len(holders) :]} <= {
        (404, "order_not_found"),
        (429, "too_many_in_progress"),
    }

    # Payments and cancellations, and two for each untouched order from someone else.
    payers, cancellers, untouched = holders[:400], holders[400:800], holders[800:]
    actions = [call(http, "POST", f"{url}/api/orders/{held[u]}/pay", headers=buyer(u)) for u in payers]
    actions += [
        call(http, "POST", f"{url}/api/orders/{held[u]}/cancel", headers=buyer(u)) for u in cancellers
    ]
    actions += [
        call(http, "POST", f"{url}/api/orders/{held[u]}/{a}", headers=buyer(f"thief{i}"))
        for i, u in enumerate(untouched)
        for a in ("pay", "cancel")
    ]
    answers = await burst(actions)
    paid, cancelled = answers[: len(payers)], answers[len(payers) : len(payers) + len(cancellers)]
    assert all(s == 200 and b["status"] == "paid" for s, b in paid)
    assert all(s == 200 and b["status"] == "cancelled" for s, b in cancelled)
    assert {(s, b["error"]) for s, b in answers[len(payers) + len(cancellers) :]} <= {
        (404, "order_not_found")
    }
    assert [await stored_state(redis_client, held[u]) for u in payers] == ["paid"] * len(payers)
    assert [await stored_state(redis_client, held[u]) for u in cancellers] == ["cancelled"] * len(cancellers)
    assert [await stored_state(redis_client, held[u]) for u in untouched] == ["held"] * len(untouched)
    skus = await _counters(service)
    for sku in (plain, hot):
        c = skus[sku]
        assert c["available"] + c["held"] + c["sold"] + c["reserve"] == c["total"], c
    assert skus[plain]["sold"] + skus[hot]["sold"] == len(payers)
    assert skus[plain]["held"] + skus[hot]["held"] == len(untouched)
    assert service.state.in_flight.current == 0


async def _counters(service: Service) -> dict[str, dict[str, int]]:
    """Every SKU's counters from the admin stats (not cached)."""
    stats = await expect_json(await service.client.get("/api/admin/stats", headers=ADMIN), 200)
    return {sku: c for sale in stats["sales"].values() for sku, c in sale["skus"].items()}
