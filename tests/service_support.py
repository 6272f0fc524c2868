"""What the order-service tests share: a factory that runs the real app (``create_app``)
behind aiohttp's ``TestServer`` — with the service's own runner and protocol
(``ServiceTestServer``), as ``flashsale serve`` runs it — against the suite's Redis, buyer and admin credentials, a
sale-creating shortcut, and a byte-exact dump of every Redis key for "bad input changes
nothing" comparisons.

Test modules import the fixtures they use from here (``from service_support import
start_service``); pytest finds a fixture wherever the test module's namespace has it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_mode import command_calls as command_calls  # re-exported: tests import it from here
from redis_mode import on_cluster

from flashsale.service.app import create_app
from flashsale.service.state import STATE, ServiceState
from flashsale.service.tokens import mint
from flashsale.service.transport import ServiceRunner
from flashsale.settings import Settings
from inventory import SaleKeys

TOKEN_SECRET = "service-tests-token-secret"
ADMIN_TOKEN = "service-tests-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

#: Keys no test may compare byte for byte: each process's once-a-second stats heartbeat
#: (``<prefix>:stats:proc:<pid>`` and the set naming them) changes on its own clock.
HEARTBEAT_MARKER = b":stats:proc"


def service_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test app: known secrets, a per-buyer rate limit high enough that
    only the tests about rate limiting meet it, and a cluster client when the suite runs
    on a Redis Cluster (FLASHSALE_TEST_REDIS=cluster)."""
    base = Settings(
        redis_url=redis_url,
        redis_cluster=on_cluster(),
        token_secret=TOKEN_SECRET,
        admin_token=ADMIN_TOKEN,
        user_rate=1000.0,
        user_burst=1000,
    )
    return replace(base, **overrides)


