"""Probes and machine-readable descriptions: /healthz, /readyz, /metrics, /openapi.json."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from flashsale.service.metrics import read_deployment
from flashsale.service.openapi import document
from flashsale.service.state import STATE

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.redis.ping(), timeout=1.0)
        checks["redis"] = "ok"
        # After a Redis restart the script cache is empty: load them, then we are ready.
        await state.probe_inventory().load_scripts()
        checks["scripts"] = "ok"
    except Exception as exc:
        checks.setdefault("redis", f"unreachable: {type(exc).__name__}")
        checks.setdefault("scripts", "unknown")
    if state.pg is not None:
        try:
            await asyncio.wait_for(state.pg.fetchval("SELECT 1"), timeout=1.0)
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(
        body=state.metrics.exposition(await read_deployment(state)),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Scraped-At": str(time.time())},
    )


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
