"""The PostgreSQL pool's judgement of failures (``flashsale.pgpool``), against a real server.

The order writer waits out what ``is_transient`` calls transient (forgetting the pool's
stale connections) and logs ``postgres_unavailable``; anything else reads as the
database refusing writes ("is the schema migrated?"). So every error a dropped
connection can raise must be transient, whichever state asyncpg's protocol was in.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from flashsale.pgpool import close_pool, is_data_error, is_transient

#: Connection drops to provoke; asyncpg raised its protocol-state error on about one in
#: seven here, so a misjudged kind of error is all but certain to show.
DROPS = 60


async def _query(pool: asyncpg.Pool, running: asyncio.Event, dropped: asyncio.Event) -> None:
    while not dropped.is_set():  # a query after the drop would just get a new connection
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_sleep(0.001)")
        running.set()


async def test_every_error_of_a_dropped_connection_is_transient(database_url: str) -> None:
    name = f"pgpool-{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    seen: dict[str, BaseException] = {}
    try:
        for _ in range(DROPS):
            pool = await asyncpg.create_pool(
                database_url, min_size=2, max_size=2, server_settings={"application_name": name}
            )
            running, dropped = asyncio.Event(), asyncio.Event()
            queries = [asyncio.ensure_future(_query(pool, running, dropped)) for _ in range(2)]
            await running.wait()
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", name
            )
            dropped.set()
            for task in queries:
                try:
                    await task
                except Exception as exc:  # what the writer's retry loop would be judging
                    seen.setdefault(type(exc).__name__, exc)
            await close_pool(pool)
    finally:
        await admin.close()
    assert seen, "no query noticed its connection dropped"
    misjudged = {kind: str(exc) for kind, exc in seen.items() if not is_transient(exc)}
    assert not misjudged, f"a dropped connection read as the database refusing writes: {misjudged}"
    assert not any(is_data_error(exc) for exc in seen.values())
