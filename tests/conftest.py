"""Shared fixtures: real Redis and PostgreSQL, embedded unless the environment names servers.

``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` point the whole suite at existing servers
instead of starting its own (see ``flashsale.runtime.embedded.EmbeddedStack``).
``FLASHSALE_TEST_REDIS=cluster`` runs the Redis fixtures against an embedded three-master
Redis Cluster instead (see ``redis_mode.py`` and the section at the end).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis_mode import on_cluster, redis_from_url

from flashsale.runtime.embedded import EmbeddedStack

ALLOW_FLUSH_ENV = "FLASHSALE_TEST_ALLOW_FLUSH"


@pytest.fixture(scope="session")
def embedded_stack(request: pytest.FixtureRequest) -> Iterator[EmbeddedStack]:
    environ = None
    if on_cluster():  # the stack's Redis is the session's embedded cluster
        environ = {**os.environ, "FLASHSALE_REDIS_URL": request.getfixturevalue("redis_cluster_server").url}
    with EmbeddedStack(environ=environ) as stack:
        yield stack


@pytest.fixture
def redis_url(embedded_stack: EmbeddedStack) -> str:
    return embedded_stack.redis_url


@pytest.fixture
def database_url(embedded_stack: EmbeddedStack) -> str:
    return embedded_stack.database_url


@pytest.fixture
async def redis_client(embedded_stack: EmbeddedStack) -> AsyncIterator[Redis]:
    """A client on an empty database, bytes in and out (``decode_responses=False``).

    An embedded server belongs to the suite and is FLUSHALLed before each test. A server named
    by FLASHSALE_REDIS_URL may hold someone's data: tests refuse to touch it unless
    FLASHSALE_TEST_ALLOW_FLUSH=1, and then only FLUSHDB the database the URL names, so
    ``redis://host:6379/15`` keeps the tests away from database 0.
    """
    embedded = embedded_stack.redis is not None or on_cluster()  # a test cluster is always embedded
    if not embedded and os.environ.get(ALLOW_FLUSH_ENV) != "1":
        pytest.fail(
            f"refusing to flush the Redis at {embedded_stack.redis_url} (from FLASHSALE_REDIS_URL): "
            f"set {ALLOW_FLUSH_ENV}=1 if its database may be emptied before each test",
            pytrace=False,
        )
    client = redis_from_url(embedded_stack.redis_url, decode_responses=False)
    try:
        if embedded:
            await client.flushall()
        else:
            await client.flushdb()
        yield client
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------------------
# Order pipeline fixtures (worker, sweeper, migrations, audit) — owned by the pipeline tests.
# Each test gets its own PostgreSQL schema (named in the URL's search_path, so processes
# started with FLASHSALE_DATABASE_URL see it too), migrated, and dropped afterwards.
# ----------------------------------------------------------------------------------------
import secrets as _pipeline_secrets  # noqa: E402

import asyncpg as _pipeline_asyncpg  # noqa: E402


@pytest.fixture
async def pipeline_db_url(database_url: str) -> AsyncIterator[str]:
    """A URL whose connections use a fresh, empty schema (not migrated)."""
    schema = "pipeline_" + _pipeline_secrets.token_hex(6)

    async def execute(sql: str) -> None:  # a fresh connection each time: the test may restart PostgreSQL
        admin = await _pipeline_asyncpg.connect(database_url)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    await execute(f"CREATE SCHEMA {schema}")
    yield database_url + ("&" if "?" in database_url else "?") + f"search_path={schema}"
    await execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def pipeline_pool(pipeline_db_url: str) -> AsyncIterator[_pipeline_asyncpg.Pool]:
    """An asyncpg pool on a fresh schema with every migration applied."""
    from flashsale.pgpool import close_pool, create_pool
    from flashsale.pipeline.migrate import migrate

    pool = await create_pool(pipeline_db_url, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        yield pool
    finally:
        await close_pool(pool)


@pytest.fixture
async def text_redis(redis_client: Redis, redis_url: str) -> AsyncIterator[Redis]:
    """Like ``redis_client`` (same emptied database) but replies decoded to str, as the
    worker uses it."""
    client = redis_from_url(redis_url, decode_responses=True)
    if on_cluster():
        await client.initialize()  # see redis_mode.redis_from_url
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def pipeline_sale(text_redis: Redis):  # type: ignore[no-untyped-def]
    """Factory: ``await pipeline_sale("d11", {"phone": 100}, limit=2)`` stocks a sale,
    registers it in ``fs:sales`` (where the worker finds it) and returns its Inventory."""
    from inventory import Inventory

    async def make(
        sale: str = "d11",
        stock: dict[str, int] | None = None,
        *,
        reserve: int = 0,
        limit: int = 0,
        hold_ttl: float = 1800.0,
    ) -> Inventory:
        inv = Inventory(text_redis, sale, hold_ttl=hold_ttl)
        for sku, units in (stock or {"phone": 100}).items():
            await inv.stock(sku, units, reserve=reserve, limit_per_user=limit)
        await text_redis.sadd("fs:sales", sale)
        return inv

    return make


@pytest.fixture
def writer_running(text_redis: Redis, pipeline_pool, redis_url: str, pipeline_db_url: str):  # type: ignore[no-untyped-def]
    """Factory: ``async with writer_running(batch=10) as writer:`` runs an OrderWriter (in
    this event loop) on the test's Redis and schema; it is stopped on exit."""
    import asyncio
    import contextlib
    import dataclasses

    from flashsale.pipeline.worker_settings import WorkerSettings
    from flashsale.pipeline.writer import OrderWriter

    @contextlib.asynccontextmanager
    async def running(pool=None, **overrides):  # type: ignore[no-untyped-def]
        settings = WorkerSettings(
            redis_url=redis_url,
            database_url=pipeline_db_url,
            consumer="w1",
            block_ms=20,
            linger_ms=0,
            sales_refresh_s=0.05,
            progress_interval_s=0,
        )
        settings = dataclasses.replace(settings, **overrides)
        writer = OrderWriter(text_redis, pool or pipeline_pool, settings)
        task = asyncio.ensure_future(writer.run())
        try:
            yield writer
        finally:
            writer.stop()
            await asyncio.wait_for(task, 30)

    return running


