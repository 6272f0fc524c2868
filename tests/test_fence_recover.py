"""The fence and recovery, end to end on real servers: a Redis that comes back empty or from
an older copy is noticed, the sale is fenced (503 sale_fenced, also on pay and cancel, and
still when the settings hash vanishes), ``recover`` rebuilds it from PostgreSQL, the audit
is clean and the sale sells out exactly. Without the fence the same loss oversells.

Each test runs its own redis-server (so it can be killed and restarted) with AOF
``always``, a fresh PostgreSQL schema, the service app (``create_app`` + ``fence_guard.install``)
behind aiohttp's test server, and the order writer and sweeper as tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from flashsale.drills.checker import History, Operation, check, classify, observe
from flashsale.fence import verify as fence
from flashsale.fence.recovery import _drain, forget, recover
from flashsale.pipeline.audit import run_audit
from flashsale.pipeline.sweeper import HoldSweeper
from flashsale.pipeline.worker_settings import WorkerSettings
from flashsale.pipeline.writer import OrderWriter
from flashsale.runtime.embedded import RedisServer
from flashsale.service import fence_guard
from flashsale.service.app import create_app
from flashsale.service.sales import SaleBook, SaleSettings, now_ms
from flashsale.service.tokens import mint
from flashsale.settings import Settings
from flashsale.streams import stream_drained
from inventory import BucketedInventory, Inventory, SaleKeys, SoldOut

SECRET, ADMIN = "fence-secret", "fence-admin"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
STOCK = 40


async def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    server: RedisServer
    db_url: str
    pool: asyncpg.Pool
    redis: Redis  # decoded, not hooked by any guard
    client: TestClient | None = None
    history: History = field(default_factory=History)
    _worker: list[asyncio.Task[None]] = field(default_factory=list)
    _stops: list[Any] = field(default_factory=list)
    _clients: list[Redis] = field(default_factory=list)

    async def start_service(self, *, fenced: bool = True) -> None:
        settings = Settings(
            redis_url=self.server.url,
            database_url=self.db_url,
            token_secret=SECRET,
            admin_token=ADMIN,
            user_rate=1000.0,
            user_burst=1000,
            redis_timeout_s=0.5,
            sale_cache_s=0.1,
            sold_out_cache_s=0.1,
        )
        app = create_app(settings)
        if fenced:  # create_app installs the fence; faster timers for the test
            fence_guard.install(app, poll_s=0.1, record_s=0.2)  # verify_s: the default, as deployed
        else:
            fence_guard.uninstall(app)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()

    async def start_worker(self) -> None:
        redis = Redis.from_url(self.server.url, decode_responses=True, socket_timeout=5)
        self._clients.append(redis)
        ws = WorkerSettings(
            redis_url=self.server.url,
            database_url=self.db_url,
            consumer="t1",
            block_ms=50,
            # Entries read but not acknowledged when Redis went away are only
            # re-read by XAUTOCLAIM: keep its idle time short in tests.
            claim_idle_ms=1000,
            claim_interval_s=0.5,
            sales_refresh_s=0.2,
            trim_interval_s=0,
            progress_interval_s=0,
        )
        writer = OrderWriter(redis, self.pool, ws)
        sweeper = HoldSweeper(redis, interval_s=0.1, sales_refresh_s=0.2)
        self._stops += [writer.stop, sweeper.stop]
        self._worker += [asyncio.ensure_future(writer.run()), asyncio.ensure_future(sweeper.run())]

    async def close(self) -> None:
        for stop in self._stops:
            stop()
        for task in self._worker:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        if self.client is not None:
            await self.client.close()
        for r in self._clients:
            await r.aclose()

    # -- the API, recorded in the history
    async def create_sale(self, sale: str, **extra: Any) -> None:
        assert self.client is not None
        resp = await self.client.post(
            "/api/admin/sales",
            headers=ADMIN_HEADERS,
            json={
                "sale": sale,
                "open": True,
                "hold_ttl_s": 60,
                "skus": [{"sku": f"{sale}-phone", "stock": STOCK}],
                **extra,
            },
        )
        assert resp.status == 201, await resp.text()

    async def order(
        self, user: str, sku: str, request_id: str, attempt: int = 0
    ) -> tuple[int, dict[str, Any]]:
        assert self.client is not None
        headers = {"Authorization": f"Bearer {mint(SECRET, user)}"}
        if attempt:
            headers["X-Retry-Attempt"] = str(attempt)
        started = time.monotonic()
        resp = await self.client.post(
            "/api/orders", headers=headers, json={"request_id": request_id, "sku": sku, "qty": 1}
        )
        body = await resp.json()
        self.history.add(
            Operation(
                "order",
                request_id,
                user,
                attempt,
                started,
                time.monotonic(),
                resp.status,
                classify(resp.status, body.get("error")),
                body.get("error", ""),
                body.get("order_id"),
                body.get("status"),
                ((sku, 1),),
                bool(body.get("replayed")),
            )
        )
        return resp.status, body

    async def close_order(self, user: str, order_id: str, action: str) -> tuple[int, dict[str, Any]]:
        assert self.client is not None
        started = time.monotonic()
        resp = await self.client.post(
            f"/api/orders/{order_id}/{action}", headers={"Authorization": f"Bearer {mint(SECRET, user)}"}
        )
        body = await resp.json()
        self.history.add(
            Operation(
                "pay" if action == "pay" else "cancel",
                order_id,
                user,
                0,
                started,
                time.monotonic(),  # type: ignore[arg-type]
                resp.status,
                classify(resp.status, body.get("error")),
                body.get("error", ""),
                order_id,
                body.get("status"),
            )
        )
        return resp.status, body

    async def drained(self, sale: str) -> None:
        key = f"{{fs:{sale}}}:events"
        try:
            await wait_for(lambda: stream_drained(self.redis, key), what="the writer to drain")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; groups {await self.redis.xinfo_groups(key)}, pending "
                f"{await self.redis.xpending_range(key, 'writers', '-', '+', 5)}"
            ) from None

    async def recorded(self, sale: str) -> None:
        async def seen() -> bool:
            return bool(await self.pool.fetchval("SELECT count(*) FROM fence_sales WHERE sale = $1", sale))

        await wait_for(seen, what="the guard to record the sale")
        await wait_for(lambda: self.redis.exists("fs:lineage"), what="the lineage marker")

    def acknowledged(self) -> list[str]:
        return sorted(
            {op.order_id for op in self.history if op.kind == "order" and op.outcome == "ok" and op.order_id}
        )


@pytest.fixture
async def stack(tmp_path: Path, pipeline_db_url: str, pipeline_pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    server = RedisServer(appendonly=True, appendfsync="always", data_dir=tmp_path / "redis").start()
    # Retries on a broken connection: the tests restart this server under the client.
    redis = Redis.from_url(
        server.url,
        decode_responses=True,
        socket_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.2), 5),
        retry_on_error=[RedisConnectionError],
    )
    s = Stack(server, pipeline_db_url, pipeline_pool, redis)
    try:
        yield s
    finally:
        await s.close()
        await redis.aclose()
        server.stop()


def restart_redis(server: RedisServer, *, data_from: Path | None) -> None:
    """SIGKILL Redis and start it again on the same port: from ``data_from`` (an older copy
    of its data dir), or empty when None."""
    server.kill()
    shutil.rmtree(server.data_dir)
    if data_from is not None:
        shutil.copytree(data_from, server.data_dir)
    else:
        server.data_dir.mkdir()
    server.start()


async def sell_first_half(
    stack: Stack, sale: str, sku: str, tmp_path: Path, loss: str
) -> tuple[Path | None, dict[str, str]]:
    """20 orders (10 paid, 2 cancelled, 8 held), drained and recorded; with loss='older_copy'
    the data dir is copied after the first 10 orders (all still held then)."""
    orders: dict[str, str] = {}
    copy: Path | None = None
    for i in range(20):
        if i == 10 and loss == "older_copy":
            await stack.drained(sale)
            copy = tmp_path / "older"
            shutil.copytree(stack.server.data_dir, copy)
        status, body = await stack.order(f"u{i}", sku, f"r{i}")
        assert status == 201, body
        orders[f"u{i}"] = body["order_id"]
    for i in range(10):
        assert (await stack.close_order(f"u{i}", orders[f"u{i}"], "pay"))[0] == 200
    for i in (10, 11):
        assert (await stack.close_order(f"u{i}", orders[f"u{i}"], "cancel"))[0] == 200
    await stack.drained(sale)
    await stack.recorded(sale)
    return copy, orders


@pytest.mark.parametrize("loss", ["wiped", "older_copy"])
async def test_redis_loss_is_fenced_recovered_and_the_sale_sells_out_exactly(
    stack: Stack, tmp_path: Path, loss: str
) -> None:
    sale = "f-" + uuid.uuid4().hex[:6]
    sku = f"{sale}-phone"
    await stack.start_service()
    await stack.start_worker()
    await stack.create_sale(sale)
    copy, orders = await sell_first_half(stack, sale, sku, tmp_path, loss)

    restart_redis(stack.server, data_from=copy)

    async def fenced() -> dict[str, Any] | None:
        status, body = await stack.order("late", sku, "r-late-" + uuid.uuid4().hex[:6])
        # 503 sale_fenced "verifying" comes first (the new server is being checked), then
        # the loss itself, with what to do about it.
        lost = status == 503 and body["error"] == "sale_fenced" and "flashsale recover" in body["message"]
        return body if lost else None

    refusal = await wait_for(fenced, what="the sale to be fenced")
    assert "flashsale recover" in refusal["message"], refusal
    status, body = await stack.close_order("u12", orders["u12"], "pay")
    assert (status, body["error"]) == (503, "sale_fenced"), body
    if loss == "wiped":
        # The fence holds in this process even if the settings hash is lost again.
        await stack.redis.delete(f"fs:sale:{sale}")
        assert (await fenced()) is not None

    report = await recover(stack.redis, stack.pool)
    assert report.ok, report.table()
    assert [r.sale for r in report.recovered] == [sale]
    assert report.recovered[0].orders == {"paid": 10, "cancelled": 2, "held": 8}
    assert (
        await stack.redis.hget(f"fs:sale:{sale}", "hold_ttl_ms") == "60000"
    )  # settings back, from fence_sales
    assert await stack.redis.hget(f"fs:sale:{sale}", "fenced") == ""

    async def reopened() -> bool:
        status, body = await stack.order("u20", sku, "r20")
        return status == 201

    await wait_for(reopened, what="the sale to reopen")
    # Idempotency records were rebuilt: a retry of a request made before the loss replays it.
    status, body = await stack.order("u3", sku, "r3", attempt=1)
    assert (status, body["order_id"], body["replayed"]) == (201, orders["u3"], True)
    assert (await stack.close_order("u12", orders["u12"], "pay"))[0] == 200  # a rebuilt hold can be paid

    sold_after = 1  # u20
    for i in range(21, 21 + STOCK):
        status, body = await stack.order(f"u{i}", sku, f"r{i}")
        if status != 201:
            assert (status, body["error"]) == (409, "sold_out"), body
            break
        sold_after += 1
    assert sold_after == STOCK - 10 - 8  # exactly what PostgreSQL says was left
    await stack.drained(sale)
    audit = await run_audit(stack.redis, stack.pool, acknowledged=stack.acknowledged(), wait_drain_s=10)
    assert audit.ok, audit.table()
    verdict = check(
        stack.history,
        await observe(stack.redis, stack.pool, prefix="fs", sale=sale, audit=audit),
        lapsed=False,
    )
    assert verdict.ok, verdict.table()
    logged = await stack.pool.fetch("SELECT action FROM fence_log WHERE sale = $1 ORDER BY id", sale)
    assert [r["action"] for r in logged][-1] == "recovered" and "fenced" in [r["action"] for r in logged]


async def test_without_the_fence_an_older_redis_oversells(stack: Stack, tmp_path: Path) -> None:
    """The counterfactual: the same failover to an older copy, no fence, no recovery. The
    older copy has units for sale that PostgreSQL knows are sold or held, and it sells them."""
    sale = "nf-" + uuid.uuid4().hex[:6]
    sku = f"{sale}-phone"
    await stack.start_service(fenced=False)
    await stack.start_worker()
    await stack.create_sale(sale)
    orders: dict[str, str] = {}
    copy = tmp_path / "older"
    for i in range(20):
        if i == 10:
            await stack.drained(sale)
            shutil.copytree(stack.server.data_dir, copy)
        status, body = await stack.order(f"u{i}", sku, f"r{i}")
        orders[f"u{i}"] = body["order_id"]
    for i in range(10):
        await stack.close_order(f"u{i}", orders[f"u{i}"], "pay")
    await stack.drained(sale)

    restart_redis(stack.server, data_from=copy)
    await wait_for(lambda: stack.redis.ping(), what="Redis")
    for i in range(20, 20 + STOCK):
        with contextlib.suppress(Exception):
            await stack.order(f"u{i}", sku, f"r{i}")
    await stack.drained(sale)
    verdict = check(
        stack.history, await observe(stack.redis, stack.pool, prefix="fs", sale=sale), lapsed=False
    )
    assert "no_oversell" in verdict.failed_checks(), verdict.table()


async def test_a_restart_with_intact_data_is_verified_not_fenced(stack: Stack) -> None:
    sale = "ok-" + uuid.uuid4().hex[:6]
    sku = f"{sale}-phone"
    await stack.start_service()
    await stack.start_worker()
    await stack.create_sale(sale)
    for i in range(5):
        assert (await stack.order(f"u{i}", sku, f"r{i}"))[0] == 201
    await stack.drained(sale)
    await stack.recorded(sale)
    assert stack.client is not None
    guard = stack.client.app[fence_guard.GUARD]
    before = guard.last_verdict.run_id if guard.last_verdict else None

    stack.server.kill()  # SIGKILL; appendfsync always keeps every acknowledged write
    stack.server.start()

    async def sells() -> bool:
        status, _ = await stack.order("u9", sku, "r9")
        return status == 201

    await wait_for(sells, what="orders to go through after the restart")
    assert guard.last_verdict is not None and guard.last_verdict.run_id != before and guard.last_verdict.ok
    assert not guard.fenced
    assert await stack.pool.fetchval("SELECT count(*) FROM fence_log") == 0


# ------------------------------------------------------------------ verification
@pytest.fixture
async def recorded_sale(text_redis: Redis, pipeline_pool: asyncpg.Pool) -> Inventory:
    """Sale ``v1``: 3 holds (one paid), written to PostgreSQL, recorded by the fence."""
    await SaleBook(text_redis, "fs").create(SaleSettings("v1", now_ms(), state="open"), ["v1-phone"], ["v1"])
    inv = Inventory(text_redis, "v1", coalesce=False)
    await inv.stock("v1-phone", 10)
    holds = [await inv.reserve(f"u{i}", [("v1-phone", 1)], request_id=f"r{i}") for i in range(3)]
    await inv.confirm(holds[0].hold_id)
    await _drain(text_redis, pipeline_pool, "fs", "v1", "0-0")
    await fence.record_sales(text_redis, pipeline_pool)
    await fence.ensure_lineage(text_redis, pipeline_pool)
    return inv


async def test_the_drain_writes_every_hold_of_a_reservation_calls_entry(
    text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    """Recovery's drain reads a reservation call's entry as one order per hold, beside a
    single ``reserved`` entry an older stream may still hold."""
    inv = Inventory(text_redis, "bt1")
    await inv.stock("bt1-phone", 50)
    holds = await asyncio.gather(
        *(inv.reserve(f"u{i}", [("bt1-phone", 1)], request_id=f"r{i}") for i in range(12))
    )
    older = {"order": "bt1.older", "user": "ann", "lines": "bt1-phone:2", "request": "r-old"}
    await text_redis.xadd(
        inv.keys.events, {"type": "reserved", **older, "deadline": "1900000000000", "at": "1800000000000"}
    )
    entries, _, problems = await _drain(text_redis, pipeline_pool, "fs", "bt1", "0-0")
    assert (entries, problems) == (1 + 1 + 1, [])  # stocked, the 12 holds' entry, the older one
    rows = await pipeline_pool.fetch("SELECT order_id, user_id, status FROM orders WHERE sale = 'bt1'")
    assert {tuple(r) for r in rows} == {
        *((h.hold_id, h.user, "held") for h in holds),
        ("bt1.older", "ann", "held"),
    }


async def _break_stream(r: Redis) -> None:
    await r.delete("{fs:v1}:events")
    await r.xadd("{fs:v1}:events", {"type": "noise"}, id="1-1")


@pytest.mark.parametrize(
    ("damage", "evidence"),
    [
        (lambda r: r.delete("fs:lineage"), "lineage marker is missing"),
        (lambda r: r.set("fs:lineage", "someone-else"), "another dataset"),
        (lambda r: r.delete("{fs:v1}:stock"), "no stock for v1"),
        (lambda r: r.hincrby("{fs:v1}:stock", "v1-phone:sold", -1), "counts 0 sold, PostgreSQL has 1 paid"),
        (_break_stream, "stream ends at 1-1"),
    ],
)
async def test_verify_finds_each_kind_of_loss(
    recorded_sale: Inventory, text_redis: Redis, pipeline_pool: asyncpg.Pool, damage: Any, evidence: str
) -> None:
    assert (await fence.verify(text_redis, pipeline_pool)).ok
    await damage(text_redis)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert not verdict.ok
    assert any(evidence in loss.reason for loss in verdict.losses), verdict.losses
    assert set(verdict.lost_sales()) == {"v1"}


async def test_verify_counts_holds(
    recorded_sale: Inventory, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    victim = next(iter(await text_redis.hkeys("{fs:v1}:holds")))
    await text_redis.hdel("{fs:v1}:holds", victim)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert any("Redis holds 2 orders, PostgreSQL has committed 3" in loss.reason for loss in verdict.losses)


async def test_a_forgotten_sale_is_not_a_loss(
    recorded_sale: Inventory, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    for key in ("{fs:v1}:stock", "{fs:v1}:holds", "{fs:v1}:events", "fs:sale:v1"):
        await text_redis.delete(key)
    assert not (await fence.verify(text_redis, pipeline_pool)).ok
    assert await forget(pipeline_pool, prefix="fs", sale="v1")
    assert (await fence.verify(text_redis, pipeline_pool)).ok


# ------------------------------------------------------------------------ buckets
async def _request_records(redis: Redis, inv: Inventory) -> dict[str, Any]:
    """A bucket's idempotency records of buyers' requests (not the stock changes' ones)."""
    raw = await redis.hgetall(inv.keys.requests)
    return {f: json.loads(v) for f, v in raw.items() if f.startswith("r:")}


async def test_a_buckets_split_sale_is_rebuilt_per_bucket(
    text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    engines = [f"bk-b{k}" for k in range(3)]
    await SaleBook(text_redis, "fs").create(
        SaleSettings("bk", now_ms(), state="open", buckets=3), ["bk-phone"], engines
    )
    inv = BucketedInventory(text_redis, "bk", 3, coalesce=False)
    await inv.stock("bk-phone", 30, limit_per_user=2)
    holds = [await inv.reserve(f"u{i}", [("bk-phone", 1)], request_id=f"r{i}") for i in range(18)]
    for hold in holds[:6]:
        await inv.confirm(hold.hold_id)
    await inv.release(holds[6].hold_id)
    for engine in engines:
        await _drain(text_redis, pipeline_pool, "fs", engine, "0-0")
    await fence.record_sales(text_redis, pipeline_pool)
    await fence.ensure_lineage(text_redis, pipeline_pool)
    before = {b.sale: await b.snapshot("bk-phone") for b in inv.buckets}
    records = {b.sale: await _request_records(text_redis, b) for b in inv.buckets}

    await text_redis.flushdb()
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert set(verdict.lost_sales()) == {"bk"}

    report = await recover(text_redis, pipeline_pool)
    assert report.ok, report.table()
    assert report.recovered[0].engine_sales == tuple(engines)
    assert {b.sale: await b.snapshot("bk-phone") for b in inv.buckets} == before
    assert (
        await text_redis.hget("fs:sale:bk", "buckets") == "3"
        and await text_redis.hget("fs:sale:bk", "fenced") == ""
    )
    # Every buyer's idempotency record is back where the engine keeps it, as it was.
    assert {b.sale: await _request_records(text_redis, b) for b in inv.buckets} == records
    again = await inv.reserve("u1", [("bk-phone", 1)], request_id="r1")  # replays from the home bucket
    assert again.replayed and again.hold_id == holds[1].hold_id
    sold = 0
    for i in range(100, 140):
        try:
            await inv.reserve(f"u{i}", [("bk-phone", 1)], request_id=f"r{i}")
        except SoldOut:
            break
        sold += 1
    assert sold == 30 - 6 - 11  # 6 paid, 11 held (18 holds, 1 cancelled)


async def test_without_postgresql_the_guard_sells_on_unverified(redis_client: Redis, redis_url: str) -> None:
    """Orders never wait on PostgreSQL: a guard that cannot ask it has no evidence of a loss,
    so it lets sales go on (and keeps trying) instead of fencing everything."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    settings = Settings(
        redis_url=redis_url,
        database_url=f"postgresql://flashsale@127.0.0.1:{closed}/flashsale",
        token_secret=SECRET,
        admin_token=ADMIN,
        user_rate=1000.0,
        user_burst=1000,
    )
    app = create_app(settings)
    fence_guard.install(app, poll_s=0.1)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.post(
            "/api/admin/sales",
            headers=ADMIN_HEADERS,
            json={"sale": "nopg", "open": True, "skus": [{"sku": "nopg-phone", "stock": 3}]},
        )
        assert resp.status == 201, await resp.text()
        resp = await client.post(
            "/api/orders",
            headers={"Authorization": f"Bearer {mint(SECRET, 'ann')}"},
            json={"request_id": "r1", "sku": "nopg-phone"},
        )
        assert resp.status == 201, await resp.text()
        guard = client.app[fence_guard.GUARD]
        assert not guard.fenced and guard.verifying is None
    finally:
        await client.close()


def test_the_fence_adds_no_layer_of_its_own_and_comes_out_whole() -> None:
    """The fence is a check inside the app's one middleware, not a middleware of its own
    (a layer every request pays for): installed by create_app, tuned by install() again,
    taken out whole by uninstall() (the drills' counterfactual)."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1", token_secret=SECRET, admin_token=ADMIN))
    assert len(app.middlewares) == 1 and fence_guard.installed(app)
    fence_guard.install(app, poll_s=0.1)
    assert len(app.middlewares) == 1 and fence_guard.installed(app)
    fence_guard.uninstall(app)
    assert len(app.middlewares) == 1 and not fence_guard.installed(app)
    fence_guard.install(app)
    assert fence_guard.installed(app)


# ------------------------------------------------------------------- generations
async def redis_now_ms(r: Redis) -> int:
    seconds, micros = await r.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def retire(r: Redis, pool: asyncpg.Pool, sale: str, engines: list[str]) -> None:
    """What an operator does to remove a sale on purpose: its keys out of Redis, then
    `flashsale recover --forget`."""
    for engine in engines:
        await r.delete(*SaleKeys("fs", engine).all())
    await r.delete(f"fs:sale:{sale}")
    await r.srem("fs:sales", sale, *engines)
    assert await forget(pool, prefix="fs", sale=sale)


async def create_again(r: Redis, pool: asyncpg.Pool, stock: int, sold: int) -> Inventory:
    """Sale ``v1`` created again (a new generation): ``sold`` units paid, drained, recorded."""
    await SaleBook(r, "fs").create(
        SaleSettings("v1", now_ms(), state="open", generation=await redis_now_ms(r)), ["v1-phone"], ["v1"]
    )
    inv = Inventory(r, "v1", coalesce=False)
    await inv.stock("v1-phone", stock)
    for i in range(sold):
        await inv.confirm((await inv.reserve(f"g{i}", [("v1-phone", 1)], request_id=f"r{i}")).hold_id)
    await _drain(r, pool, "fs", "v1", "0-0")
    await fence.record_sales(r, pool)
    return inv


async def test_a_sale_created_again_after_forget_is_fenced_like_any_sale(
    recorded_sale: Inventory, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    """Issue 12, item 6: the forgotten flag of the first creation no longer hides the next,
    and the next is compared with its own orders only (3 holds then, 2 paid now)."""
    await retire(text_redis, pipeline_pool, "v1", ["v1"])
    await create_again(text_redis, pipeline_pool, stock=5, sold=2)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert verdict.ok, verdict.losses
    assert verdict.checked == ("v1",)
    rows = await pipeline_pool.fetch("SELECT generation, forgotten_at FROM fence_sales ORDER BY generation")
    assert [r["forgotten_at"] is None for r in rows] == [False, True]

    await text_redis.hincrby("{fs:v1}:stock", "v1-phone:sold", -1)  # Redis went back in time
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert any("counts 1 sold, PostgreSQL has 2 paid" in loss.reason for loss in verdict.losses), (
        verdict.losses
    )


async def test_redis_holding_an_earlier_creation_is_a_loss(
    recorded_sale: Inventory, redis_client: Redis, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    keys = [*SaleKeys("fs", "v1").all(), "fs:sale:v1"]
    first = {k: await redis_client.dump(k) for k in keys if await redis_client.exists(k)}
    await retire(text_redis, pipeline_pool, "v1", ["v1"])
    await create_again(text_redis, pipeline_pool, stock=5, sold=2)
    for key, blob in first.items():  # restarted from a copy older than the new creation
        await redis_client.restore(key, 0, blob, replace=True)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert set(verdict.lost_sales()) == {"v1"}
    assert any("earlier creation of v1" in loss.reason for loss in verdict.losses)

    report = await recover(text_redis, pipeline_pool)  # rebuilds the generation recorded last
    assert report.ok, report.table()
    assert report.recovered[0].orders == {"paid": 2} and report.recovered[0].settings_restored
    snap = await Inventory(text_redis, "v1").snapshot("v1-phone")
    assert snap is not None and (snap.total, snap.sold, snap.available) == (5, 2, 3)


async def test_a_sale_created_over_one_never_retired_is_a_loss_until_retired(
    recorded_sale: Inventory, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    """A Redis wiped, then given a new sale of the same id, must not pass for a new
    creation: the first one's orders would be lost without a word."""
    await text_redis.delete(*SaleKeys("fs", "v1").all(), "fs:sale:v1")  # nobody retired it
    await create_again(text_redis, pipeline_pool, stock=5, sold=0)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert "flashsale recover --forget v1" in verdict.lost_sales()["v1"]
    report = await recover(text_redis, pipeline_pool)
    assert not report.ok and "not rebuilt" in report.table()
    assert await Inventory(text_redis, "v1").snapshot("v1-phone") is not None  # left as it is

    assert await forget(pipeline_pool, prefix="fs", sale="v1")
    assert (await fence.verify(text_redis, pipeline_pool)).ok  # a new creation: recorded next
    await fence.record_sales(text_redis, pipeline_pool)
    verdict = await fence.verify(text_redis, pipeline_pool)
    assert verdict.ok and verdict.checked == ("v1",)


async def test_a_yearly_sale_id_used_again_is_fenced_and_recovered_on_its_own(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 12, item 6, end to end: d11 sold out and retired; d11 created again, sold out
    and paid; Redis restarted from a copy taken before the second sale sold. The second d11
    is fenced (it once sold the same 3 units again), recovery rebuilds it from its own
    orders, and it stays sold out."""
    sku = "d11-phone"
    three = {"skus": [{"sku": sku, "stock": 3}]}
    await stack.start_service()
    await stack.start_worker()
    assert stack.client is not None

    async def sell_out(tag: str) -> None:
        for i in range(3):
            status, body = await stack.order(f"{tag}{i}", sku, f"{tag}-r{i}")
            assert status == 201, body
            assert (await stack.close_order(f"{tag}{i}", body["order_id"], "pay"))[0] == 200
        assert (await stack.order(f"{tag}9", sku, f"{tag}-r9"))[1]["error"] == "sold_out"
        await stack.drained("d11")

    async def create() -> Any:
        assert stack.client is not None
        return await stack.client.post(
            "/api/admin/sales", headers=ADMIN_HEADERS, json={"sale": "d11", "open": True, **three}
        )

    await stack.create_sale("d11", **three)
    await sell_out("a")
    await stack.recorded("d11")

    await stack.redis.delete(*SaleKeys("fs", "d11").all(), "fs:sale:d11")  # the operator removes it
    await stack.redis.hdel("fs:skus", sku)
    await stack.redis.srem("fs:sales", "d11")
    refused = await create()
    assert (refused.status, (await refused.json())["error"]) == (409, "sale_not_retired")
    assert await forget(stack.pool, prefix="fs", sale="d11")
    await stack.redis.hset("{fs:d11}:stock", "left:total", 1)
    refused = await create()
    assert (refused.status, (await refused.json())["error"]) == (409, "sale_keys_remain")
    await stack.redis.delete("{fs:d11}:stock")
    created = await create()
    assert created.status == 201, await created.text()
    second = (await created.json())["generation"]

    async def writer_reads_it() -> bool:  # the new stream's group: the writer found the sale again
        with contextlib.suppress(ResponseError):
            return bool(await stack.redis.xinfo_groups("{fs:d11}:events"))
        return False

    await wait_for(writer_reads_it, what="the writer to find the second d11")
    await stack.drained("d11")

    async def second_recorded() -> bool:
        return bool(
            await stack.pool.fetchval(
                "SELECT count(*) FROM fence_sales WHERE sale = 'd11' AND generation = $1", second
            )
        )

    await wait_for(second_recorded, what="the guard to record the second d11")
    copy = tmp_path / "older"
    shutil.copytree(stack.server.data_dir, copy)
    await sell_out("b")

    restart_redis(stack.server, data_from=copy)

    async def fenced() -> bool:
        status, body = await stack.order("late", sku, "late-" + uuid.uuid4().hex[:6])
        assert status != 201, "the second d11 sold its units again"
        return status == 503 and body["error"] == "sale_fenced" and "flashsale recover" in body["message"]

    await wait_for(fenced, what="the second d11 to be fenced")
    assert set((await fence.verify(stack.redis, stack.pool)).lost_sales()) == {"d11"}

    report = await recover(stack.redis, stack.pool)
    assert report.ok, report.table()
    assert report.recovered[0].orders == {"paid": 3}  # the second creation's orders only

    async def sold_out_again() -> bool:
        status, body = await stack.order("c0", sku, "c-r0")
        assert status != 201, "sold beyond the 3 units"
        return (status, body.get("error")) == (409, "sold_out")

    await wait_for(sold_out_again, what="the sale to reopen, sold out")
    await stack.drained("d11")
    audit = await run_audit(stack.redis, stack.pool, wait_drain_s=10)
    assert audit.ok, audit.table()