def buyer(
    user: str, *, member: bool = False, ttl_s: int = 3600, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Headers of a signed-in buyer (plus ``extra`` headers)."""
    return {
        "Authorization": f"Bearer {mint(TOKEN_SECRET, user, ttl_s=ttl_s, member=member)}",
        **(extra or {}),
    }


def new_id(tag: str) -> str:
    """A sale or SKU id no other test uses (ids are lower-case friendly and short)."""
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Service:
    """One running service process (in this test's event loop) and a client for it."""

    client: TestClient[web.Request, web.Application]
    settings: Settings

    @property
    def app(self) -> web.Application:
        app = self.client.app
        assert app is not None
        return app

    @property
    def state(self) -> ServiceState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return str(self.client.make_url(""))

    async def create_sale(
        self,
        skus: dict[str, int] | list[dict[str, Any]],
        *,
        sale: str | None = None,
        expect: int = 201,
        **fields: Any,
    ) -> dict[str, Any]:
        """POST /api/admin/sales. ``skus`` is ``{sku: stock}`` or full SKU specs; the sale
        opens now (``open: true``) unless ``opens_at`` is given."""
        specs = [{"sku": s, "stock": n} for s, n in skus.items()] if isinstance(skus, dict) else skus
        body = {"sale": sale or new_id("sale"), "skus": specs, **fields}
        if "opens_at" not in fields:
            body.setdefault("open", True)
        resp = await self.client.post("/api/admin/sales", json=body, headers=ADMIN)
        created: dict[str, Any] = await expect_json(resp, expect)
        return created

    async def order(
        self,
        user: str,
        sku: str | None = None,
        qty: int = 1,
        *,
        lines: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        member: bool = False,
        headers: dict[str, str] | None = None,
    ) -> ClientResponse:
        """POST /api/orders for ``user`` (one SKU, or ``lines``)."""
        body: dict[str, Any] = {"request_id": request_id or new_id("r")}
        if lines is not None:
            body["lines"] = lines
        else:
            body.update(sku=sku, qty=qty)
        return await self.client.post(
            "/api/orders", json=body, headers=buyer(user, member=member, extra=headers)
        )

    async def raw(
        self, method: str, path: str, headers: dict[str, bytes], body: bytes = b""
    ) -> tuple[int, Any]:
        """One request written byte for byte (header values any bytes, even not UTF-8,
        which no HTTP client library sends): the status and the JSON body."""
        reader, writer = await asyncio.open_connection(self.client.host, self.client.port)
        try:
            lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close"]
            lines += [name.encode() + b": " + value for name, value in headers.items()]
            lines.append(b"Content-Length: %d" % len(body))
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        head, _, payload = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(payload)

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain TCP connection to the service, for writing requests byte by byte."""
        return await asyncio.open_connection(self.client.host, self.client.port)

    @property
    def requests_seen(self) -> int:
        """Requests this process's HTTP server has started handling (parser refusals too)."""
        server = self.client.server.runner.server if self.client.server.runner else None
        return 0 if server is None else server.requests_count

    async def sku_counters(self, sale: str, sku: str) -> dict[str, Any]:
        """The SKU's counters from the admin view (not cached)."""
        resp = await self.client.get(f"/api/admin/sales/{sale}", headers=ADMIN)
        counters: dict[str, Any] = (await expect_json(resp, 200))["skus"][sku]
        return counters


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a raw connection: status, headers (lower-case names) and
    the body (Content-Length framed, as every answer of the service is)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers, body


async def expect_json(resp: ClientResponse, status: int, error: str | None = None) -> Any:
    """The JSON body of ``resp``, asserting its status (and error code); the message
    names the body so a failure shows what the service said."""
    text = await resp.text()
    assert resp.status == status, (
        f"{resp.method} {resp.url.path}: expected {status}, got {resp.status}: {text}"
    )
    assert resp.content_type == "application/json", f"{resp.url.path}: {resp.content_type}: {text}"
    body = json.loads(text)
    if error is not None:
        assert body.get("error") == error, body
        assert isinstance(body.get("message"), str) and body["message"], body
    return body


ServiceFactory = Callable[..., Awaitable[Service]]


class ServiceTestServer(TestServer):
    """``TestServer`` serving through :class:`ServiceRunner` (JSON answers to requests the
    HTTP parser refuses), so tests see the transport ``flashsale serve`` has — handlers
    included: they are not cancelled when a client hangs up (TestServer's own choice)."""

    async def _make_runner(self, **kwargs: Any) -> ServiceRunner:
        kwargs.pop("handler_cancellation", None)
        return ServiceRunner(self.app, **kwargs)


@pytest.fixture
async def start_service(redis_client: Redis, redis_url: str) -> AsyncIterator[ServiceFactory]:
    """``await start_service(**settings_overrides)`` runs one more service process on the
    suite's (freshly flushed) Redis — or the ``redis_url`` given, with aiohttp's
    ``runner_options`` if given; all of them are stopped after the test."""
    running: list[TestClient[web.Request, web.Application]] = []

    async def start(**overrides: Any) -> Service:
        runner_options = overrides.pop("runner_options", {})
        settings = service_settings(overrides.pop("redis_url", redis_url), **overrides)
        server = ServiceTestServer(create_app(settings))
        client = TestClient(server)
        try:
            await server.start_server(**runner_options)  # aiohttp's protocol options, if any
            await client.start_server()
        except BaseException:
            await client.close()
            raise
        running.append(client)
        return Service(client, settings)

    try:
        yield start
    finally:
        for client in reversed(running):
            await client.close()


@pytest.fixture
async def service(start_service: ServiceFactory) -> Service:
    """One service process with the test settings."""
    return await start_service()


# ------------------------------------------------------------------ Redis state


def sale_keys(sale: str, prefix: str = "fs") -> SaleKeys:
    return SaleKeys(prefix, sale)


async def holds_of_request(redis: Redis, sale: str, request_id: str) -> list[str]:
    """Ids of every hold Redis has for ``request_id`` (an idempotent order path has at most one)."""
    found = []
    for hold_id, raw in (await redis.hgetall(sale_keys(sale).holds)).items():
        if json.loads(raw)["r"] == request_id:
            found.append(hold_id.decode() if isinstance(hold_id, bytes) else hold_id)
    return found


async def dump_redis(redis: Redis) -> dict[Any, tuple[Any, Any, bool]]:
    """Every key of the database (but the stats heartbeat): its type, its DUMP payload
    (byte-exact: a stream's entries and last id, a hash's fields) and whether it expires."""
    out: dict[Any, tuple[Any, Any, bool]] = {}
    async for key in redis.scan_iter(count=1000):
        if HEARTBEAT_MARKER in key:
            continue
        out[key] = (await redis.type(key), await redis.dump(key), await redis.pttl(key) >= 0)
    return out


def changed_keys(before: dict[bytes, Any], after: dict[bytes, Any]) -> list[bytes]:
    """Keys added, removed or changed between two dumps."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class FrozenRedis:
    """Redis not answering: ``DEBUG SLEEP`` sent on a connection of its own — to every
    master when the suite runs on a Redis Cluster. Entering returns once Redis is really
    asleep (a probe no longer gets an answer from any node); leaving waits until it is
    awake again."""

    def __init__(self, redis_url: str, seconds: float) -> None:
        self.redis_url = redis_url
        self.seconds = seconds
        self._sleepers: list[Redis] = []
        self._tasks: list[asyncio.Task[Any]] = []

    async def _node_urls(self) -> list[str]:
        if not on_cluster():
            return [self.redis_url]
        cluster = RedisCluster.from_url(self.redis_url)
        try:
            await cluster.initialize()
            return [f"redis://{node.host}:{node.port}/0" for node in cluster.get_primaries()]
        finally:
            await cluster.aclose()

    async def __aenter__(self) -> FrozenRedis:
        urls = await self._node_urls()
        for url in urls:
            sleeper = Redis.from_url(url)
            self._sleepers.append(sleeper)
            await sleeper.ping()  # connected before the sleep, so the sleep is sent at once
        for sleeper in self._sleepers:
            sleep = sleeper.execute_command("DEBUG", "SLEEP", str(self.seconds))  # type: ignore[no-untyped-call]
            self._tasks.append(asyncio.ensure_future(sleep))
        awake = set(urls)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for url in sorted(awake):
                probe = Redis.from_url(
                    url, socket_timeout=0.05, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
                )
                try:
                    await probe.ping()
                except Exception:  # no answer: asleep
                    awake.discard(url)
                finally:
                    await probe.aclose()
            if not awake:
                return self
            await asyncio.sleep(0.01)
        raise AssertionError(f"Redis never went to sleep: {sorted(awake)}")

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for sleeper in self._sleepers:
                await sleeper.aclose()
