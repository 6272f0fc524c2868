"""A bucketed sale's transfers survive a crash mid-pull and a Redis data loss: the worker's
sweeper finishes them (judging an intent's age on the Redis clock that stamped it, never
a process's), until it does the audit says units are in transit (leaked), and units
written off that no bucket received are reported from PostgreSQL's transfer ids — so a
stranded unit is never silent."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import pytest
from inventory_support import PausedTransfer
from redis.asyncio import Redis

from flashsale.fence import verify as fence
from flashsale.fence.recovery import recover
from flashsale.pipeline import sweeper as sweeper_module
from flashsale.pipeline.audit import run_audit
from flashsale.pipeline.sweeper import HoldSweeper
from flashsale.service.sales import SaleBook, SaleSettings, now_ms
from inventory import BucketedInventory, Hold, Inventory, SoldOut


async def _strand(redis: Redis, inv: BucketedInventory, units: int, age_s: float) -> str:
    """What a process killed between the donor's write-off and the receiver's add leaves:
    an intent stamped ``age_s`` ago by the Redis clock, the units written off."""
    source, target = inv.buckets
    xfer = f"crash{int(time.time() * 1000)}"
    now_s, now_us = await redis.time()
    at_ms = now_s * 1000 + now_us // 1000 - int(age_s * 1000)
    intent = {"from": source.sale, "sku": "hot", "units": units, "at_ms": str(at_ms)}
    await redis.hset(target.keys.transfers, xfer, json.dumps(intent))
    await source._mutate("transfer_out", source._stock_keys, ["hot", units, xfer, "move"], "hot")
    return xfer


async def _strand_legacy(redis: Redis, inv: BucketedInventory, units: int) -> str:
    """The same, as a version before transfer ids left it: the intent stamped with the
    process's clock in seconds, the write-off made by the plain adjust script."""
    source, target = inv.buckets
    xfer = f"old{int(time.time() * 1000)}"
    intent = {"from": source.sale, "sku": "hot", "units": units, "at": time.time()}
    await redis.hset(target.keys.transfers, xfer, json.dumps(intent))
    await source._mutate("adjust", source._stock_keys, ["hot", -units, f"xo-{xfer}"], "hot")
    return xfer


async def _register(redis: Redis, inv: BucketedInventory) -> None:
    await redis.sadd("fs:sales", *(b.sale for b in inv.buckets))


async def test_the_sweeper_settles_a_transfer_cut_by_a_crash(redis_client: Redis, monkeypatch: Any) -> None:
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    await _register(redis_client, inv)
    await _strand(redis_client, inv, 30, age_s=60)
    stranded = await inv.snapshot("hot")
    assert stranded is not None and stranded.total == 70 and await inv.in_transit() == 30

    monkeypatch.setattr(sweeper_module, "SETTLE_EVERY_S", 0.0)
    sweeper = HoldSweeper(redis_client, sales_refresh_s=0.0)
    await sweeper.sweep()
    settled = await inv.snapshot("hot")
    assert settled is not None and (settled.total, settled.available) == (100, 100)
    assert await inv.in_transit() == 0


async def test_an_intent_left_by_an_older_version_is_settled(redis_client: Redis, monkeypatch: Any) -> None:
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    await _register(redis_client, inv)
    await _strand_legacy(redis_client, inv, 30)
    monkeypatch.setattr(sweeper_module, "SETTLE_EVERY_S", 0.0)
    await HoldSweeper(redis_client, sales_refresh_s=0.0).sweep()
    settled = await inv.snapshot("hot")
    assert settled is not None and (settled.total, settled.available) == (100, 100)
    assert await inv.in_transit() == 0


async def test_a_young_intent_is_left_to_the_process_making_it(redis_client: Redis, monkeypatch: Any) -> None:
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    await _register(redis_client, inv)
    await _strand(redis_client, inv, 10, age_s=0)
    monkeypatch.setattr(sweeper_module, "SETTLE_EVERY_S", 0.0)
    await HoldSweeper(redis_client, sales_refresh_s=0.0).sweep()
    assert await inv.in_transit() == 10  # may still be in flight: not touched


async def test_the_audit_reports_units_stranded_between_buckets(
    redis_client: Redis, pipeline_pool: Any
) -> None:
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    await _register(redis_client, inv)
    xfer = await _strand(redis_client, inv, 30, age_s=60)
    report = await run_audit(redis_client, pipeline_pool, sales=[b.sale for b in inv.buckets], wait_drain_s=0)
    stranded = [v for v in report.violations if v.kind == "leaked" and xfer in v.detail]
    assert len(stranded) == 1 and stranded[0].units == 30 and not report.ok


