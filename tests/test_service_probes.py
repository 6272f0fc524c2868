"""Probes: /healthz (the process is up), /readyz (Redis and PostgreSQL reachable, scripts
loaded — 503 otherwise) and /metrics (Prometheus text with the names dashboards and
alerts use)."""

from __future__ import annotations

import hashlib
import socket

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from service_support import (
    Service,
    ServiceFactory,
    expect_json,
    new_id,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from inventory._scripts import SCRIPT_NAMES, script_source


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_healthz(service: Service) -> None:
    assert await expect_json(await service.client.get("/healthz"), 200) == {"status": "ok"}


async def test_readyz_loads_the_scripts_redis_lost(service: Service, redis_client: Redis) -> None:
    await redis_client.script_flush()  # what a Redis restart or failover leaves
    ready = await expect_json(await service.client.get("/readyz"), 200)
    assert ready == {"ready": True, "checks": {"redis": "ok", "scripts": "ok"}}
    shas = [hashlib.sha1(script_source(name).encode()).hexdigest() for name in SCRIPT_NAMES]
    assert await redis_client.script_exists(*shas) == [True] * len(SCRIPT_NAMES)


async def test_readyz_is_503_when_redis_is_down(start_service: ServiceFactory) -> None:
    service = await start_service(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", redis_timeout_s=0.5)
    body = await expect_json(await service.client.get("/readyz"), 503)
    assert body["ready"] is False
    assert body["checks"]["redis"].startswith("unreachable")
    # Liveness is not readiness: the process itself is fine.
    await expect_json(await service.client.get("/healthz"), 200)
    # The process's own metrics still answer; the ones read from Redis are left out.
    resp = await service.client.get("/metrics")
    assert resp.status == 200 and "flashsale_orders_total" in await resp.text()


async def test_readyz_checks_postgresql(start_service: ServiceFactory, database_url: str) -> None:
    service = await start_service(database_url=database_url)
    assert (await expect_json(await service.client.get("/readyz"), 200))["checks"] == {
        "redis": "ok",
        "scripts": "ok",
        "postgres": "ok",
    }


async def test_readyz_is_503_when_postgresql_is_down_but_orders_go_on(start_service: ServiceFactory) -> None:
    # The service starts although the database does not answer: orders never wait on it.
    service = await start_service(database_url=f"postgresql://flashsale@127.0.0.1:{_closed_port()}/flashsale")
    body = await expect_json(await service.client.get("/readyz"), 503)
    assert body["checks"]["redis"] == "ok" and body["checks"]["postgres"].startswith("unreachable")
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    await expect_json(await service.order("alice", sku), 201)


async def test_metrics_name_what_dashboards_use(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 5, "reserve": 1}]))["sale"]
    await expect_json(await service.order("alice", sku, 2), 201)
    await expect_json(await service.order("bob", sku, 9), 409, "sold_out")
    resp = await service.client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }
    names = {name for name, _ in samples}
    for name in (
        "flashsale_orders_total",
        "flashsale_request_seconds_bucket",
        "flashsale_request_seconds_count",
        "flashsale_stock_units",
        "flashsale_holds_pending",
        "flashsale_stream_backlog",
        "flashsale_writer_rows_total",
        "flashsale_dead_letters_total",
    ):
        assert name in names, name
    assert samples[("flashsale_orders_total", (("outcome", "created"),))] == 1
    assert samples[("flashsale_orders_total", (("outcome", "sold_out"),))] == 1
    assert samples[("flashsale_request_seconds_count", (("route", "orders"),))] == 2
    stock = {
        state: samples[("flashsale_stock_units", (("sale", sale), ("sku", sku), ("state", state)))]
        for state in ("available", "held", "sold", "reserve")
    }
    assert stock == {"available": 2, "held": 2, "sold": 0, "reserve": 1}
    assert samples[("flashsale_holds_pending", (("sale", sale),))] == 1
    assert samples[("flashsale_stream_backlog", (("sale", sale),))] >= 2
