"""After the order: GET /api/orders/{id}, pay and cancel — owner only, idempotent, and
one winner between paying, cancelling and the payment deadline. With PostgreSQL: an
order Redis no longer has is looked up where the order writer put it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
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
    now_ms,
    sale_keys,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)


async def _held(
    service: Service, user: str = "alice", qty: int = 1, **sale_fields: Any
) -> tuple[str, str, str]:
    """A sale with one SKU of 5 units and one order of ``user``: (sale, sku, order id)."""
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}, **sale_fields))["sale"]
    order = await expect_json(await service.order(user, sku, qty), 201)
    return sale, sku, order["order_id"]


async def test_owner_sees_the_order_others_get_404(service: Service) -> None:
    sale, sku, order_id = await _held(service, qty=2)
    mine = await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200)
    assert (mine["order_id"], mine["status"], mine["sale"]) == (order_id, "held", sale)
    assert mine["lines"] == [{"sku": sku, "qty": 2}]
    assert mine["replayed"] is False
    for path in (f"/api/orders/{order_id}", f"/api/orders/{order_id}/pay", f"/api/orders/{order_id}/cancel"):
        method = service.client.get if path.endswith(order_id) else service.client.post
        body = await expect_json(await method(path, headers=buyer("mallory")), 404, "order_not_found")
        assert "alice" not in str(body)
    # Mallory's attempts changed nothing.
    assert (await service.sku_counters(sale, sku))["held"] == 2


@pytest.mark.parametrize(
    "order_id",
    [
        "nope",
        "no-such-sale.abc",
        "{sale}.doesnotexist",
        "{sale}." + "x" * 80,
        "{sale}.a b",
        "{sale}.%C3%A9",
        "a.",
    ],
)
async def test_unknown_or_malformed_order_ids_are_404(
    service: Service, redis_client: Redis, order_id: str
) -> None:
    sale, _, _ = await _held(service)
    path = "/api/orders/" + order_id.format(sale=sale)
    before = await dump_redis(redis_client)
    await expect_json(await service.client.get(path, headers=buyer("alice")), 404, "order_not_found")
    await expect_json(
        await service.client.post(path + "/pay", headers=buyer("alice")), 404, "order_not_found"
    )
    await expect_json(
        await service.client.post(path + "/cancel", headers=buyer("alice")), 404, "order_not_found"
    )
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_pay_is_idempotent_and_sells_once(service: Service, redis_client: Redis) -> None:
    sale, sku, order_id = await _held(service, qty=2)
    paid = await expect_json(
        await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 200
    )
    assert paid == {"order_id": order_id, "status": "paid"}
    before = await dump_redis(redis_client)
    again = await expect_json(
        await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 200
    )
    assert again == paid
    assert changed_keys(before, await dump_redis(redis_client)) == [], "a repeated payment changed state"
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (3, 0, 2)
    shown = await expect_json(
        await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200
    )
    assert shown["status"] == "paid"


async def test_cancel_is_idempotent_and_returns_stock_once(service: Service, redis_client: Redis) -> None:
    sale, sku, order_id = await _held(service, qty=2)
    url = f"/api/orders/{order_id}/cancel"
    cancelled = await expect_json(await service.client.post(url, headers=buyer("alice")), 200)
    assert cancelled == {"order_id": order_id, "status": "cancelled"}
    before = await dump_redis(redis_client)
    assert await expect_json(await service.client.post(url, headers=buyer("alice")), 200) == cancelled
    assert changed_keys(before, await dump_redis(redis_client)) == [], "a repeated cancel changed state"
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (5, 0, 0)


async def test_cancel_after_pay_is_hold_paid_and_pay_after_cancel_is_hold_cancelled(service: Service) -> None:
    sale, sku, paid_id = await _held(service)
    await expect_json(await service.client.post(f"/api/orders/{paid_id}/pay", headers=buyer("alice")), 200)
    await expect_json(
        await service.client.post(f"/api/orders/{paid_id}/cancel", headers=buyer("alice")), 409, "hold_paid"
    )

    cancelled = await expect_json(await service.order("bob", sku), 201)
    url = f"/api/orders/{cancelled['order_id']}"
    await expect_json(await service.client.post(url + "/cancel", headers=buyer("bob")), 200)
    await expect_json(await service.client.post(url + "/pay", headers=buyer("bob")), 409, "hold_cancelled")
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (4, 0, 1)


async def test_paying_after_the_deadline_is_hold_expired_and_the_unit_is_for_sale_again(
    service: Service, redis_client: Redis
) -> None:
    sale, sku, order_id = await _held(service, hold_ttl_s=0.2)
    order = await expect_json(
        await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200
    )
    await asyncio.sleep(max(0.0, (order["pay_by_ms"] - now_ms()) / 1000) + 0.05)
    await expect_json(
        await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 409, "hold_expired"
    )
    counters = await service.sku_counters(sale, sku)
    assert (counters["available"], counters["held"], counters["sold"]) == (5, 0, 0)
    assert await redis_client.zscore(sale_keys(sale).deadlines, order_id) is None
    shown = await expect_json(
        await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200
    )
    assert shown["status"] == "expired"
    # Paying again does not resurrect it; the unit really is for sale.
    await expect_json(
        await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 409, "hold_expired"
    )
    await expect_json(await service.order("bob", sku, 5), 201)


async def test_cancelling_a_lapsed_order_says_expired(service: Service) -> None:
    sale, sku, order_id = await _held(service, hold_ttl_s=0.1)
    await asyncio.sleep(0.2)
    body = await expect_json(
        await service.client.post(f"/api/orders/{order_id}/cancel", headers=buyer("alice")), 200
    )
    assert body == {"order_id": order_id, "status": "expired"}
    assert (await service.sku_counters(sale, sku))["available"] == 5


async def test_order_lookup_can_be_switched_off(start_service: ServiceFactory) -> None:
    service = await start_service(sale_cache_s=0.0)
    _, sku, order_id = await _held(service)
    off = await service.client.post("/api/admin/switches", json={"order_lookup": False}, headers=ADMIN)
    assert (await expect_json(off, 200))["order_lookup"] is False
    resp = await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice"))
    await expect_json(resp, 503, "degraded")
    assert int(resp.headers["Retry-After"]) >= 1
    # The essentials still work while lookup is off.
    await expect_json(await service.order("bob", sku), 201)
    await expect_json(await service.client.post(f"/api/orders/{order_id}/pay", headers=buyer("alice")), 200)
    await expect_json(
        await service.client.post("/api/admin/switches", json={"order_lookup": True}, headers=ADMIN), 200
    )
    await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200)


# ------------------------------------------------------------- with PostgreSQL


async def _archived(pipeline_pool: Any, sale: str, sku: str, pay_by: datetime) -> str:
    """An order of Alice's that only PostgreSQL has (its sale was archived): its id."""
    order_id = f"{sale}.archived1"
    await pipeline_pool.execute(
        "INSERT INTO orders (order_id, sale, user_id, request_id, status, status_rank, created_at, pay_by,"
        " status_at, last_stream_id) VALUES ($1, $2, 'alice', 'r-old', 'paid', 1, $3, $3, $3, '1-0')",
        order_id,
        sale,
        pay_by,
    )
    await pipeline_pool.execute(
        "INSERT INTO order_lines (order_id, sku, qty) VALUES ($1, $2, 2)", order_id, sku
    )
    return order_id


