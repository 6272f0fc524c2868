"""The drill checker: a clean history passes, and each planted violation — a lost order, a
duplicate, an oversell, a refused request that was written anyway, a payment PostgreSQL does
not show — makes it fail. Real Redis and PostgreSQL; the orders reach PostgreSQL through the
order writer's own statement."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from flashsale.drills.checker import History, Operation, check, classify, observe
from flashsale.fence.recovery import _drain
from inventory import Inventory, SoldOut

PREFIX = "fs"
_clock = itertools.count()


def _op(kind: str, key: str, user: str, status: int, code: str = "", **kw: Any) -> Operation:
    t = next(_clock) / 100
    return Operation(
        kind,
        key,
        user,
        kw.pop("attempt", 0),
        t,
        t + 0.005,
        status,  # type: ignore[arg-type]
        classify(status, code),
        code,
        **kw,
    )


@dataclass
class Baseline:
    sale: str
    history: History
    paid: list[str]
    failed_request: str


@pytest.fixture
async def baseline(text_redis: Redis, pipeline_pool: asyncpg.Pool) -> Baseline:
    """Sale ``chk`` with 5 units: 4 holds acknowledged, 2 paid, 1 request refused (sold out),
    the 2 unpaid holds lapsed — everything written to PostgreSQL."""
    inv = Inventory(text_redis, "chk", prefix=PREFIX, hold_ttl=0.3, coalesce=False)
    await inv.stock("phone", 5)
    history = History()
    holds = []
    for i in range(4):
        hold = await inv.reserve(f"u{i}", [("phone", 1)], request_id=f"r{i}")
        holds.append(hold)
        history.add(
            _op("order", f"r{i}", f"u{i}", 201, order_id=hold.hold_id, state="held", lines=(("phone", 1),))
        )
    with pytest.raises(SoldOut):
        await inv.reserve("u9", [("phone", 2)], request_id="r9")
    history.add(_op("order", "r9", "u9", 409, "sold_out", lines=(("phone", 2),)))
    paid = []
    for hold in holds[:2]:
        await inv.confirm(hold.hold_id)
        paid.append(hold.hold_id)
        history.add(_op("pay", hold.hold_id, hold.user, 200, order_id=hold.hold_id, state="paid"))
    await asyncio.sleep(0.4)
    await inv.expire_due()
    await _drain(text_redis, pipeline_pool, PREFIX, "chk", "0-0")
    return Baseline("chk", history, paid, "r9")


async def _verdict(text_redis: Redis, pool: asyncpg.Pool, history: History) -> Any:
    return check(history, await observe(text_redis, pool, prefix=PREFIX, sale="chk"), grace_ms=0)


def test_outcomes_are_classified_by_what_the_answer_proves() -> None:
    assert classify(201) == classify(200) == "ok"
    assert (
        classify(409, "sold_out")
        == classify(429, "limit_exceeded")
        == classify(422, "invalid_request")
        == classify(429, "overloaded")  # shed at the in-flight limit, before any stock
        == "failed"
    )
    assert classify(503, "sale_fenced") == classify(503, "degraded") == "failed"
    # The service could not decide, or never answered: either way is possible.
    assert classify(504, "outcome_unknown") == classify(503, "redis_unavailable") == "unknown"
    assert classify(500, "internal_error") == classify(0, "ClientConnectionError") == "unknown"


async def test_a_clean_history_passes(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert report.ok, report.table()
    assert report.requests == {"ok": 6, "failed": 1, "unknown": 0}
    assert report.order_ids == {"acknowledged": 4, "failed": 1, "unknown": 0}


async def test_unknown_outcomes_may_land_either_way(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    history = History(baseline.history)
    # r2 timed out first, then its retry learned the order (a replay); r7 never got an answer
    # and no order exists: both are fine.
    history.add(_op("order", "r2", "u2", 504, "outcome_unknown", attempt=0))
    history.add(_op("order", "r7", "u7", 0, "ServerTimeoutError"))
    report = await _verdict(text_redis, pipeline_pool, history)
    assert report.ok, report.table()
    assert report.order_ids["unknown"] == 1 and report.requests["unknown"] == 2


async def test_an_internal_error_fails_even_when_nothing_was_lost(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    """A 500 is unknown for the buyer (a retry settles it) but a bug for the drill: the
    net-reset drill once passed with 17 of them (uvloop's closed-transport error)."""
    history = History(baseline.history)
    history.add(_op("order", "r7", "u7", 500, "internal_error"))
    report = await _verdict(text_redis, pipeline_pool, history)
    assert report.failed_checks() == ["no_internal_error"], report.table()
    assert "order r7 of u7" in report.violations["no_internal_error"][0]


async def test_a_planted_lost_order_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    await pipeline_pool.execute("DELETE FROM orders WHERE order_id = $1", baseline.paid[0])
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert not report.ok
    assert "acknowledged" in report.failed_checks()
    assert any(baseline.paid[0] in line for line in report.violations["acknowledged"])


async def test_an_acknowledged_order_missing_from_the_history_is_lost(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    history = History(baseline.history)
    history.add(_op("order", "r-ghost", "u5", 201, order_id="chk.ghost", state="held"))
    report = await _verdict(text_redis, pipeline_pool, history)
    assert report.failed_checks() == ["acknowledged"]


async def _plant_order(
    pool: asyncpg.Pool, order_id: str, request_id: str, user: str, status: str, qty: int = 1
) -> None:
    rank = 0 if status == "held" else 1
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO orders (order_id, sale, user_id, request_id, status, status_rank, created_at, pay_by, "
            "status_at, last_stream_id) VALUES ($1, 'chk', $2, $3, $4, $5, now(), now() + interval '1 hour', now(), '1-0')",
            order_id,
            user,
            request_id,
            status,
            rank,
        )
        await conn.execute(
            "INSERT INTO order_lines (order_id, sku, qty) VALUES ($1, 'phone', $2)", order_id, qty
        )


async def test_a_planted_duplicate_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    await _plant_order(pipeline_pool, "chk.dup", "r0", "u0", "cancelled")
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert "exactly_once" in report.failed_checks()
    assert any("r0" in line for line in report.violations["exactly_once"])


async def test_a_planted_oversell_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    # 2 paid of 5: four more paid units make 6 > 5.
    await _plant_order(pipeline_pool, "chk.over", "r-over", "u8", "paid", qty=4)
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert "no_oversell" in report.failed_checks()
    assert any("1 oversold" in line for line in report.violations["no_oversell"])


async def test_a_refused_request_found_in_postgresql_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    await _plant_order(pipeline_pool, "chk.refused", baseline.failed_request, "u9", "expired")
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert "not_failed" in report.failed_checks()


async def test_a_payment_postgresql_does_not_show_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    await pipeline_pool.execute("UPDATE orders SET status = 'expired' WHERE order_id = $1", baseline.paid[1])
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert "acknowledged_state" in report.failed_checks()


async def test_stock_stranded_in_redis_fails(
    baseline: Baseline, text_redis: Redis, pipeline_pool: asyncpg.Pool
) -> None:
    await text_redis.hincrby(
        "{fs:chk}:stock", "phone:available", -1
    )  # a unit neither available, held nor sold
    report = await _verdict(text_redis, pipeline_pool, baseline.history)
    assert {"conservation", "no_leak"} <= set(report.failed_checks())


def test_history_round_trips_through_a_file(tmp_path: Any) -> None:
    history = History(
        [_op("order", "r1", "u1", 201, order_id="s.1", state="held", lines=(("a", 2),), replayed=True)]
    )
    history.save(tmp_path / "h.jsonl")
    assert History.load(tmp_path / "h.jsonl").ops == history.ops
