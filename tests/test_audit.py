"""The audit: a clean run is clean, and every kind of violation planted afterwards — in Redis
or in PostgreSQL — is caught, named and counted; ``flashsale audit`` exits 3 on any."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis_mode import redis_from_url

from flashsale import exit_codes
from flashsale.fence import verify as fence
from flashsale.fence.recovery import forget
from flashsale.pipeline.audit import KINDS, SCHEMA, AuditReport, run_audit
from flashsale.service.sales import SaleBook, SaleSettings, now_ms
from flashsale.streams import dead_letter_key
from inventory import Inventory, Line

STOCK = {"phone": 60, "case": 200}


class Sale:
    """A finished sale whose every order reached PostgreSQL: holds in every state."""

    def __init__(self, inv: Inventory, holds: list[Any]) -> None:
        self.inv = inv
        self.holds = holds
        self.paid = holds[0]  # alice: 2 phones, paid
        self.held = holds[5]
        self.ids = [h.hold_id for h in holds]


@pytest.fixture
async def sale(
    text_redis: Redis, pipeline_pool: Any, pipeline_sale: Any, writer_running: Any, drained: Any
) -> Sale:
    inv = await pipeline_sale("d11", STOCK, reserve=10, limit=2)
    holds = [await inv.reserve("alice", [Line("phone", 2), Line("case", 1)], request_id="a1")]
    holds += await asyncio.gather(
        *(inv.reserve(f"u{i}", [Line("phone", 1)], request_id=f"r{i}") for i in range(30))
    )
    await inv.confirm(holds[0].hold_id)
    for h in holds[1:5]:
        await inv.confirm(h.hold_id)
    for h in holds[10:15]:
        await inv.release(h.hold_id)
    # The same request id as Alice's: ids are each buyer's own, so this is no duplicate.
    late = await inv.reserve("late", [Line("case", 2)], request_id="a1", hold_ttl=0.001)
    await asyncio.sleep(0.005)
    assert late.hold_id in (await inv.expire_due()).expired
    holds.append(late)
    await inv.restock("case", 5)
    await inv.release_reserve("phone", 4)
    async with writer_running():
        await drained(text_redis, ["d11"])
    return Sale(inv, holds)


Audit = Callable[..., Awaitable[AuditReport]]


@pytest.fixture
def audit(text_redis: Redis, pipeline_pool: Any) -> Audit:
    async def run(**kw: Any) -> AuditReport:
        kw.setdefault("wait_drain_s", 2.0)
        return await run_audit(text_redis, pipeline_pool, **kw)

    return run


def kinds(report: AuditReport) -> dict[str, int]:
    return {k: n for k, n in report.by_kind().items() if n}


async def test_a_clean_run_is_clean(sale: Sale, audit: Audit) -> None:
    report = await audit(acknowledged=sale.ids)
    assert report.ok, report.table()
    assert report.drained and kinds(report) == {}
    assert report.counts == {
        "holds_in_redis": 32,
        "orders_in_postgresql": 32,
        "acknowledged": 32,
        "dead_letters": 0,
    }
    rows = {s.sku: s for s in report.skus}
    phone = rows["phone"]
    assert (phone.total, phone.reserve, phone.sold, phone.held, phone.available) == (60, 6, 6, 21, 27)
    assert (phone.pg_total, phone.pg_reserve, phone.pg_paid, phone.pg_held) == (60, 6, 6, 21)
    assert rows["case"].pg_total == 205
    doc = report.to_json()
    assert doc["schema"] == SCHEMA and doc["ok"] is True
    assert doc["violations_by_kind"] == dict.fromkeys(KINDS, 0)
    json.dumps(doc)  # JSON-ready as it is
    assert "AUDIT OK" in report.table()


async def _plant(sale: Sale, redis: Redis, pool: Any, what: str) -> None:
    inv, stock = sale.inv, sale.inv.keys.stock
    if what == "oversold_in_redis":
        await redis.hincrby(stock, "phone:sold", 100)
    elif what == "oversold_in_postgres":
        await pool.execute("UPDATE stock_events SET total = 5 WHERE type = 'stocked' AND sku = 'phone'")
    elif what == "order_missing_in_postgres":
        await pool.execute("DELETE FROM orders WHERE order_id = $1", sale.held.hold_id)
    elif what == "duplicate_row_for_a_request":
        await pool.execute(
            "INSERT INTO orders SELECT 'd11.twin', sale, user_id, request_id, status, status_rank, created_at, pay_by,"
            " status_at, written_at, last_stream_id FROM orders WHERE order_id = $1",
            sale.held.hold_id,
        )
    elif what == "status_differs":
        await pool.execute("UPDATE orders SET status = 'cancelled' WHERE order_id = $1", sale.paid.hold_id)
    elif what == "lines_differ":
        await pool.execute(
            "UPDATE order_lines SET qty = 1 WHERE order_id = $1 AND sku = 'phone'", sale.paid.hold_id
        )
    elif what == "limit_lowered_below_holdings":
        await redis.hset(stock, "phone:limit", 1)
    elif what == "units_vanished":
        await redis.hincrby(stock, "case:available", -3)
    elif what == "held_counter_drifted":
        await redis.hincrby(stock, "phone:held", -1)
        await redis.hincrby(stock, "phone:available", 1)
    elif what == "hold_lost_in_redis":
        await redis.hdel(inv.keys.holds, sale.held.hold_id)
    elif what == "restock_missing_in_postgres":
        await pool.execute("DELETE FROM stock_events WHERE type = 'restocked'")
    elif what == "dead_letter":
        await redis.xadd(
            dead_letter_key("fs", "d11"), {"type": "reserved", "dead_error": "DataError: planted"}
        )
    elif what == "second_hold_for_a_request":
        record = await redis.hget(inv.keys.holds, sale.held.hold_id)
        await redis.hset(inv.keys.holds, "d11.twin", record)
    else:
        raise AssertionError(what)


PLANTED = {
    "oversold_in_redis": {"oversold", "leaked"},
    "oversold_in_postgres": {"oversold", "stock_mismatch"},
    "order_missing_in_postgres": {"lost"},
    "duplicate_row_for_a_request": {"duplicate", "phantom"},
    "status_differs": {"conflict"},
    "lines_differ": {"conflict"},
    "limit_lowered_below_holdings": {"limit_breach"},
    "units_vanished": {"leaked"},
    "held_counter_drifted": {"leaked"},
    "hold_lost_in_redis": {"phantom", "leaked"},
    "restock_missing_in_postgres": {"stock_mismatch"},
    "dead_letter": {"dead_letter"},
    "second_hold_for_a_request": {"duplicate", "lost", "leaked"},
}


@pytest.mark.parametrize("what", sorted(PLANTED))
async def test_each_planted_violation_is_caught(
    what: str, sale: Sale, text_redis: Redis, pipeline_pool: Any, audit: Audit
) -> None:
    assert (await audit()).ok
    await _plant(sale, text_redis, pipeline_pool, what)
    report = await audit()
    assert not report.ok
    assert set(kinds(report)) == PLANTED[what], report.table()
    assert "AUDIT FAILED" in report.table()
    assert report.to_json()["ok"] is False


async def test_a_dead_reservation_call_is_named_by_its_holds(
    sale: Sale, text_redis: Redis, audit: Audit
) -> None:
    """A dead-lettered reserved_batch entry has no 'order' field: its holds name it."""
    await text_redis.xadd(
        dead_letter_key("fs", "d11"),
        {
            "type": "reserved_batch",
            "at": "1",
            "d11.a": "alice phone:1 r-1 2",
            "d11.b": "bob phone:1 r-1 2",
            "dead_stream_id": "1-0",
            "dead_error": "DataError: planted",
        },
    )
    (dead,) = [v for v in (await audit()).violations if v.kind == "dead_letter"]
    assert "(e.g. d11.a and 1 more holds: DataError: planted)" in dead.detail


async def test_details_name_the_order_sku_and_units(
    sale: Sale, text_redis: Redis, pipeline_pool: Any, audit: Audit
) -> None:
    await text_redis.hincrby(sale.inv.keys.stock, "phone:sold", 100)
    await pipeline_pool.execute("DELETE FROM orders WHERE order_id = $1", sale.held.hold_id)
    await text_redis.hset(sale.inv.keys.stock, "phone:limit", 1)
    report = await audit()
    by_kind = {v.kind: v for v in report.violations}
    assert by_kind["oversold"].sku == "phone" and by_kind["oversold"].units == (6 + 100) + 21 - 60
    assert by_kind["lost"].order_id == sale.held.hold_id and by_kind["lost"].where == "postgresql"
    breach = [v for v in report.violations if v.kind == "limit_breach"]
    assert {(v.where, v.units) for v in breach} == {
        ("redis", 1),
        ("postgresql", 1),
    }  # alice: 2 phones, limit 1
    assert all(
        sale.held.hold_id in line for line in report.table().splitlines() if line.strip().startswith("lost")
    )


async def test_acknowledged_orders_missing_anywhere_are_lost(sale: Sale, audit: Audit) -> None:
    ghost = "d11." + "f" * 24
    report = await audit(acknowledged=[*sale.ids, ghost])
    lost = [v for v in report.violations if v.kind == "lost"]
    assert {(v.order_id, v.where) for v in lost} == {(ghost, "postgresql"), (ghost, "redis")}


async def test_a_hold_stranded_past_its_deadline_is_leaked_stock(
    sale: Sale, text_redis: Redis, writer_running: Any, drained: Any, audit: Audit
) -> None:
    stranded = await sale.inv.reserve("z", [Line("case", 2)], request_id="z1", hold_ttl=0.05)
    async with writer_running():
        await drained(text_redis, ["d11"])
    assert (await audit(expiry_grace_s=5)).ok  # the sweeper may still come
    await asyncio.sleep(0.1)
    report = await audit(expiry_grace_s=0.01)  # no sweeper ran: its units are stranded
    (v,) = report.violations
    assert (v.kind, v.order_id, v.units) == ("leaked", stranded.hold_id, 2)


async def test_an_undrained_stream_is_reported(sale: Sale, text_redis: Redis, audit: Audit) -> None:
    await sale.inv.reserve("y", [Line("case", 1)], request_id="y1")  # no writer running now
    report = await audit(wait_drain_s=0.3)
    assert not report.drained and report.waited_s >= 0.3
    assert report.outstanding == {"d11": 1}
    assert {"not_drained", "lost"} <= set(kinds(report))
    assert "NO after" in report.table()


def test_cli_exit_codes_and_json(
    sale: Sale, text_redis: Redis, pipeline_db_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "FLASHSALE_REDIS_URL": redis_url, "FLASHSALE_DATABASE_URL": pipeline_db_url}
    ack = tmp_path / "ack.txt"
    ack.write_text("\n".join(sale.ids) + "\n")
    out = tmp_path / "audit.json"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", "audit", "--wait", "2", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    clean = run("--json", str(out), "--acknowledged", str(ack), "--sale", "d11")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "AUDIT OK" in clean.stdout and "phone" in clean.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["ok"] and doc["counts"]["acknowledged"] == len(sale.ids)

    asyncio.run(_tamper(redis_url, sale.inv.keys.stock))
    dirty = run("--json", str(out))
    assert dirty.returncode == exit_codes.INVARIANT_VIOLATED, dirty.stdout + dirty.stderr
    assert "AUDIT FAILED" in dirty.stdout
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["violations_by_kind"]["leaked"] >= 1

    missing = subprocess.run(
        [sys.executable, "-m", "flashsale", "audit"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "FLASHSALE_DATABASE_URL"},
    )
    assert missing.returncode == exit_codes.USAGE and "FLASHSALE_DATABASE_URL" in missing.stderr


async def _tamper(redis_url: str, stock_key: str) -> None:
    redis = redis_from_url(redis_url)
    try:
        await redis.hincrby(stock_key, "case:available", -1)
    finally:
        await redis.aclose()


async def test_a_bytes_client_gives_the_same_report(
    sale: Sale, redis_client: Redis, pipeline_pool: Any, audit: Audit
) -> None:
    """The service's client returns bytes (the admin audit endpoint passes it as it is)."""
    await pipeline_pool.execute("DELETE FROM orders WHERE order_id = $1", sale.held.hold_id)
    decoded = await audit(acknowledged=sale.ids)
    raw = await run_audit(redis_client, pipeline_pool, acknowledged=sale.ids, wait_drain_s=2)
    assert raw.by_kind() == decoded.by_kind() and raw.counts == decoded.counts
    assert [v.detail for v in raw.violations] == [v.detail for v in decoded.violations]