async def test_order_redis_no_longer_has_is_read_from_postgresql(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any
) -> None:
    """pipeline_pool: the test's own schema with every migration (flashsale.pipeline.migrate) applied."""
    service = await start_service(database_url=pipeline_db_url)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    pay_by = datetime(2026, 11, 11, 0, 30, tzinfo=UTC)
    order_id = await _archived(pipeline_pool, sale, sku, pay_by)
    shown = await expect_json(
        await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200
    )
    assert (shown["order_id"], shown["status"], shown["request_id"]) == (order_id, "paid", "r-old")
    assert shown["lines"] == [{"sku": sku, "qty": 2}]
    assert shown["pay_by_ms"] == int(pay_by.timestamp() * 1000)
    await expect_json(
        await service.client.get(f"/api/orders/{order_id}", headers=buyer("bob")), 404, "order_not_found"
    )
    # Without the database configured, the same id is simply not found.
    plain = await start_service()
    await expect_json(
        await plain.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 404, "order_not_found"
    )


#: Far past the look-up's deadline (twice the Redis timeout the archive tests give): a
#: look-up not answered by then waits on PostgreSQL without a bound.
UNBOUNDED_S = 15.0


async def _archive_unavailable(service: Service, order_id: str) -> None:
    lookup = service.client.get(f"/api/orders/{order_id}", headers=buyer("alice"))
    resp = await asyncio.wait_for(lookup, UNBOUNDED_S)
    await expect_json(resp, 503, "archive_unavailable")
    assert int(resp.headers["Retry-After"]) >= 1


async def test_an_archived_order_with_every_pool_connection_taken_is_503_not_a_wait(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any
) -> None:
    """The service's PostgreSQL pool full: the look-up waits for a connection no longer than
    its deadline, then says the archive cannot answer (an outage: 503) - never "no such
    order", which would tell the buyer their order does not exist."""
    service = await start_service(database_url=pipeline_db_url, redis_timeout_s=0.5)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    order_id = await _archived(pipeline_pool, sale, sku, datetime(2026, 11, 11, 0, 30, tzinfo=UTC))
    pool = service.state.pg
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        await _archive_unavailable(service, order_id)
    finally:
        for conn in held:
            await pool.release(conn)
    await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200)