async def test_an_audit_clock_ahead_does_not_take_an_older_versions_live_transfer_for_leaked(
    redis_client: Redis, pipeline_pool: Any, monkeypatch: Any
) -> None:
    """An intent left by a version before transfer ids is stamped in the service process's
    seconds ("at"), not by Redis. The audit once aged it on its own clock: run from a
    machine 30 s fast, a transfer started a moment ago was reported as leaked. Such an
    intent is now aged on the Redis clock the audit reads with its snapshot (the clock the
    services' hosts keep to), as every newer intent is; a really stranded one still shows."""
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    await _register(redis_client, inv)
    source, target = inv.buckets
    now_s, now_us = await redis_client.time()
    stamps = {"live": now_s + now_us / 1e6, "stranded": now_s + now_us / 1e6 - 60}
    for name, at in stamps.items():
        intent = {"from": source.sale, "sku": "hot", "units": 10, "at": at}
        await redis_client.hset(target.keys.transfers, f"old-{name}", json.dumps(intent))

    ahead = time.time
    monkeypatch.setattr(time, "time", lambda: ahead() + 30)  # the audit's machine, 30 s fast
    report = await run_audit(redis_client, pipeline_pool, sales=[b.sale for b in inv.buckets], wait_drain_s=0)
    leaked = sorted(v.detail.split()[1] for v in report.violations if v.kind == "leaked")
    assert leaked == ["old-stranded"], report.violations


async def test_a_worker_clock_ahead_of_the_services_leaves_a_live_transfer_alone(
    redis_client: Redis, monkeypatch: Any
) -> None:
    """Issue 12, item 10: the settle step once judged an intent's age by the worker's clock
    against the clock of the process that wrote it. A worker 11 s ahead took a transfer
    still in flight for a crashed one and dropped it; when the process then died after
    the donor's write-off, its units were gone and nothing said so."""
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    source, target = inv.buckets
    paused = PausedTransfer(monkeypatch, source, target, crash=True)
    moving = asyncio.ensure_future(inv.transfer("hot", 30, source=source, target=target))
    await paused.at_donor.wait()

    ahead = time.time
    monkeypatch.setattr(time, "time", lambda: ahead() + 11)
    await inv.settle_transfers()  # the worker's sweeper, its clock 11 s fast
    assert await inv.in_transit() == 30  # still the live process's

    paused.go.set()
    with pytest.raises(RuntimeError, match="killed"):
        await moving
    await inv.settle_transfers(older_than_s=0)  # later, the intent is really stranded
    after = await inv.snapshot("hot")
    assert after is not None and (after.total, after.available) == (100, 100)
    assert await inv.in_transit() == 0


async def test_a_transfer_settled_while_its_process_is_paused_is_aborted_whole(
    redis_client: Redis, monkeypatch: Any
) -> None:
    """Settling a live transfer early (its process paused longer than the settle age) costs
    the process a retry, never a unit: its late write-off is refused."""
    inv = BucketedInventory(redis_client, "drop", 2)
    await inv.stock("hot", 100)
    source, target = inv.buckets
    paused = PausedTransfer(monkeypatch, source, target)
    moving = asyncio.ensure_future(inv.transfer("hot", 30, source=source, target=target))
    await paused.at_donor.wait()
    assert await inv.settle_transfers(older_than_s=0) == 1  # taken for a crashed process's
    paused.go.set()
    assert await moving is False
    snaps = [await b.snapshot("hot") for b in inv.buckets]
    assert [(s.total, s.available) for s in snaps if s] == [(50, 50), (50, 50)]
    assert await inv.in_transit() == 0


