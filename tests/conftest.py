"""Shared fixtures: real Redis and PostgreSQL, embedded unless the environment names servers.

``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` point the whole suite at existing servers
instead of starting its own (see ``flashsale.runtime.embedded.EmbeddedStack``).
``FLASHSALE_TEST_REDIS=cluster`` runs the Redis fixtures against an embedded three-master
Redis Cluster instead (see ``redis_mode.py`` and the section at the end).

The engine suites (``redis_mode.ENGINE_SUITES``) run once per engine: their tests get
``redis_engine`` parametrized, and ``engine_stack`` (behind ``redis_url``, ``redis_client``,
``text_redis``…) and ``redis_cluster_server`` start that engine's servers once per session.
PostgreSQL is one server for all.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis_mode import ENGINE_SUITES, TEST_ENGINES, engine_for, engines_vary, on_cluster, redis_from_url

from flashsale.runtime.cluster import RedisClusterServer
from flashsale.runtime.embedded import DATABASE_URL_ENV, REDIS_URL_ENV, EmbeddedStack
from flashsale.runtime.engines import ENGINE_ENV, EngineError, find_engine

ALLOW_FLUSH_ENV = "FLASHSALE_TEST_ALLOW_FLUSH"


class EngineServers:
    """The servers of each engine for the session, started on first use: a stack (its own
    Redis, the default stack's PostgreSQL) and a three-master cluster. The default engine's
    stack is ``embedded_stack`` itself."""

    def __init__(self) -> None:
        self._stacks: dict[Path, EmbeddedStack] = {}
        self._clusters: dict[Path, RedisClusterServer] = {}

    def stack(self, engine_id: str | None, default: EmbeddedStack) -> EmbeddedStack:
        if engine_id is None:
            return default
        binary = engine_for(engine_id).binary
        if default.redis is not None and default.redis.binary == binary:
            return default
        if binary not in self._stacks:
            environ = {DATABASE_URL_ENV: default.database_url, ENGINE_ENV: str(binary)}
            self._stacks[binary] = EmbeddedStack(environ=environ).start()
        return self._stacks[binary]

    def cluster(self, engine_id: str | None) -> RedisClusterServer:
        binary = find_engine().binary if engine_id is None else engine_for(engine_id).binary
        if binary not in self._clusters:
            self._clusters[binary] = RedisClusterServer(masters=3, binary=binary).start()
        return self._clusters[binary]

    def stop(self) -> None:
        for server in [*self._stacks.values(), *self._clusters.values()]:
            server.stop()


@pytest.fixture(scope="session")
def engine_servers() -> Iterator[EngineServers]:
    servers = EngineServers()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def embedded_stack(engine_servers: EngineServers) -> Iterator[EmbeddedStack]:
    """The session's servers on the default engine; tests take ``engine_stack`` (or the URLs)."""
    environ = None
    if on_cluster():  # the stack's Redis is the session's embedded cluster
        environ = {**os.environ, REDIS_URL_ENV: engine_servers.cluster(None).url}
    with EmbeddedStack(environ=environ) as stack:
        yield stack


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_engine" in metafunc.fixturenames and engines_vary(metafunc.module.__name__):
        metafunc.parametrize("redis_engine", list(TEST_ENGINES), indirect=True)


@pytest.fixture
def redis_engine(request: pytest.FixtureRequest) -> str | None:
    """The engine this test runs on (a ``redis_mode.TEST_ENGINES`` id), None for the default."""
    return getattr(request, "param", None)


@pytest.fixture
def engine_stack(
    redis_engine: str | None, engine_servers: EngineServers, embedded_stack: EmbeddedStack
) -> EmbeddedStack:
    """The stack of this test's engine: ``embedded_stack`` unless an engine suite says another."""
    return engine_servers.stack(redis_engine, embedded_stack)


@pytest.fixture
def redis_cluster_server(redis_engine: str | None, engine_servers: EngineServers) -> RedisClusterServer:
    """The session's cluster of this test's engine."""
    return engine_servers.cluster(redis_engine)


@pytest.fixture
def redis_url(engine_stack: EmbeddedStack) -> str:
    return engine_stack.redis_url


@pytest.fixture
def database_url(engine_stack: EmbeddedStack) -> str:
    return engine_stack.database_url


@pytest.fixture
async def redis_client(engine_stack: EmbeddedStack) -> AsyncIterator[Redis]:
    """A client on an empty database, bytes in and out (``decode_responses=False``).

    An embedded server belongs to the suite and is FLUSHALLed before each test. A server named
    by FLASHSALE_REDIS_URL may hold someone's data: tests refuse to touch it unless
    FLASHSALE_TEST_ALLOW_FLUSH=1, and then only FLUSHDB the database the URL names, so
    ``redis://host:6379/15`` keeps the tests away from database 0.
    """
    embedded = engine_stack.redis is not None or on_cluster()  # a test cluster is always embedded
    if not embedded and os.environ.get(ALLOW_FLUSH_ENV) != "1":
        pytest.fail(
            f"refusing to flush the Redis at {engine_stack.redis_url} (from FLASHSALE_REDIS_URL): "
            f"set {ALLOW_FLUSH_ENV}=1 if its database may be emptied before each test",
            pytrace=False,
        )
    client = redis_from_url(engine_stack.redis_url, decode_responses=False)
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

    from flashsale.pipeline.writer import OrderWriter, WorkerSettings

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
# Redis Cluster (owned by the cluster tests). One embedded three-master cluster per engine
# per session (``EngineServers``), started on first use: by the cluster tests, and by
# ``embedded_stack`` under FLASHSALE_TEST_REDIS=cluster, which also exports FLASHSALE_REDIS_CLUSTER=1 so that
# services, workers and audits started by tests (in process or not) use cluster clients.
# ----------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    if on_cluster():
        os.environ["FLASHSALE_REDIS_CLUSTER"] = "1"


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = (
        "embedded Redis Cluster, 3 masters (FLASHSALE_TEST_REDIS=cluster)" if on_cluster() else "one server"
    )
    try:
        engine = f"{find_engine()} ({ENGINE_ENV}={os.environ.get(ENGINE_ENV, '')})"
    except EngineError as exc:
        engine = str(exc)
    return [
        f"redis: {mode}; default engine: {engine}",
        f"engines: {', '.join(TEST_ENGINES)} for {', '.join(ENGINE_SUITES)}",
    ]
