"""`flashsale drill` and `flashsale recover` as commands (``python -m flashsale``):
help that lists every fault, refusals that say what to do, a fault the configured servers
cannot take reported as skipped, and `recover` finding, rebuilding and confirming a lost sale."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
from cli_support import flashsale
from redis.asyncio import Redis

from flashsale import exit_codes
from flashsale.drills.drill import FAULTS, DrillStack, run_drill
from flashsale.fence import verify as fence
from flashsale.fence.recovery import _drain
from flashsale.service.sales import SaleBook, SaleSettings, now_ms
from inventory import Inventory

cli = flashsale


def test_help_lists_every_fault_and_what_it_proves() -> None:
    done = cli("drill", "--help")
    assert done.returncode == 0
    for name in FAULTS:
        assert name in done.stdout
    assert "nothing" in cli("recover", "--help").stdout or cli("recover", "--help").returncode == 0


def test_bad_arguments_are_refused() -> None:
    assert cli("drill").returncode == exit_codes.USAGE  # a fault or --all is required
    assert cli("drill", "--fault", "meteor-strike").returncode == exit_codes.USAGE
    done = cli("drill", "--fault", "redis-pause", "--duration", "1")
    assert done.returncode == exit_codes.USAGE and "--duration" in done.stderr


def test_recover_without_servers_says_what_to_set() -> None:
    done = cli("recover")
    assert done.returncode == exit_codes.USAGE
    assert "FLASHSALE_REDIS_URL" in done.stderr and "FLASHSALE_DATABASE_URL" in done.stderr


def test_a_fault_the_configured_servers_cannot_take_is_skipped() -> None:
    stack = DrillStack(redis_url="redis://127.0.0.1:1/0", database_url="postgresql://x@127.0.0.1:1/x")
    stack.redis_url = "redis://127.0.0.1:1/0"  # not started: nothing is contacted for a skipped fault
    report = run_drill(stack, "redis-data-loss")
    assert report.verdict == "SKIPPED" and report.passed
    assert "embedded Redis" in report.why


async def test_recover_finds_rebuilds_and_confirms(
    text_redis: Redis, redis_url: str, pipeline_db_url: str, pipeline_pool: asyncpg.Pool
) -> None:
    await SaleBook(text_redis, "fs").create(
        SaleSettings("cli1", now_ms(), state="open"), ["cli1-phone"], ["cli1"]
    )
    inv = Inventory(text_redis, "cli1", coalesce=False)
    await inv.stock("cli1-phone", 10)
    holds = [await inv.reserve(f"u{i}", [("cli1-phone", 1)], request_id=f"r{i}") for i in range(4)]
    await inv.confirm(holds[0].hold_id)
    await _drain(text_redis, pipeline_pool, "fs", "cli1", "0-0")
    await fence.record_sales(text_redis, pipeline_pool)
    await fence.ensure_lineage(text_redis, pipeline_pool)
    await text_redis.flushdb()
    env = {"FLASHSALE_REDIS_URL": redis_url, "FLASHSALE_DATABASE_URL": pipeline_db_url}

    found = cli("recover", "--check", env=env)
    assert found.returncode == exit_codes.INVARIANT_VIOLATED, found.stdout + found.stderr
    assert "Redis lost data" in found.stdout and "lineage marker is missing" in found.stdout

    done = cli("recover", "--json", "-", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["ok"] and [r["sale"] for r in body["recovered"]] == ["cli1"]
    assert body["recovered"][0]["orders"] == {"held": 3, "paid": 1}

    again = cli("recover", "--check", env=env)
    assert again.returncode == 0 and "agrees" in again.stdout
    snap = await inv.snapshot("cli1-phone")
    assert snap is not None and (snap.available, snap.held, snap.sold) == (6, 3, 1)
