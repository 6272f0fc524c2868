"""Probes and machine-readable descriptions: /healthz, /readyz, /metrics, /openapi.json."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from flashsale.keys import ServiceKeys
from flashsale.service.metrics import stream_backlog
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
    rows: list[tuple[str, str, list[str], float]] = []
    try:
        for sale in await state.sales.all_sales():
            settings = await state.sales.sale(sale)
            if settings is None:  # a bucket's sale id: counted under its sale
                continue
            for sku, snap in (await state.engine(settings).snapshots()).items():
                for name in ("available", "held", "sold", "reserve"):
                    rows.append(
                        (
                            "flashsale_stock_units",
                            "units per SKU by state",
                            [sale, sku, name],
                            getattr(snap, name),
                        )
                    )
            parts = state.engine_parts(settings)
            pending = sum([await state.redis.zcard(p.keys.deadlines) for p in parts])
            backlog = sum([await stream_backlog(state.redis, p.keys.events) for p in parts])
            rows.append(("flashsale_holds_pending", "holds waiting for payment", [sale], pending))
            rows.append(("flashsale_stream_backlog", "events not yet written to PostgreSQL", [sale], backlog))
        writer = await state.redis.hgetall(ServiceKeys(state.settings.key_prefix).writer_stats)
        rows.append(
            (
                "flashsale_writer_rows_total",
                "orders rows written by the order writer",
                [],
                float(writer.get(b"rows_total", 0)),
            )
        )
        rows.append(
            (
                "flashsale_dead_letters_total",
                "events set aside in dead-letter streams",
                [],
                float(writer.get(b"dead_letters_total", 0)),
            )
        )
    except Exception:  # a scrape must still answer with the process's own metrics
        pass
    state.metrics.gauges.rows = rows
    return web.Response(
        body=state.metrics.exposition(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Scraped-At": str(time.time())},
    )


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