async def test_units_written_off_that_no_bucket_received_are_reported_as_leaked(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    """Planted: a transfer's intent dropped after the donor's write-off reached PostgreSQL,
    its units never added (what the settle step did once Redis had lost the donor's
    record). Redis alone looks consistent; the transfer id on the stock events does not."""
    inv = BucketedInventory(text_redis, "drop", 2)
    await inv.stock("hot", 100)
    await _register(text_redis, inv)
    source, target = inv.buckets
    assert await inv.transfer("hot", 10, source=source, target=target)  # a whole one: balanced
    sales = [b.sale for b in inv.buckets]
    async with writer_running():
        await drained(text_redis, sales)
    assert (await run_audit(text_redis, pipeline_pool, sales=sales, wait_drain_s=2)).ok

    xfer = await _strand(text_redis, inv, 30, age_s=0)
    await text_redis.hdel(target.keys.transfers, xfer)
    async with writer_running():
        await drained(text_redis, sales)
    report = await run_audit(text_redis, pipeline_pool, sales=sales, wait_drain_s=2)
    (leak,) = report.violations
    assert (leak.kind, leak.sale, leak.where, leak.sku, leak.units) == (
        "leaked",
        source.sale,
        "both",
        "hot",
        30,
    )
    assert xfer in leak.detail and "lost in transit" in leak.detail


async def test_a_transfer_cut_by_a_redis_data_loss_is_finished_after_recovery(
    redis_client: Redis, text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any
) -> None:
    """Issue 12, item 7: Redis lost its last second — the donor's write-off and operation
    record with it — after the write-off had reached PostgreSQL; the intent survived.
    Recovery rebuilds the donor from PostgreSQL (the units are gone from it) and, from the
    transfer id on the event, the donor's record: the settle step then adds the units to
    the receiver instead of dropping the intent. 10 units stay 10."""
    engines = ["cut-b0", "cut-b1"]
    await SaleBook(text_redis, "fs").create(
        SaleSettings("cut", now_ms(), state="open", buckets=2), ["hot"], engines
    )
    inv = BucketedInventory(text_redis, "cut", 2, coalesce=False)
    await inv.stock("hot", 10)
    async with writer_running():
        await drained(text_redis, engines)
    await fence.record_sales(text_redis, pipeline_pool)
    await fence.ensure_lineage(text_redis, pipeline_pool)
    donor = inv.buckets[0]
    last_second = [donor.keys.stock, donor.keys.requests, donor.keys.events]
    saved = {key: await redis_client.dump(key) for key in last_second}

    xfer = await _strand(text_redis, inv, 3, age_s=60)  # the pulling process died here
    async with writer_running():
        await drained(text_redis, engines)  # the write-off reached PostgreSQL
    for key, blob in saved.items():  # ... and Redis lost its last second
        await redis_client.restore(key, 0, blob, replace=True)
    assert await text_redis.hexists(donor.keys.requests, f"op:xo-{xfer}") is False
    assert "cut" in (await fence.verify(text_redis, pipeline_pool)).lost_sales()

    report = await recover(text_redis, pipeline_pool)
    assert report.ok, report.table()
    assert await inv.settle_transfers() == 1  # the worker's sweeper, later
    after = await inv.snapshot("hot")
    assert after is not None and (after.total, after.available) == (10, 10)
    async with writer_running():
        await drained(text_redis, engines)
    audit = await run_audit(text_redis, pipeline_pool, sales=engines, wait_drain_s=2)
    assert audit.ok, audit.table()


class Contested(BucketedInventory):
    """A bucketed sale where another buyer of the same home bucket takes every unit a pull
    brings in before the puller can reserve it (what a crowd does to one hot bucket)."""

    rival = ""

    async def transfer(self, sku: str, units: int, *, source: Inventory, target: Inventory) -> bool:
        moved = await super().transfer(sku, units, source=source, target=target)
        if moved:
            await target.reserve(self.rival, [(sku, units)], request_id=f"grab-{secrets.token_hex(4)}")
        return moved


async def test_pulls_lost_to_a_crowd_are_not_reported_as_sold_out(redis_client: Redis) -> None:
    """The retry loop can run out while other buckets still have units: the refusal says
    how many the sale still has, so the service does not cache the SKU as sold out."""
    inv = Contested(redis_client, "crowd", 2, coalesce=False)
    inv.rival = next(f"rival{i}" for i in range(1000) if inv.home(f"rival{i}") is inv.home("alice"))
    await inv.stock("hot", 40)
    home = inv.home("alice")
    await home.reserve(inv.rival, [("hot", 20)], request_id="first-grab")  # the home bucket is empty
    with pytest.raises(SoldOut) as refused:
        await inv.reserve("alice", [("hot", 1)], request_id="a-1")
    left = await inv.snapshot("hot")
    assert left is not None and left.available > 0, "the test needs units left elsewhere"
    assert (refused.value.sku, refused.value.available) == ("hot", left.available)


class SentTwice(BucketedInventory):
    """A bucketed sale where the buyer's same request, sent twice at once, is decided for
    the other copy while this one looks for units: the other copy pulls the last unit and
    holds it before this copy's own pull looks (what a retry racing its original does)."""

    twin: Hold | None = None
    sent = False

    async def _pull(self, sku: str, need: int, *, into: Inventory) -> int:
        if not self.sent:
            self.sent = True
            self.twin = await self.reserve("alice", [(sku, need)], request_id="a-twice")
        return await super()._pull(sku, need, into=into)


async def test_a_request_whose_copy_took_the_last_unit_replays_that_hold(redis_client: Redis) -> None:
    """Under a burst one request id sent 50 times at once got 47 answers naming its hold and
    3 "sold out": a copy whose pull found every bucket empty refused, from outside the
    script, although the same request id had made a hold meanwhile. Idempotency is the
    script's to decide: that copy now hears the hold, as on a plain sale."""
    inv = SentTwice(redis_client, f"twice{secrets.token_hex(4)}", 2, coalesce=False)
    home = inv.home("alice")
    rival = next(f"rival{i}" for i in range(1000) if inv.home(f"rival{i}") is home)
    await inv.stock("hot", 2)
    await home.reserve(rival, [("hot", 1)], request_id="grab")  # alice's bucket is empty
    hold = await inv.reserve("alice", [("hot", 1)], request_id="a-twice")
    assert inv.twin is not None and not inv.twin.replayed
    assert (hold.hold_id, hold.replayed) == (inv.twin.hold_id, True)
    after = await inv.snapshot("hot")
    assert after is not None and (after.available, after.held) == (0, 2)


async def _between_buckets(redis: Redis, sale: str) -> tuple[BucketedInventory, str, str]:
    """A 2-bucket sale of 20 ``hot`` where a buyer's home bucket is empty and the other
    bucket's 10 units are written off on their way to that home bucket (another buyer's
    pull, between the donor's write-off and the receiver's add). Returns the sale, the
    buyer and the transfer's id."""
    inv = BucketedInventory(redis, sale, 2, coalesce=False)
    donor, home = inv.buckets
    buyer = next(f"buyer{i}" for i in range(1000) if inv.home(f"buyer{i}") is home)
    rival = next(f"rival{i}" for i in range(1000) if inv.home(f"rival{i}") is home)
    await inv.stock("hot", 20)
    await home.reserve(rival, [("hot", 10)], request_id="grab")
    xfer = await _strand(redis, inv, 10, age_s=0)
    snap = await inv.snapshot("hot")
    assert snap is not None and snap.available == 0 and await inv.in_transit() == 10
    return inv, buyer, xfer


async def test_units_between_buckets_are_not_reported_as_sold_out(redis_client: Redis) -> None:
    """Every bucket reads 0 while a pull's units are in flight: the refusal counts them, so
    the service does not cache the SKU as sold out (under load a burst sold 58 of 60 units,
    2 were in transit when a buyer was refused with available 0 and the rest of the burst
    was refused from the cache)."""
    inv, buyer, _ = await _between_buckets(redis_client, "transit")
    with pytest.raises(SoldOut) as refused:
        await inv.reserve(buyer, [("hot", 1)], request_id="b-1")
    assert (refused.value.sku, refused.value.available) == ("hot", 10)


async def test_a_buyer_whose_pull_meets_units_in_flight_gets_them(
    redis_client: Redis, monkeypatch: Any
) -> None:
    """The transfer lands just after the buyer's pull found every other bucket empty: the
    buyer is served from it, not refused."""
    inv, buyer, xfer = await _between_buckets(redis_client, "landing")
    home = inv.home(buyer)
    real_pull = inv._pull

    async def pull_then_land(sku: str, need: int, *, into: Inventory) -> int:
        moved = await real_pull(sku, need, into=into)
        if await redis_client.hexists(home.keys.transfers, xfer):
            await home._mutate("transfer_in", [*home._stock_keys, home.keys.transfers], [sku, 10, xfer], sku)
        return moved

    monkeypatch.setattr(inv, "_pull", pull_then_land)
    hold = await inv.reserve(buyer, [("hot", 1)], request_id="b-1")
    assert hold.lines[0].qty == 1
    after = await inv.snapshot("hot")
    assert after is not None and (after.available, after.held) == (9, 11)
