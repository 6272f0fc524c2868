"""Schema migrations: applied once, in order, atomically, safely from two processes at once;
an edited migration is refused; ``flashsale migrate`` and ``--status`` work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from importlib import resources

import asyncpg
import pytest

from flashsale import exit_codes
from flashsale.pipeline.migrate import Migration, MigrationError, available, migrate, migration_status


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {r["tablename"] for r in rows}


def test_every_sql_file_is_a_numbered_migration() -> None:
    files = sorted(
        p.name
        for p in (resources.files("flashsale.pipeline") / "migrations").iterdir()
        if p.name.endswith(".sql")
    )
    # A misnamed file would be skipped silently: every .sql file must be picked up, in order.
    assert [m.label + ".sql" for m in available()] == files


async def test_migrate_applies_everything_once(pipeline_db_url: str) -> None:
    conn = await asyncpg.connect(pipeline_db_url)
    try:
        assert {s.state for s in await migration_status(conn)} == {"pending"}
        applied = await migrate(conn)
        assert [m.version for m in applied] == [m.version for m in available()]
        assert {"orders", "order_lines", "stock_events", "schema_migrations"} <= await _tables(conn)
        assert await migrate(conn) == []
        assert {s.state for s in await migration_status(conn)} == {"applied"}
    finally:
        await conn.close()


async def test_two_migrators_at_once_apply_each_migration_once(pipeline_db_url: str) -> None:
    conns = [await asyncpg.connect(pipeline_db_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(m.version for r in results for m in r)
        assert applied == [m.version for m in available()]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == applied
    finally:
        for c in conns:
            await c.close()


async def test_a_failing_migration_leaves_no_trace(pipeline_db_url: str) -> None:
    broken = (*available(), Migration(99, "broken", "CREATE TABLE half_done (x int); SELECT 1 / 0;"))
    conn = await asyncpg.connect(pipeline_db_url)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn, migrations=broken)
        assert "half_done" not in await _tables(conn)
        states = {s.version: s.state for s in await migration_status(conn, migrations=broken)}
        assert states[99] == "pending"
        assert all(state == "applied" for v, state in states.items() if v != 99)
        # The lock was released: another migrator is not blocked forever.
        other = await asyncpg.connect(pipeline_db_url)
        try:
            assert await asyncio.wait_for(migrate(other), 10) == []
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(pipeline_db_url: str) -> None:
    conn = await asyncpg.connect(pipeline_db_url)
    try:
        await migrate(conn)
        first, *rest = available()
        edited = (Migration(first.version, first.name, first.sql + "\n-- edited\n"), *rest)
        with pytest.raises(MigrationError, match="new migration"):
            await migrate(conn, migrations=edited)
        assert {s.version: s.state for s in await migration_status(conn, migrations=edited)}[
            first.version
        ] == "changed"
        # A migration recorded by a newer flashsale is reported, not dropped.
        older = tuple(m for m in available() if m.version != available()[-1].version)
        assert (await migration_status(conn, migrations=older))[-1].state == "unknown"
    finally:
        await conn.close()


def test_cli_migrate_and_status(pipeline_db_url: str) -> None:
    env = {**os.environ, "FLASHSALE_DATABASE_URL": pipeline_db_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", *args], env=env, capture_output=True, text=True, timeout=60
        )

    before = run("migrate", "--status")
    assert before.returncode == 0, before.stderr
    assert "pending" in before.stdout and "applied" not in before.stdout
    done = run("migrate")
    assert done.returncode == 0, done.stderr
    assert f"applied {len(available())} migration(s)" in done.stdout
    after = run("migrate", "--status")
    assert after.stdout.count("applied") == len(available()) and "pending" not in after.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "flashsale", "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "FLASHSALE_DATABASE_URL"},
    )
    assert missing.returncode == exit_codes.USAGE and "FLASHSALE_DATABASE_URL" in missing.stderr