async def wait_until_drained(
    redis: Redis, sales: list[str], timeout: float = 30.0, prefix: str = "fs"
) -> None:
    """Wait until every entry of the sales' streams is committed (pipeline tests)."""
    import asyncio
    import time

    from flashsale.streams import events_key, stream_drained

    deadline = time.monotonic() + timeout
    while not all([await stream_drained(redis, events_key(prefix, s)) for s in sales]):
        if time.monotonic() > deadline:
            raise AssertionError(f"streams of {sales} not drained within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def drained():  # type: ignore[no-untyped-def]
    """``await drained(redis, ["d11"])``: wait until the writers committed those streams."""
    return wait_until_drained


# ----------------------------------------------------------------------------------------
# Redis Cluster (owned by the cluster tests). One embedded three-master cluster per
# session, started on first use: by test_cluster_service.py, and by ``embedded_stack``
# under FLASHSALE_TEST_REDIS=cluster, which also exports FLASHSALE_REDIS_CLUSTER=1 so that
# services, workers and audits started by tests (in process or not) use cluster clients.
# ----------------------------------------------------------------------------------------
from flashsale.runtime.cluster import RedisClusterServer as _RedisClusterServer  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if on_cluster():
        os.environ["FLASHSALE_REDIS_CLUSTER"] = "1"


def pytest_report_header(config: pytest.Config) -> str:
    return "redis: " + (
        "embedded Redis Cluster, 3 masters (FLASHSALE_TEST_REDIS=cluster)" if on_cluster() else "one server"
    )


@pytest.fixture(scope="session")
def redis_cluster_server() -> Iterator[_RedisClusterServer]:
    with _RedisClusterServer(masters=3) as cluster:
        yield cluster
