"""The fence guard: the fence's eye in one service process (a check the app's one middleware
makes of each request, and the background task behind it). What a fence is, and how a loss is noticed, is
:mod:`flashsale.fence.verify`; this module only decides, per request, whether the sale may
be sold from the Redis it is connected to, and keeps watching that Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from flashsale.fence.verify import (
    ON_A_CLUSTER,
    ClusterUnsupported,
    FenceUnavailable,
    SaleRecord,
    Verdict,
    ensure_lineage,
    fallback_record,
    raise_fence,
    record_sales,
    require_one_server,
    require_tables,
    verify,
)
from flashsale.keys import ServiceKeys
from flashsale.redis_client import ConnectWatch, as_text, connect
from flashsale.service.buyer_api import buyer_of
from flashsale.service.errors import ApiError
from flashsale.service.http import read_body, read_json
from flashsale.service.state import STATE
from inventory import parent_sale_id

__all__ = ["GUARD", "FenceGuard", "install", "installed", "refuse_fenced", "refusing", "status", "uninstall"]

logger = logging.getLogger("flashsale.fence")

_ORDER_PATHS = ("/pay", "/cancel")


# ------------------------------------------------------------------------- guard
async def _server_run_id(conn: Any) -> str:
    await conn.send_command("INFO", "server", check_health=False)
    raw = as_text(await conn.read_response())
    for line in raw.splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip()
    return ""


class FenceGuard:
    """The fence in one service process; see the module docstring."""

    def __init__(
        self,
        *,
        watch: ConnectWatch,
        pool: Any,
        redis_url: str,
        prefix: str = "fs",
        timeout_s: float = 2.0,
        poll_s: float = 0.5,
        record_s: float = 2.0,
        verify_s: float = 30.0,
    ) -> None:
        self.watch = watch  # every connection the service's client opens
        self.pool = pool
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.record_s = record_s
        self.verify_s = verify_s
        self._lineage: str | None = None  # the token this process last saw verified
        #: Grace after a bad server is found, during which its connections are refused: long
        #: enough for any request that got past the check before the fence to give up.
        self.refuse_s = 2 * timeout_s + 1
        self.redis = connect(redis_url, timeout_s=timeout_s, decode=True, resends=0)
        self.fenced: dict[str, str] = {}  # sale -> reason (this process's own flag)
        self.verifying: str | None = None
        self.registry: dict[str, SaleRecord] = {}
        self.last_verdict: Verdict | None = None
        self._sku_sale: dict[str, str] = {}
        self._verified_run_id: str | None = None
        self._bad_run_id: str | None = None
        self._unverified_run_id: str | None = None  # a server seen while PostgreSQL could not answer
        self.verify_timeout_s = max(5.0, 4 * timeout_s)
        self._refuse_until = 0.0
        self._check: tuple[str, asyncio.Task[bool]] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()

    # -- what the middleware asks
    @property
    def active(self) -> bool:
        return bool(self.fenced) or self.verifying is not None

    def refusal(self, sale: str | None) -> str | None:
        """Why orders for ``sale`` are refused now, or None."""
        if self.verifying is not None:
            return self.verifying
        if sale is None:
            return None
        return self.fenced.get(sale)

    def status(self) -> str:
        """What the fence stands at, for /readyz: "ok" (Redis verified, nothing fenced), or
        what it is doing instead. Never a reason to take the process out of the load
        balancer: a fence is per sale and the same in every process."""
        if self.verifying is not None:
            return f"verifying: {self.verifying}"
        if self.fenced:
            return f"fenced: {', '.join(sorted(self.fenced))}"
        if self._unverified_run_id is not None:
            return "unverified: PostgreSQL does not answer"
        return "ok"

    def sale_of_sku(self, sku: str) -> str | None:
        return self._sku_sale.get(sku)

    # -- life
    async def start(self) -> None:
        """Verify Redis, watch the service client's connections, start polling."""
        self.watch.watch(self._on_connect)
        try:
            run_id = as_text((await self.redis.info("server"))["run_id"])
            await self._verify_server(run_id, wait=True)
        except Exception as exc:  # noqa: BLE001 - Redis or PostgreSQL down at start: keep polling
            self._warn("start", f"could not verify Redis at start-up: {type(exc).__name__}: {exc}")
        self._loop_task = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        self.watch.watch(None)
        tasks = [t for t in (self._loop_task, self._check[1] if self._check else None) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.redis.aclose()

    # -- verification
    async def _on_connect(self, conn: Any) -> None:
        """Each new connection of the service's client, once set up: which server is it?"""
        run_id = await _server_run_id(conn)
        if run_id in (self._verified_run_id, self._unverified_run_id):
            return
        if run_id == self._bad_run_id:
            if time.monotonic() < self._refuse_until:
                raise RedisConnectionError(
                    "Redis lost data; sales are fenced until `flashsale recover` rebuilds it"
                )
            return
        if not await self._verify_server(run_id, wait=True) and time.monotonic() < self._refuse_until:
            raise RedisConnectionError(
                "Redis lost data; sales are fenced until `flashsale recover` rebuilds it"
            )

    async def _verify_server(self, run_id: str, *, wait: bool) -> bool:
        """Verify a server not seen before (single flight per run id). True if it is fine."""
        check = self._check
        done = check is not None and check[1].done()
        stale = (
            check is None
            or check[0] != run_id
            or run_id == self._unverified_run_id
            or (done and (check[1].cancelled() or check[1].exception() is not None))
        )
        if stale and not (check is not None and check[0] == run_id and not done):
            if run_id != self._unverified_run_id:  # a server already selling unverified is not paused
                self.verifying = (
                    f"Redis restarted (server {run_id[:8]}); checking its data against "
                    "PostgreSQL before selling on"
                )
            check = self._check = (run_id, asyncio.ensure_future(self._verify_now(new_server=run_id)))
        assert check is not None
        task = check[1]
        if not wait:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            raise RedisConnectionError("Redis is being verified against PostgreSQL; retry shortly") from None
        except RedisError:
            raise
        except Exception as exc:  # PostgreSQL down, say: the connection must not be used unverified
            raise RedisConnectionError(
                f"Redis could not be verified ({type(exc).__name__}: {exc}); retry shortly"
            ) from exc

    async def _verify_now(self, *, new_server: str | None = None) -> bool:
        try:
            verdict = await asyncio.wait_for(
                verify(self.redis, self.pool, prefix=self.prefix), self.verify_timeout_s
            )
        except RedisError:
            raise  # Redis itself is not answering: nothing is sold from it anyway
        except Exception as exc:  # noqa: BLE001 - PostgreSQL down, slow, or not migrated
            # Orders never wait on PostgreSQL: without it the guard cannot verify, so it
            # lets sales go on (a fence needs evidence) and tries again at every poll.
            self._warn(
                "unverified",
                f"cannot verify Redis against PostgreSQL ({type(exc).__name__}: {exc}); "
                "selling on unverified until PostgreSQL answers",
            )
            if new_server is not None:
                self._unverified_run_id = new_server
            self.verifying = None
            return True
        self._warned.discard("unverified")
        self._unverified_run_id = None
        self.last_verdict = verdict
        self.registry = verdict.registry
        self._sku_sale = {sku: rec.sale for rec in verdict.registry.values() for sku in rec.skus}
        lost = verdict.lost_sales()
        for sale, reason in lost.items():
            record = verdict.registry.get(sale) or fallback_record(
                sale, [e for e, p in verdict.parents.items() if p == sale]
            )
            self.fenced.setdefault(sale, reason)
            with contextlib.suppress(RedisError, OSError):
                await raise_fence(self.redis, self.pool, prefix=self.prefix, record=record, reason=reason)
        for sale in [s for s in self.fenced if s not in lost]:
            still = await self.redis.hget(ServiceKeys(self.prefix).sale(sale), "fenced")
            if not still:  # recovered: `flashsale recover` cleared it and the data verifies
                logger.warning("fence_lifted", extra={"sale": sale})
                del self.fenced[sale]
        if verdict.ok:
            self._verified_run_id = verdict.run_id
            self._bad_run_id = None
        elif verdict.run_id != self._bad_run_id:
            self._bad_run_id = verdict.run_id
            if new_server is not None:
                self._refuse_until = time.monotonic() + self.refuse_s
        self.verifying = None
        return verdict.ok

    async def _poll_forever(self) -> None:
        next_record = next_verify = 0.0
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                # The run id shows a restart or a failover; the lineage marker shows data gone
                # from the same server (FLUSHALL, a restore): both cost one round trip.
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.info("server")
                    pipe.get(ServiceKeys(self.prefix).lineage)
                    info, lineage = await pipe.execute()
                run_id = as_text(info["run_id"])
                now = time.monotonic()
                if run_id not in (self._verified_run_id, self._bad_run_id) or self.verifying:
                    # A new server, or one PostgreSQL could not be asked about yet.
                    await self._verify_server(run_id, wait=True)
                    next_verify = now + (self.poll_s if self.fenced else self.verify_s)
                elif (
                    self.fenced
                    or now >= next_verify
                    or (self._lineage is not None and lineage != self._lineage)
                ):
                    # While fenced: every poll, so the fence lifts as soon as recovery is done.
                    await self._verify_now()
                    next_verify = now + (self.poll_s if self.fenced else self.verify_s)
                if run_id == self._verified_run_id and not self.fenced and now >= next_record:
                    self.registry = await record_sales(
                        self.redis, self.pool, prefix=self.prefix, known=self.registry
                    )
                    self._sku_sale = {sku: rec.sale for rec in self.registry.values() for sku in rec.skus}
                    if self.registry:
                        self._lineage = await ensure_lineage(self.redis, self.pool, prefix=self.prefix)
                    next_record = now + self.record_s
                self._warned.discard("poll")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage: try again next time
                self._warn("poll", f"{type(exc).__name__}: {exc}")
            # redis-py can swallow a cancel that lands mid-command (the task stays
            # "cancelling"); polling on would make stop(), which awaits this task, hang.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning("fence_check_failed", extra={"error": message})


# -------------------------------------------------------------- the service hook
GUARD = web.AppKey("flashsale_fence_guard", FenceGuard)


async def _order_sale(request: web.Request, guard: FenceGuard) -> str | None:
    """The sale an order, pay or cancel request is for (None when it cannot be told)."""
    if request.path == "/api/orders":
        await read_body(request)  # a body that cannot be read (408, 413, 400) is refused here
        try:
            body = await read_json(request)  # parsed once: the handler gets this object
        except ApiError:  # not a JSON object: the handler refuses it
            return None
        lines = body.get("lines")
        skus = (
            [line.get("sku") for line in lines if isinstance(line, dict)]
            if isinstance(lines, list)
            else [body.get("sku")]
        )
        for sku in skus:
            if isinstance(sku, str) and (sale := guard.sale_of_sku(sku)) is not None:
                return sale
        return None
    order_id = request.match_info.get("order_id", "")
    engine = order_id.partition(".")[0]
    parsed = parent_sale_id(engine)
    return parsed[0] if parsed and parsed[0] in guard.registry else engine


def refusing(app: web.Application) -> FenceGuard | None:
    """The app's fence guard while it refuses anything (a sale fenced, or Redis being
    verified), else None. The app's one middleware asks this of every request, and only
    then awaits :func:`refuse_fenced`: no layer of the fence's own on the order path."""
    guard = app.get(GUARD)
    return guard if guard is not None and guard.active else None


async def refuse_fenced(request: web.Request, guard: FenceGuard) -> None:
    """Raise 503 ``sale_fenced`` for an order, payment or cancellation of a fenced sale."""
    if request.method != "POST":
        return
    path = request.path
    if path != "/api/orders" and not (path.startswith("/api/orders/") and path.endswith(_ORDER_PATHS)):
        return
    # The buyer first (401 before a byte of the body is read), then the body under the read
    # deadline, as the handler would (aiohttp keeps the body for the handler).
    buyer_of(request, request.app[STATE])
    sale = await _order_sale(request, guard)
    reason = guard.refusal(sale)
    if reason is not None:
        raise ApiError(
            503, "sale_fenced", f"sales are paused: {reason}", headers={"Retry-After": "5"}, sale=sale
        )


#: Why the fence is off in this process (absent: it is on, or it was never installed).
_OFF = web.AppKey("flashsale_fence_off", str)


def status(app: web.Application) -> str:
    """What the fence stands at in this process, for /readyz: the guard's
    :meth:`FenceGuard.status`, or "off: <why>" (bare "off" when it was never installed)."""
    guard = app.get(GUARD)
    if guard is not None:
        return guard.status()
    why = app.get(_OFF)
    return f"off: {why}" if why else "off"


def _disabled(app: web.Application, why: str) -> None:
    app[_OFF] = why
    logger.warning("fence_disabled", extra={"why": why})


async def _guard_context(app: web.Application, options: dict[str, float]) -> AsyncIterator[None]:
    state = app[STATE]
    if state.settings.redis_cluster:
        # verify() reads one server's INFO and one lineage key for the whole store: on a
        # Redis Cluster it would need doing per shard, which it does not do.
        _disabled(app, "a Redis Cluster (FLASHSALE_REDIS_CLUSTER=1): " + ON_A_CLUSTER)
        yield
        return
    if state.redis_watch is None:
        _disabled(app, "the service's Redis client was built without a connect watch")
        yield
        return
    if state.pg is None:
        _disabled(app, "no database (FLASHSALE_DATABASE_URL): a Redis data loss cannot be detected")
        yield
        return
    guard = FenceGuard(
        watch=state.redis_watch,
        pool=state.pg,
        redis_url=state.settings.redis_url,
        prefix=state.settings.key_prefix,
        timeout_s=state.settings.redis_timeout_s,
        **options,
    )
    try:
        async with state.pg.acquire() as conn:
            await require_tables(conn)
    except FenceUnavailable as exc:
        _disabled(app, str(exc))
        await guard.redis.aclose()
        yield
        return
    except Exception as exc:  # noqa: BLE001 - PostgreSQL down at start-up: orders do not wait on it
        logger.warning("fence_unverified", extra={"why": f"{type(exc).__name__}: {exc}"})
    try:  # a cluster node named as one server (FLASHSALE_REDIS_CLUSTER forgotten)
        await require_one_server(guard.redis, "FLASHSALE_REDIS_URL's server")
    except ClusterUnsupported as exc:
        _disabled(app, str(exc))
        await guard.redis.aclose()
        yield
        return
    except (RedisError, OSError):
        pass  # Redis down at start-up: the guard verifies it once it answers
    await guard.start()
    app[GUARD] = guard
    try:
        yield
    finally:
        await guard.stop()


_GUARD_OPTIONS = web.AppKey("flashsale_fence_options", dict)


async def _app_guard_context(app: web.Application) -> AsyncIterator[None]:
    async for _ in _guard_context(app, app[_GUARD_OPTIONS]):
        yield


def install(app: web.Application, **guard_options: float) -> None:
    """Put the fence into an app built by :func:`flashsale.service.app.create_app` (which does it
    already; call it again before the app starts to tune the guard's timers:
    ``poll_s``, ``record_s``, ``verify_s``). The app's own resources context comes first."""
    if installed(app):
        app[_GUARD_OPTIONS].update(guard_options)
        return
    app[_GUARD_OPTIONS] = dict(guard_options)
    app.cleanup_ctx.append(_app_guard_context)


def uninstall(app: web.Application) -> None:
    """Take the fence out again, before the app starts: only for showing what happens
    without it (the drills' counterfactual)."""
    if installed(app):
        app.cleanup_ctx.remove(_app_guard_context)


def installed(app: web.Application) -> bool:
    """True if :func:`install` ran on ``app`` (the drill checks the service has the fence)."""
    return _app_guard_context in app.cleanup_ctx
