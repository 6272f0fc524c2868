"""The app factory: ``create_app(settings)`` builds the order service. Resources (the
Redis client, the PostgreSQL pool, the stats publisher) are opened and closed in one
cleanup context; uvloop is installed by the entry point (``flashsale serve``), never here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from flashsale.redis_client import ConnectWatch, connect
from flashsale.service import admin_api, buyer_api, fence_guard, probes, waiting_room
from flashsale.service.admission import BuyerTurns, InFlight, RateLimiter, SoldOutCache
from flashsale.service.errors import error_answer
from flashsale.service.identity import Identity
from flashsale.service.metrics import ServiceMetrics
from flashsale.service.sales import SaleBook
from flashsale.service.state import STATE, ServiceState
from flashsale.service.warroom import routes as warroom
from flashsale.settings import Settings

__all__ = ["answer_middleware", "create_app", "redis_client"]

log = logging.getLogger("flashsale.service")


#: Connections to Redis per process (a cluster: commands in flight per process). Requests
#: past it wait their turn, up to the Redis timeout, instead of failing.
REDIS_CONNECTIONS = 256
REDIS_CLUSTER_TURNS = 1024


def redis_client(settings: Settings, watch: ConnectWatch | None = None) -> Redis | RedisCluster:
    """The service's Redis client. At most one re-send on timeout: the scripts are
    idempotent, so a re-send is safe, but each one adds a whole timeout to the worst case
    before the buyer hears "outcome unknown". A burst past the pool waits for a connection
    (first come, first served) for at most the same timeout: only a real deadline turns
    into "unknown", never the service's own concurrency. ``watch`` (one server only) sees
    every connection the client opens: the fence guard's way to check each new server."""
    client: Redis | RedisCluster = connect(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=settings.redis_timeout_s,
        resends=1,
        max_connections=REDIS_CLUSTER_TURNS if settings.redis_cluster else REDIS_CONNECTIONS,
        wait_s=settings.redis_timeout_s,
        watch=watch,
    )
    return client


async def _learn_slot_map(redis: RedisCluster) -> None:
    """Ask the cluster for its slot map before the first request: redis-py 8.1 breaks
    commands that race a cold cluster client's first use (a burst on a freshly started
    process got 503s). A cluster that is down does not stop start-up (/readyz says so);
    the client then learns the map on first use."""
    try:
        await redis.initialize()
    except (RedisError, RedisClusterException, OSError) as exc:
        log.warning("redis cluster not reachable at start-up: %s", exc)


async def _pg_pool(settings: Settings):  # type: ignore[no-untyped-def]
    if not settings.database_url:
        return None
    import asyncpg

    # min_size=0: no connection at startup. Orders never wait on PostgreSQL, so a database
    # that is down must not stop the service from starting; /readyz reports it instead.
    return await asyncpg.create_pool(settings.database_url, min_size=0, max_size=4, command_timeout=10)


def answer_middleware(metrics: ServiceMetrics) -> Middleware:
    """The app's one middleware: the fence's refusal while it refuses anything
    (:func:`fence_guard.refusing`), every failure as its JSON error (:func:`error_answer`),
    and every answer, as the client gets it, timed and counted by route. One layer, not
    one per concern: each layer costs every request a call."""

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            guard = fence_guard.refusing(request.app)
            if guard is not None:
                await fence_guard.refuse_fenced(request, guard)
            response = await handler(request)
        except Exception as exc:
            try:
                response = error_answer(request, exc)
            except web.HTTPException as redirect:  # raised again: not an error, still an answer
                metrics.record_answer(request, redirect.status, started)
                raise
        # (A cancelled request got no answer: nothing is counted.)
        metrics.record_answer(request, response.status, started)
        return response

    return answer


def create_app(settings: Settings) -> web.Application:
    metrics = ServiceMetrics()
    app = web.Application(middlewares=[answer_middleware(metrics)], client_max_size=settings.max_body_bytes)
    app.add_routes(buyer_api.routes)
    app.add_routes(waiting_room.routes)
    app.add_routes(admin_api.routes)
    app.add_routes(probes.routes)
    app.add_routes(warroom.routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        watch = None if settings.redis_cluster else ConnectWatch()
        redis = redis_client(settings, watch)
        if isinstance(redis, RedisCluster):
            await _learn_slot_map(redis)
        pg = await _pg_pool(settings)
        state = ServiceState(
            settings=settings,
            redis=redis,
            sales=SaleBook(redis, settings.key_prefix, ttl_s=settings.sale_cache_s),
            metrics=metrics,
            rate=RateLimiter(settings.user_rate, settings.user_burst),
            in_flight=InFlight(settings.max_in_flight),
            sold_out=SoldOutCache(settings.sold_out_cache_s),
            buyers=BuyerTurns(settings.buyer_in_flight),
            identity=Identity.from_settings(settings),
            room_polls=RateLimiter(settings.room_poll_rate, settings.room_poll_burst),
            pg=pg,
            redis_watch=watch,
        )
        app[STATE] = state
        publisher = asyncio.ensure_future(
            state.metrics.publish_forever(redis, settings.key_prefix, state.in_flight)
        )
        flusher = asyncio.ensure_future(state.metrics.flush_forever())  # (multi-process mode)
        try:
            yield
        finally:
            for task in (publisher, flusher):  # the flusher writes the last answers as it goes
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.aclose()
            if pg is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pg.close(), timeout=5)
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    # After Redis loses data, refuse sales until `flashsale recover` (uses the clients above).
    fence_guard.install(app)
    return app