async def test_an_archived_order_while_postgresql_is_frozen_is_503_not_404(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any, engine_stack: Any
) -> None:
    """PostgreSQL frozen (SIGSTOP: connections accepted, never answered): the connect and
    the query are bounded by the look-up's deadline and the answer is 503, not 404."""
    if engine_stack.postgres is None:
        pytest.skip("FLASHSALE_DATABASE_URL names an outside PostgreSQL: this test must freeze it")
    service = await start_service(database_url=pipeline_db_url, redis_timeout_s=0.5)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 5}))["sale"]
    order_id = await _archived(pipeline_pool, sale, sku, datetime(2026, 11, 11, 0, 30, tzinfo=UTC))
    # One look-up first, so the pool keeps a connection: the query is frozen, not only a connect.
    await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200)
    engine_stack.postgres.pause()
    try:
        await _archive_unavailable(service, order_id)  # the pooled connection's query
        await _archive_unavailable(service, f"{sale}.other")  # not known either way: not a 404
    finally:
        engine_stack.postgres.resume()
    await expect_json(await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200)
    await expect_json(
        await service.client.get(f"/api/orders/{sale}.other", headers=buyer("alice")), 404, "order_not_found"
    )
    # Stopped before the schema is dropped: the service's own work on PostgreSQL (its fence
    # check), put off by the freeze, deadlocked with DROP SCHEMA in the fixture's teardown.
    await service.client.close()


#: The table behind the test's ``orders`` view, and the view's gate: a wait on an advisory
#: lock the test holds that swallows every cancel PostgreSQL is sent (as a backend stuck in
#: I/O, or cut off from the client by the network, never confirms one), until the test lets go.
_STUBBORN_ARCHIVE = """
CREATE TABLE archived_rows (
    order_id text PRIMARY KEY, user_id text, status text, request_id text,
    pay_by timestamptz, created_at timestamptz, status_at timestamptz);
CREATE TABLE order_lines (order_id text, sku text, qty int);
CREATE FUNCTION stubborn_gate(key bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        BEGIN
            PERFORM pg_advisory_xact_lock_shared(key);
            RETURN true;
        EXCEPTION WHEN query_canceled THEN
            NULL;  -- the cancel is not obeyed: wait on
        END;
    END LOOP;
END $$;
CREATE VIEW orders AS SELECT * FROM archived_rows WHERE stubborn_gate({key});
"""


async def test_an_archived_order_stuck_in_postgresql_is_503_within_its_deadline(
    start_service: ServiceFactory, pipeline_db_url: str
) -> None:
    """The look-up's query stuck in PostgreSQL, which does not confirm the cancel asyncpg
    sends at the deadline: the buyer hears 503 archive_unavailable at the deadline, not
    once asyncpg has waited as long again for the confirmation before it gives the
    connection up; and the pool has every connection back afterwards."""
    import asyncpg

    key = int.from_bytes(new_id("k").encode()[-6:], "big")
    admin = await asyncpg.connect(pipeline_db_url)
    try:
        await admin.execute(_STUBBORN_ARCHIVE.replace("{key}", str(key)))
        service = await start_service(database_url=pipeline_db_url, redis_timeout_s=2.5)
        deadline_s = service.state.archive_deadline.seconds
        sku = new_id("sku")
        sale = (await service.create_sale({sku: 5}))["sale"]
        order_id = f"{sale}.archived1"
        at = datetime(2026, 11, 11, 0, 30, tzinfo=UTC)
        await admin.execute(
            "INSERT INTO archived_rows VALUES ($1, 'alice', 'paid', 'r-old', $2, $2, $2)", order_id, at
        )
        await admin.execute("INSERT INTO order_lines VALUES ($1, $2, 2)", order_id, sku)
        await admin.execute("SELECT pg_advisory_lock($1)", key)
        try:
            started = time.monotonic()
            await _archive_unavailable(service, order_id)
            took = time.monotonic() - started
        finally:
            await admin.execute("SELECT pg_advisory_unlock($1)", key)
        # Asked at the deadline, the cancel is never confirmed: waiting for it (as long as
        # the deadline again) doubled the answer. Room is left for a busy machine, not that.
        assert deadline_s <= took < deadline_s * 1.6, f"answered in {took:.1f} s, deadline {deadline_s} s"

        pool = service.state.pg
        assert pool is not None

        async def every_connection_back() -> bool:
            return pool.get_idle_size() == pool.get_size()

        await _eventually(every_connection_back, "a look-up's connection never came back to the pool")
        shown = await expect_json(
            await service.client.get(f"/api/orders/{order_id}", headers=buyer("alice")), 200
        )
        assert (shown["order_id"], shown["status"]) == (order_id, "paid")
        await _eventually(every_connection_back, "the pool is not whole after a look-up")
        assert pool.get_size() <= pool.get_max_size()

        async def nothing_stuck() -> bool:  # (before the fixture drops the schema)
            stuck = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
                " AND classid::bigint = $1::bigint >> 32 AND objid::bigint = $1::bigint & 4294967295",
                key,
            )
            return bool(stuck == 0)

        await _eventually(nothing_stuck, "the stuck look-up still runs in PostgreSQL")
    finally:
        await admin.close()


async def _eventually(check: Any, what: str, timeout: float = 30.0) -> None:
    """Wait until ``await check()`` (PostgreSQL and the pool settle on their own time)."""
    give_up = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < give_up, what
        await asyncio.sleep(0.02)