async def test_an_oversell_in_a_later_creation_is_not_hidden_by_an_earlier_one(
    text_redis: Redis, pipeline_pool: Any, writer_running: Any, drained: Any, audit: Audit
) -> None:
    """Planted, issue 12 item 6: d11 created, retired, created again; the second d11's 3 units
    sold, then sold and paid again (what a Redis restarted from an older copy did before the
    fence knew generations). Added to the first d11's 3 unsold units they looked stocked:
    'oversold 0'. Each creation is audited on its own rows now."""

    async def create(stock: int) -> tuple[Inventory, int]:
        seconds, micros = await text_redis.time()
        generation = int(seconds) * 1000 + int(micros) // 1000
        settings = SaleSettings("d11", now_ms(), state="open", generation=generation)
        await SaleBook(text_redis, "fs").create(settings, ["phone"], ["d11"])
        inv = Inventory(text_redis, "d11")
        await inv.stock("phone", stock)
        return inv, generation

    first, _ = await create(3)
    async with writer_running():
        await drained(text_redis, ["d11"])
    await fence.record_sales(text_redis, pipeline_pool)
    await text_redis.delete(*first.keys.all(), "fs:sale:d11")
    assert await forget(pipeline_pool, prefix="fs", sale="d11")
    second, generation = await create(3)
    holds = [await second.reserve(f"u{i}", [Line("phone", 1)], request_id=f"r{i}") for i in range(3)]
    for hold in holds:
        await second.confirm(hold.hold_id)
    async with writer_running():
        await drained(text_redis, ["d11"])
    await fence.record_sales(text_redis, pipeline_pool)
    assert (await audit()).ok  # the second d11 on its own rows: 3 stocked, 3 paid

    for i, hold in enumerate(holds):  # the same 3 units, sold and paid again
        await pipeline_pool.execute(
            "INSERT INTO orders SELECT $2, sale, user_id, 'again' || $3, status, status_rank, created_at,"
            " pay_by, status_at, written_at, last_stream_id FROM orders WHERE order_id = $1",
            hold.hold_id,
            f"d11.again{i}",
            str(i),
        )
        await pipeline_pool.execute(
            "INSERT INTO order_lines SELECT $2, sku, qty FROM order_lines WHERE order_id = $1",
            hold.hold_id,
            f"d11.again{i}",
        )
    report = await audit()
    assert set(kinds(report)) == {"oversold", "phantom"}, report.table()
    (oversold,) = [v for v in report.violations if v.kind == "oversold"]
    assert (oversold.where, oversold.sku, oversold.units, oversold.generation) == (
        "postgresql",
        "phone",
        3,
        generation,
    )
