"""Schema migrations: the versioned SQL files in ``flashsale/migrations`` and the
``schema_migrations`` table that records which ones a database has.

Files are named ``NNNN_what.sql`` and applied in version order, each in its own
transaction together with its row in ``schema_migrations``, so a migration is either
fully applied and recorded or not at all. A session-level advisory lock serialises
concurrent migrators (two workers starting at once): the second waits, then finds
nothing left to do. A file whose text changed after it was applied is refused — write a
new migration instead of editing an old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Literal

import asyncpg

__all__ = [
    "MIGRATIONS_LOCK",
    "Migration",
    "MigrationError",
    "MigrationState",
    "available",
    "migrate",
    "migrate_url",
    "migration_status",
]

#: The advisory lock key every migrator takes (an arbitrary constant: "flashsale" in ASCII).
MIGRATIONS_LOCK = 0x666C61736873616C

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The database's schema history does not match the migration files."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class MigrationState:
    """Where one migration stands in a database.

    ``applied``: recorded and unchanged; ``pending``: not applied yet; ``changed``: applied,
    but the file's text differs now; ``unknown``: recorded by a newer flashsale than this one.
    """

    version: int
    name: str
    state: Literal["applied", "pending", "changed", "unknown"]
    applied_at: datetime | None


def available() -> tuple[Migration, ...]:
    """The migrations shipped with this version of flashsale, oldest first."""
    found: list[Migration] = []
    folder = resources.files("flashsale.pipeline") / "migrations"
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return tuple(found)


async def _recorded(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations")
    return {row["version"]: row for row in rows}


def _check_unchanged(migrations: tuple[Migration, ...], recorded: dict[int, asyncpg.Record]) -> None:
    for m in migrations:
        row = recorded.get(m.version)
        if row is not None and row["checksum"] != m.checksum:
            raise MigrationError(
                f"migration {m.label} was changed after it was applied to this database "
                f"(recorded checksum {row['checksum'][:12]}…, file {m.checksum[:12]}…). "
                "Restore the original file and put the change in a new migration."
            )


async def migrate(
    conn: asyncpg.Connection, *, migrations: tuple[Migration, ...] | None = None
) -> list[Migration]:
    """Apply every pending migration, in order; return the ones this call applied.

    Safe to run from several processes at once (advisory lock). Raises
    :class:`MigrationError` if an applied migration's file has changed.
    """
    todo = available() if migrations is None else migrations
    applied: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
    try:
        await conn.execute(_CREATE_TABLE)
        recorded = await _recorded(conn)
        _check_unchanged(todo, recorded)
        for m in todo:
            if m.version in recorded:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied.append(m)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK)
    return applied


async def migration_status(
    conn: asyncpg.Connection, *, migrations: tuple[Migration, ...] | None = None
) -> list[MigrationState]:
    """Every known migration (shipped or recorded) and its state, by version."""
    shipped = {m.version: m for m in (available() if migrations is None else migrations)}
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    recorded = await _recorded(conn) if exists else {}
    states: list[MigrationState] = []
    for version in sorted(shipped.keys() | recorded.keys()):
        m, row = shipped.get(version), recorded.get(version)
        if m is None:
            assert row is not None
            states.append(MigrationState(version, row["name"], "unknown", row["applied_at"]))
        elif row is None:
            states.append(MigrationState(version, m.name, "pending", None))
        else:
            state: Literal["applied", "changed"] = "applied" if row["checksum"] == m.checksum else "changed"
            states.append(MigrationState(version, m.name, state, row["applied_at"]))
    return states


async def migrate_url(database_url: str) -> list[Migration]:
    """:func:`migrate` over a connection of its own (what ``flashsale migrate`` runs)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return await migrate(conn)
    finally:
        await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        conn.terminate()
