"""The order writer's normal path: every order and stock change reaches PostgreSQL once,
with its final status, whatever order or how often the entries arrive; entries are
acknowledged only once committed; the stream is trimmed only below what is committed."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from redis.asyncio import Redis
from redis_mode import single_server_only

from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.pipeline.writer import OrderWriter
from flashsale.streams import GROUP, ensure_group, events_key, stream_backlog
from inventory import HoldState, Inventory, Line

pytestmark = pytest.mark.usefixtures("pipeline_pool")

STOCK = {"phone": 1000, "case": 1000}


async def orders_in_pg(pool: Any) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM orders")
    lines = await pool.fetch("SELECT order_id, sku, qty FROM order_lines")
    out = {r["order_id"]: dict(r) | {"lines": {}} for r in rows}
    for r in lines:
        out[r["order_id"]]["lines"][r["sku"]] = r["qty"]
    return out


async def holds_in_redis(inv: Inventory) -> dict[str, Any]:
    raw = await inv.redis.hgetall(inv.keys.holds)
    return {h: inv._parse_hold(h, v) for h, v in raw.items()}


def assert_same_orders(pg: dict[str, dict[str, Any]], holds: dict[str, Any]) -> None:
    assert set(pg) == set(holds)
    for hold_id, hold in holds.items():
        row = pg[hold_id]
        assert (row["status"], row["user_id"], row["request_id"]) == (
            hold.state.value,
            hold.user,
            hold.request_id,
        )
        assert row["lines"] == {line.sku: line.qty for line in hold.lines}
        assert int(row["pay_by"].timestamp() * 1000) == hold.deadline_ms
        assert int(row["created_at"].timestamp() * 1000) == hold.created_ms


async def make_orders(inv: Inventory, n: int, *, prefix: str = "r", one_by_one: bool = False) -> list[Any]:
    """``n`` orders, made together: coalesced into reservation calls of up to 64, each call
    one stream entry of its holds. ``one_by_one``: a call, so an entry, per order."""
    reservations = (
        inv.reserve(
            f"u{i % 40}",
            [Line("phone", 1)] + ([Line("case", 2)] if i % 3 == 0 else []),
            request_id=f"{prefix}{i}",
        )
        for i in range(n)
    )
    if one_by_one:
        return [await reservation for reservation in reservations]
    return list(await asyncio.gather(*reservations))


@pytest.mark.parametrize("method", ["unnest", "copy"])
async def test_every_order_and_stock_change_reaches_postgres(
    method: str, text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", {"phone": 500, "case": 800}, reserve=50)
    holds = await make_orders(inv, 120)
    for h in holds[:30]:
        await inv.confirm(h.hold_id)
    for h in holds[30:50]:
        await inv.release(h.hold_id)
    short = await inv.reserve("late", [Line("phone", 1)], request_id="short", hold_ttl=0.001)
    await asyncio.sleep(0.01)
    assert short.hold_id in (await inv.expire_due()).expired
    await inv.restock("phone", 7)
    await inv.adjust("case", -3)
    await inv.release_reserve("phone", 20)

    async with writer_running(write_method=method, batch=64) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 0
    assert writer.stats.entries_committed == await text_redis.xlen(inv.keys.events)

    pg = await orders_in_pg(pipeline_pool)
    assert_same_orders(pg, await holds_in_redis(inv))
    assert {r["status"] for r in pg.values()} == {"held", "paid", "cancelled", "expired"}
    events = await pipeline_pool.fetch(
        "SELECT type, sku, total, reserve, delta, units FROM stock_events ORDER BY stream_ms, stream_seq"
    )
    assert [tuple(e) for e in events] == [
        ("stocked", "phone", 500, 50, None, None),
        ("stocked", "case", 800, 50, None, None),
        ("restocked", "phone", None, None, 7, None),
        ("written_off", "case", None, None, -3, None),
        ("reserve_released", "phone", None, None, None, 20),
    ]
    # Acknowledged means committed: nothing pending, nothing undelivered.
    assert (await stream_backlog(text_redis, inv.keys.events)).total == 0


@pytest.mark.parametrize("batch", [8, 1000])
async def test_every_hold_of_a_reservation_calls_entry_is_written_and_the_entry_acknowledged_once(
    batch: int, text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    """One entry per reservation call, one change per hold: each hold reaches PostgreSQL,
    each entry is acknowledged once, and a transaction of about ``batch`` changes takes an
    entry whole (8: the 30 holds' entry is not split)."""
    inv = await pipeline_sale("d11", STOCK)
    await make_orders(inv, 30)
    await make_orders(inv, 1, prefix="s")
    await make_orders(inv, 5, prefix="m")
    entries = await text_redis.xrange(inv.keys.events)
    assert [len(f) - 2 for _, f in entries if f["type"] == "reserved_batch"] == [30, 1, 5]
    async with writer_running(batch=batch) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 0
    assert writer.stats.entries_committed == 2 + 3 and writer.stats.orders_written == 36
    assert_same_orders(await orders_in_pg(pipeline_pool), await holds_in_redis(inv))
    assert (await stream_backlog(text_redis, inv.keys.events)).total == 0


async def test_a_read_holds_about_a_batch_of_changes_not_a_batch_of_entries(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, redis_url: str
) -> None:
    """The writer holds about ``batch`` changes at a time, whatever the entries carry: ten
    reservation calls of 64 holds are read a few entries at a time at batch 128 (they were
    read whole, 640 holds and more for a batch of 128), and entries of one change each still
    come about a batch at a time (not one slice of ``batch // 64`` entries per read)."""
    inv = await pipeline_sale("d11", STOCK)  # two "stocked" entries
    for call in range(10):
        await make_orders(inv, 64, prefix=f"c{call}-")
    await make_orders(inv, 300, prefix="s", one_by_one=True)
    settings = WorkerSettings(redis_url=redis_url, consumer="w1", batch=128, block_ms=20, linger_ms=0)
    writer = OrderWriter(text_redis, pipeline_pool, settings)
    await writer.refresh_sales()
    reads: list[list[int]] = []  # the changes of each entry, per read
    while entries := await writer.backlog.read_new():
        assert all(e.fields is not None for e in entries)
        reads.append([len(e.fields) - 2 if e.fields["type"] == "reserved_batch" else 1 for e in entries])  # type: ignore[index]
        await writer.commit(entries)
    held = [sum(r) for r in reads]
    assert sum(held) == 2 + 640 + 300 and writer.stats.orders_written == 940
    assert max(held) <= 128 + 64, held  # at most one entry past the batch
    assert max(len(r) for r in reads) >= 128, reads  # single entries: a batch's worth per read
    assert (await stream_backlog(text_redis, inv.keys.events)).total == 0


async def test_replaying_the_whole_stream_changes_nothing(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", STOCK)
    holds = await make_orders(inv, 40)
    await inv.confirm(holds[0].hold_id)
    async with writer_running():
        await drained(text_redis, ["d11"])
    before = await pipeline_pool.fetch("SELECT * FROM orders ORDER BY order_id")
    # Every entry delivered again, as after a crash before XACK: idempotent on the order id.
    await text_redis.xgroup_setid(inv.keys.events, GROUP, "0")
    async with writer_running(consumer="w2") as writer:
        await drained(text_redis, ["d11"])
    # Stocked twice, the 40 holds' one entry, the confirm.
    assert writer.stats.entries_committed == await text_redis.xlen(inv.keys.events) == 2 + 1 + 1
    assert writer.stats.rows_written == 0
    assert await pipeline_pool.fetch("SELECT * FROM orders ORDER BY order_id") == before
    assert await pipeline_pool.fetchval("SELECT count(*) FROM order_lines") == 40 + 14
    assert await pipeline_pool.fetchval("SELECT count(*) FROM stock_events") == 2


def _entry(kind: str, order: str, at: int, **extra: str) -> dict[str, str]:
    return {
        "type": kind,
        "order": order,
        "user": "alice",
        "lines": "phone:1",
        "request": "req-" + order[-3:],
        "deadline": "1900000000000",
        "at": str(at),
        **extra,
    }


@pytest.mark.parametrize("batch", [1, 100])
async def test_status_only_moves_forward(
    batch: int, text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    """Entries out of order (a reclaimed or retried entry) never take an order backwards;
    the first terminal status an order reaches is the one it keeps."""
    key = events_key("fs", "d11")
    await text_redis.sadd("fs:sales", "d11")
    await ensure_group(text_redis, key)
    a, b, c = "d11.aaa", "d11.bbb", "d11.ccc"
    for fields in (
        _entry("confirmed", a, 2000),  # the terminal entry first…
        _entry("reserved", a, 1000),  # …then the late "reserved": stays paid, learns created_at
        _entry("reserved", b, 1000),
        _entry("released", b, 3000),
        _entry("expired", b, 4000),  # a second terminal status (a bug upstream) is ignored
        _entry("reserved", c, 1000),
    ):
        await text_redis.xadd(key, fields)
    async with writer_running(batch=batch):
        await drained(text_redis, ["d11"])
    rows = {r["order_id"]: r for r in await pipeline_pool.fetch("SELECT * FROM orders")}
    assert rows[a]["status"] == "paid" and rows[a]["status_rank"] == 1
    assert int(rows[a]["created_at"].timestamp() * 1000) == 1000
    assert int(rows[a]["status_at"].timestamp() * 1000) == 2000
    assert rows[b]["status"] == "cancelled" and int(rows[b]["status_at"].timestamp() * 1000) == 3000
    assert rows[c]["status"] == "held"


async def test_a_restarted_writer_rereads_its_own_pending_entries_first(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", STOCK)
    await ensure_group(text_redis, inv.keys.events)
    await make_orders(inv, 25)
    # A previous run of "w1" read everything and died before committing.
    got = await text_redis.xreadgroup(GROUP, "w1", {inv.keys.events: ">"}, count=1000)
    assert len(got[0][1]) == 2 + 1  # stocked twice, the 25 holds' one entry
    # Nothing new arrives, and reclaiming is off: only re-reading its own pending saves them.
    async with writer_running(consumer="w1", claim_interval_s=0) as writer:
        await drained(text_redis, ["d11"])
    assert writer.stats.reclaimed == 0
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 25


async def test_a_dead_consumers_entries_are_reclaimed(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", STOCK)
    await ensure_group(text_redis, inv.keys.events)
    await make_orders(inv, 25)
    await text_redis.xreadgroup(GROUP, "dead-worker", {inv.keys.events: ">"}, count=1000)
    async with writer_running(consumer="w2", claim_idle_ms=200, claim_interval_s=0.05) as writer:
        await drained(text_redis, ["d11"])
        assert writer.stats.reclaimed == 2 + 1
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 25
    pending = await text_redis.xpending(inv.keys.events, GROUP)
    assert pending["pending"] == 0


async def test_nothing_is_acknowledged_before_it_is_committed(
    text_redis: Redis,
    pipeline_db_url: str,
    pipeline_pool: Any,
    pipeline_sale: Any,
    writer_running: Any,
    drained: Any,
) -> None:
    """A database that cannot take the writes (here: the schema is missing) keeps every entry
    pending — none acknowledged, none dead-lettered — and they are written once it can."""
    from flashsale.pgpool import close_pool, create_pool

    inv = await pipeline_sale("d11", STOCK)
    await make_orders(inv, 10)
    await pipeline_pool.execute("ALTER TABLE orders RENAME TO orders_away")
    async with writer_running(batch=4) as writer:
        while writer.stats.retries < 3:
            await asyncio.sleep(0.02)
        backlog = await stream_backlog(text_redis, inv.keys.events)
        assert backlog.total == 2 + 1 and writer.stats.entries_committed == 0
        assert await text_redis.exists("{fs:d11}:dead") == 0
        await pipeline_pool.execute("ALTER TABLE orders_away RENAME TO orders")
        await drained(text_redis, ["d11"])
    assert writer.stats.dead_letters == 0
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 10


async def test_stale_pooled_connections_are_replaced(
    text_redis: Redis,
    pipeline_db_url: str,
    pipeline_pool: Any,
    pipeline_sale: Any,
    writer_running: Any,
    drained: Any,
) -> None:
    """What a PostgreSQL restart does to a pool: every connection it holds is dead."""
    from flashsale.pgpool import close_pool, create_pool

    name = "stale-" + secrets.token_hex(4)
    writer_pool = await create_pool(pipeline_db_url, min_size=2, max_size=2, application_name=name)
    inv = await pipeline_sale("d11", STOCK)
    try:
        async with writer_running(pool=writer_pool) as writer:
            await make_orders(inv, 5, prefix="a")
            await drained(text_redis, ["d11"])
            killed = await pipeline_pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                name,
            )
            assert killed == 2
            await make_orders(inv, 5, prefix="b")
            await drained(text_redis, ["d11"])
    finally:
        await close_pool(writer_pool)
    assert writer.stats.dead_letters == 0
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 10


async def test_trim_keeps_every_entry_not_yet_committed(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", STOCK)
    key = inv.keys.events
    await ensure_group(text_redis, key)
    await make_orders(inv, 10, prefix="a", one_by_one=True)  # with the 2 "stocked" entries: 12
    # A slow consumer holds the first 3 entries, unacknowledged.
    slow = await text_redis.xreadgroup(GROUP, "slow", {key: ">"}, count=3)
    kept = [i for i, _ in slow[0][1]]
    await make_orders(inv, 10, prefix="b", one_by_one=True)
    async with writer_running(claim_interval_s=0, trim_interval_s=0) as writer:
        while writer.stats.entries_committed < 22 - 3:
            await asyncio.sleep(0.02)
        await writer.trim()
        left = [i for i, _ in await text_redis.xrange(key)]
        assert len(left) == 22 and left[:3] == kept  # the oldest uncommitted: nothing below it goes
        await text_redis.xack(key, GROUP, *kept[:2])  # as if the slow consumer committed two
        await writer.trim()
        assert [i for i, _ in await text_redis.xrange(key)] == left[2:]
        assert writer.stats.trimmed == 2
    # Undelivered entries are never trimmed either.
    await text_redis.xack(key, GROUP, kept[2])
    await make_orders(inv, 3, prefix="c", one_by_one=True)
    tail = [i for i, _ in await text_redis.xrange(key)][-3:]
    idle = OrderWriter(text_redis, pipeline_pool, writer.settings)
    await idle.refresh_sales()
    await idle.trim()
    assert [i for i, _ in await text_redis.xrange(key)] == tail


async def test_backlog_counts_pending_and_undelivered(text_redis: Redis, pipeline_sale: Any) -> None:
    inv = await pipeline_sale("d11", STOCK)
    key = inv.keys.events
    assert (await stream_backlog(text_redis, key)).total == 2  # the "stocked" entries, no group yet
    await ensure_group(text_redis, key)
    await make_orders(inv, 9, one_by_one=True)
    await text_redis.xreadgroup(GROUP, "w", {key: ">"}, count=4)
    b = await stream_backlog(text_redis, key)
    assert (b.length, b.pending) == (11, 4)
    assert b.undelivered >= 7 and (b.exact or b.undelivered == 7)  # an upper bound on Redis 6.2
    await text_redis.xreadgroup(GROUP, "w", {key: ">"}, count=100)
    b = await stream_backlog(text_redis, key)
    assert (b.pending, b.undelivered, b.exact) == (11, 0, True)


async def test_new_sales_are_joined_while_running(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    first = await pipeline_sale("first")  # phone only
    async with writer_running() as writer:
        await first.reserve("u", "phone", request_id="r1")
        await drained(text_redis, ["first"])
        second = await pipeline_sale("second")
        hold = await second.reserve("u", "phone", request_id="r1")
        await drained(text_redis, ["first", "second"])
        assert writer.sales == ["first", "second"]
    row = await pipeline_pool.fetchrow("SELECT sale, status FROM orders WHERE order_id = $1", hold.hold_id)
    assert tuple(row) == ("second", HoldState.HELD.value)


async def test_stop_finishes_and_publishes_the_counters(
    text_redis: Redis, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    inv = await pipeline_sale("d11", STOCK)
    await make_orders(inv, 12)
    async with writer_running() as writer:
        await drained(text_redis, ["d11"])
    stats = await text_redis.hgetall("fs:writer:stats")
    assert int(stats["entries_total"]) == writer.stats.entries_committed == 2 + 1  # the 12 holds: one entry
    assert int(stats["orders_total"]) == 12
    assert int(stats["rows_total"]) == writer.stats.rows_written == 12 + 16 + 2  # orders, lines, stock events
    assert float(stats["last_batch_ms"]) > 0


async def test_a_redis_outage_is_waited_out(
    engine_stack: Any,
    redis_url: str,
    text_redis: Redis,
    pipeline_pool: Any,
    pipeline_sale: Any,
    drained: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops answering for a while (frozen: a failover, a long fork): the writer logs
    the outage once, waits, and carries on where it was."""
    from flashsale.pipeline.worker_settings import WorkerSettings

    if engine_stack.redis is None:
        pytest.skip("FLASHSALE_REDIS_URL names an outside Redis: this test must freeze it")
    inv = await pipeline_sale("d11", STOCK)
    await make_orders(inv, 10, prefix="a")
    impatient = Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)
    settings = WorkerSettings(redis_url=redis_url, consumer="w1", block_ms=20, sales_refresh_s=0.05)
    writer = OrderWriter(impatient, pipeline_pool, settings)
    caplog.set_level("INFO", logger="flashsale.worker")
    task = asyncio.ensure_future(writer.run())
    try:
        await drained(text_redis, ["d11"])
        engine_stack.redis.pause()
        try:
            await asyncio.sleep(1.5)
        finally:
            engine_stack.redis.resume()
        assert not task.done()
        await make_orders(inv, 10, prefix="b")
        await drained(text_redis, ["d11"])
    finally:
        writer.stop()
        await asyncio.wait_for(task, 30)
        await impatient.aclose()
    events = [r.getMessage() for r in caplog.records if r.name == "flashsale.worker"]
    assert events.count("redis_unavailable") == 1 and events.count("redis_recovered") == 1
    assert await pipeline_pool.fetchval("SELECT count(*) FROM orders") == 20


async def test_a_bytes_client_writes_the_same_rows(
    redis_client: Redis,
    text_redis: Redis,
    pipeline_pool: Any,
    pipeline_sale: Any,
    redis_url: str,
    drained: Any,
) -> None:
    from flashsale.pipeline.worker_settings import WorkerSettings

    inv = await pipeline_sale("d11", STOCK)
    await make_orders(inv, 10)
    writer = OrderWriter(
        redis_client, pipeline_pool, WorkerSettings(redis_url=redis_url, consumer="w1", block_ms=20)
    )
    task = asyncio.ensure_future(writer.run())
    try:
        await drained(text_redis, ["d11"])
    finally:
        writer.stop()
        await asyncio.wait_for(task, 30)
    assert writer.stats.dead_letters == 0
    assert_same_orders(await orders_in_pg(pipeline_pool), await holds_in_redis(inv))


@single_server_only("CLIENT KILL reaches one node of a cluster")
async def test_after_a_redis_outage_the_writer_rereads_its_own_pending_entries(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> None:
    """An XACK lost with the connection, after its commit, leaves entries pending to this
    consumer. Once Redis answers again the writer reads them again itself, at once — not
    after XAUTOCLAIM's idle time (switched off here, so only the re-read can write them)."""
    inv = await pipeline_sale("d11", {"phone": 100, "case": 100})
    async with writer_running(claim_interval_s=0) as writer:
        await make_orders(inv, 5, prefix="before")
        await drained(text_redis, ["d11"])
        # Entries delivered to this consumer whose acknowledgement was lost: made and read
        # in one MULTI, so the running writer cannot read them as new in between.
        async with text_redis.pipeline(transaction=True) as pipe:
            for i in range(7):
                argv = [1, f"lost-ack{i}", f"d11.{secrets.token_hex(12)}", f"u{i}", 1_800_000, 1, "phone", 1]
                await inv._scripts["reserve"](keys=inv.keys.for_reserve(), args=argv, client=pipe)
            pipe.xreadgroup(GROUP, "w1", {inv.keys.events: ">"}, count=100)
            await pipe.execute()
        assert int((await text_redis.xpending(inv.keys.events, GROUP))["pending"]) == 7
        # The writer's connections drop (as in a network blip); the test's own client stays.
        await text_redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await drained(text_redis, ["d11"], timeout=15)
        assert writer.stats.entries_committed >= 2 + 1 + 7  # stocked, the 5 holds' entry, the 7
    pg = await orders_in_pg(pipeline_pool)
    assert len(pg) == 12
    assert_same_orders(pg, await holds_in_redis(inv))
