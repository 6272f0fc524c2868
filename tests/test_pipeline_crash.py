"""Crash tests with real processes: ``python -m flashsale worker`` killed with SIGKILL in the
middle of a batch and restarted, and PostgreSQL killed and restarted while orders keep
streaming in. Afterwards the audit finds nothing lost, duplicated or conflicting, and
PostgreSQL has exactly one row per hold."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from worker_support import WorkerProcess, worker_environment

from flashsale.pgpool import close_pool, create_pool
from flashsale.pipeline.audit import run_audit
from flashsale.runtime.embedded import EmbeddedStack
from flashsale.streams import GROUP
from inventory import Inventory, Line

WAVES, WAVE = 40, 100  # 4,000 reservations per run


@pytest.fixture
def worker_env(redis_url: str, pipeline_db_url: str, pipeline_pool: Any) -> dict[str, str]:
    return worker_environment(redis_url, pipeline_db_url)


async def stream_orders(inv: Inventory, made: list[str], *, pause: float = 0.0, tag: str = "") -> None:
    """Waves of concurrent reservations; each wave also pays and cancels a few earlier holds,
    so status changes cross the crash too."""
    for w in range(WAVES):
        holds = await asyncio.gather(
            *(
                inv.reserve(
                    f"u{w}-{i}",
                    [Line("phone", 1)] + ([Line("case", 1)] if i % 4 == 0 else []),
                    request_id=f"{tag}w{w}-{i}",
                )
                for i in range(WAVE)
            )
        )
        made.extend(h.hold_id for h in holds)
        for h in holds[:20]:
            await inv.confirm(h.hold_id)
        for h in holds[20:30]:
            await inv.release(h.hold_id)
        if pause:
            await asyncio.sleep(pause)


async def reading(redis: Redis, key: str, consumer: str) -> bool:
    """True once ``consumer`` has read from the stream (it joined the group)."""
    try:
        return any(c["name"] == consumer for c in await redis.xinfo_consumers(key, GROUP))
    except Exception:  # noqa: BLE001 - no group yet
        return False


async def pending_of(redis: Redis, key: str) -> int:
    return int((await redis.xpending(key, GROUP))["pending"])


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def assert_nothing_lost(
    redis: Redis, database_url: str, inv: Inventory, made: list[str], drained: Any
) -> None:
    await drained(redis, ["d11"], timeout=60)
    pool = await create_pool(database_url)  # a fresh pool: the test's own may have gone stale
    try:
        report = await run_audit(redis, pool, acknowledged=made, wait_drain_s=10)
        assert report.ok, report.table()
        rows = await pool.fetchval("SELECT count(*) FROM orders")
        assert rows == await redis.hlen(inv.keys.holds) == len(made) == WAVES * WAVE
        statuses = dict(await pool.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
        assert statuses == {"paid": WAVES * 20, "cancelled": WAVES * 10, "held": WAVES * 70}
    finally:
        await close_pool(pool)


@pytest.mark.parametrize("restart_as", ["same-consumer", "new-consumer"])
async def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    restart_as: str,
    text_redis: Redis,
    pipeline_sale: Any,
    pipeline_db_url: str,
    worker_env: dict[str, str],
    tmp_path: Path,
    drained: Any,
) -> None:
    inv = await pipeline_sale("d11", {"phone": 100_000, "case": 100_000})
    made: list[str] = []
    log = tmp_path / "worker.log"
    first = WorkerProcess(worker_env, log, "w1")
    second = None
    await wait_for(lambda: reading(text_redis, inv.keys.events, "w1"), 60, "the worker to start reading")
    producer = asyncio.ensure_future(stream_orders(inv, made, pause=0.02))
    try:
        # Kill it while it holds entries it read but has not committed: the middle of a batch.
        await wait_for(lambda: pending_of(text_redis, inv.keys.events), 30, "the worker to read a batch")
        first.kill()
        left_pending = await pending_of(text_redis, inv.keys.events)
        assert left_pending > 0, "killed between batches; the test must kill it mid-batch"
        assert first.proc.returncode == -signal.SIGKILL
        await asyncio.sleep(0.3)  # orders keep coming while no worker runs
        second = WorkerProcess(worker_env, log, "w1" if restart_as == "same-consumer" else "w2")
        await producer
        await assert_nothing_lost(text_redis, pipeline_db_url, inv, made, drained)
        assert second.proc.poll() is None, "the restarted worker died"
    finally:
        producer.cancel()
        for w in (first, second):
            if w is not None:
                w.stop()
    events = (second or first).events()
    assert (
        '"event": "pending_reread"' if restart_as == "same-consumer" else '"event": "reclaimed"'
    ) in events
    assert second is not None and second.proc.returncode == 0
    assert '"event": "dead_letter"' not in events


async def test_postgres_killed_while_orders_stream_in(
    embedded_stack: EmbeddedStack,
    text_redis: Redis,
    pipeline_sale: Any,
    pipeline_db_url: str,
    worker_env: dict[str, str],
    tmp_path: Path,
    drained: Any,
) -> None:
    if embedded_stack.postgres is None:
        pytest.skip("FLASHSALE_DATABASE_URL names an outside PostgreSQL: this test must stop and start it")
    postgres = embedded_stack.postgres
    inv = await pipeline_sale("d11", {"phone": 100_000, "case": 100_000})
    made: list[str] = []
    worker = WorkerProcess(worker_env, tmp_path / "worker.log", "w1")
    await wait_for(lambda: reading(text_redis, inv.keys.events, "w1"), 60, "the worker to start reading")
    producer = asyncio.ensure_future(stream_orders(inv, made, pause=0.1))
    try:
        await wait_for(lambda: _rows_written(text_redis), 30, "the worker to commit something")
        # SIGKILL the whole server, as a crash does (embedded stop() would also delete its
        # data dir); orders keep being taken in Redis meanwhile.
        postgres.kill()
        down_at = len(made)
        await asyncio.sleep(3)
        assert len(made) > down_at, "no orders arrived while PostgreSQL was down"
        postgres.start()
        await producer
        await assert_nothing_lost(text_redis, pipeline_db_url, inv, made, drained)
        assert worker.proc.poll() is None, "the worker died with PostgreSQL"
    finally:
        producer.cancel()
        if not postgres.running:
            postgres.start()
        code = worker.stop()
    events = worker.events()
    assert '"event": "postgres_unavailable"' in events and '"event": "postgres_recovered"' in events
    assert '"event": "dead_letter"' not in events
    assert code == 0


async def _rows_written(redis: Redis) -> bool:
    return int(await redis.hget("fs:writer:stats", "orders_total") or 0) > 0
