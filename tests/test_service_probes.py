"""Probes: /healthz (the process is up), /readyz (this process can decide sales: Redis answers
as a primary within a second and the scripts are loaded — 503 otherwise; PostgreSQL and the
fence are reported, never a reason to leave the load balancer, as orders never wait on them)
and /metrics (Prometheus text with the names dashboards and
alerts use: every route by its template, process metrics, the writer's progress, the last
audit, and per-sale series that leave once the sale has ended)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis_mode import on_cluster
from service_support import (
    ADMIN,
    Service,
    ServiceFactory,
    buyer,
    expect_json,
    new_id,
    now_ms,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.runtime.cluster import RedisClusterServer
from flashsale.runtime.embedded import RedisServer
from flashsale.service.openapi import document
from flashsale.service.probes import READY_TIMEOUT_S
from flashsale.streams import dead_letter_key
from inventory._scripts import SCRIPT_NAMES, script_source

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(service: Service) -> Samples:
    """/metrics as {(sample name, sorted labels): value}."""
    resp = await service.client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


def sales_in(samples: Samples) -> set[str]:
    """Sales with any per-sale series."""
    return {dict(labels)["sale"] for _, labels in samples if "sale" in dict(labels)}


async def scrape_until(service: Service, done: Any, what: str, timeout: float = 30.0) -> Samples:
    """Scrape until ``done(samples)`` (the writer and the sale cache act on their own clocks)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(service)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout} s"
        await asyncio.sleep(0.05)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_healthz(service: Service) -> None:
    assert await expect_json(await service.client.get("/healthz"), 200) == {"status": "ok"}


def _readiness_schema() -> dict[str, Any]:
    schema: dict[str, Any] = document()["components"]["schemas"]["Readiness"]
    return schema


def _ready_body(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` after checking it against the Readiness schema /openapi.json publishes."""
    jsonschema.validate(body, _readiness_schema())
    return body


@contextlib.contextmanager
def _silent_redis() -> Iterator[int]:
    """A loopback port that takes connections and never answers: a hung Redis (the kernel
    completes the handshake; nobody reads)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


async def test_healthz(service: Service) -> None:
    assert await expect_json(await service.client.get("/healthz"), 200) == {"status": "ok"}


async def test_readyz_loads_the_scripts_redis_lost(service: Service, redis_client: Redis) -> None:
    await redis_client.script_flush()  # what a Redis restart or failover leaves
    ready = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
    assert ready["ready"] is True and ready["checks"] == {"redis": "ok", "scripts": "ok"}, ready
    assert ready["reported"].keys() == {"fence"} and ready["reported"]["fence"].startswith("off: "), ready
    shas = [hashlib.sha1(script_source(name).encode()).hexdigest() for name in SCRIPT_NAMES]
    assert await redis_client.script_exists(*shas) == [True] * len(SCRIPT_NAMES)


async def test_readyz_is_503_when_redis_is_down(start_service: ServiceFactory) -> None:
    service = await start_service(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", redis_timeout_s=0.5)
    body = _ready_body(await expect_json(await service.client.get("/readyz"), 503))
    assert body["ready"] is False
    assert body["checks"]["redis"].startswith("unreachable")
    # Liveness is not readiness: the process itself is fine.
    await expect_json(await service.client.get("/healthz"), 200)
    # The process's own metrics still answer; the ones read from Redis are left out.
    resp = await service.client.get("/metrics")
    assert resp.status == 200 and "flashsale_orders_total" in await resp.text()


async def test_readyz_answers_503_within_its_bound_when_redis_hangs(start_service: ServiceFactory) -> None:
    """A Redis that takes the connection and never answers: the service's own Redis timeout
    (30 s here) must not become the probe's — /readyz says 503 within READY_TIMEOUT_S."""
    with _silent_redis() as port:
        service = await start_service(
            redis_url=f"redis://127.0.0.1:{port}/0", redis_cluster=False, redis_timeout_s=30.0
        )
        started = time.monotonic()
        body = _ready_body(await expect_json(await service.client.get("/readyz"), 503))
        took = time.monotonic() - started
    assert body["checks"]["redis"].startswith("unreachable") and "no answer" in body["checks"]["redis"]
    # The bound, and room for a busy machine — far below the client's own 30 s (twice: one re-send).
    assert took < READY_TIMEOUT_S + 8, f"/readyz took {took:.1f} s against a hung Redis"


async def test_readyz_is_503_on_a_replica(start_service: ServiceFactory) -> None:
    """A replica (a failover that left the URL on the old primary, a mis-pointed Service)
    answers PING but refuses every write: the pod cannot decide sales."""
    with RedisServer(extra_args=("--replicaof", "127.0.0.1", str(_closed_port()))) as replica:
        service = await start_service(redis_url=replica.url, redis_cluster=False)
        body = _ready_body(await expect_json(await service.client.get("/readyz"), 503))
    assert body["checks"]["redis"] == "not a primary: its role is slave", body


async def test_readyz_is_503_on_a_cluster_node_addressed_as_one_server(
    start_service: ServiceFactory, redis_cluster_server: RedisClusterServer
) -> None:
    """FLASHSALE_REDIS_CLUSTER forgotten, and the node did not answer when the service started
    (so ``flashsale serve`` could not refuse): the node answers PING and ROLE ("master"), but
    most keys answer MOVED — the pod cannot decide sales, and the body says what to set."""
    service = await start_service(redis_url=redis_cluster_server.url, redis_cluster=False)
    body = _ready_body(await expect_json(await service.client.get("/readyz"), 503))
    assert body["ready"] is False, body
    said = body["checks"]["redis"]
    assert said.startswith("a Redis Cluster node") and "FLASHSALE_REDIS_CLUSTER=1" in said, body


async def test_readyz_does_without_role_where_it_is_disabled(start_service: ServiceFactory) -> None:
    """Some managed Redis services and proxies rename or refuse ROLE (and INFO): their
    refusal is an answer, rather than no pod ever being ready."""
    with RedisServer(extra_args=("--rename-command", "ROLE", "")) as server:
        service = await start_service(redis_url=server.url, redis_cluster=False)
        body = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
        assert body["checks"] == {"redis": "ok", "scripts": "ok"}
        admin = Redis.from_url(server.url)
        try:  # INFO refused too (NOPERM): no cluster node would refuse it
            await admin.execute_command("ACL", "SETUSER", "default", "-info")
        finally:
            await admin.aclose()
        body = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
    assert body["checks"] == {"redis": "ok", "scripts": "ok"}


async def test_readyz_reports_postgresql_and_the_fence(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any
) -> None:
    """With the tables migrated the fence watches this process's Redis: "ok" when verified."""
    service = await start_service(database_url=pipeline_db_url)
    body = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
    assert body["checks"] == {"redis": "ok", "scripts": "ok"}
    # (On a Redis Cluster the fence is off, and says why: it checks one server only.)
    assert body["reported"]["postgres"] == "ok", body
    if on_cluster():
        assert body["reported"]["fence"].startswith("off: a Redis Cluster"), body
    else:
        assert body["reported"]["fence"] == "ok", body
    samples = await scrape(service)
    assert samples[("flashsale_postgres_up", ())] == 1


async def test_readyz_stays_200_when_postgresql_is_down_and_orders_go_on(
    start_service: ServiceFactory,
) -> None:
    """Issue 12, item 8: orders never wait on PostgreSQL, so its outage must not take every
    pod out of the Service. It is reported (body, flashsale_postgres_up, the alert)."""
    # The service starts although the database does not answer.
    service = await start_service(database_url=f"postgresql://flashsale@127.0.0.1:{_closed_port()}/flashsale")
    body = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
    assert body["ready"] is True and body["checks"] == {"redis": "ok", "scripts": "ok"}
    assert body["reported"]["postgres"].startswith("unreachable"), body
    if on_cluster():
        assert body["reported"]["fence"].startswith("off: a Redis Cluster"), body
    else:
        assert body["reported"]["fence"] == "unverified: PostgreSQL does not answer", body
    samples = await scrape(service)
    assert samples[("flashsale_postgres_up", ())] == 0
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    await expect_json(await service.order("alice", sku), 201)


async def test_no_database_no_postgres_series(service: Service) -> None:
    assert not any(name == "flashsale_postgres_up" for name, _ in await scrape(service))


async def test_metrics_name_what_dashboards_use(service: Service) -> None:
    sku = new_id("sku")
    sale = (await service.create_sale([{"sku": sku, "stock": 5, "reserve": 1}]))["sale"]
    await expect_json(await service.order("alice", sku, 2), 201)
    await expect_json(await service.order("bob", sku, 9), 409, "sold_out")
    samples = await scrape(service)
    names = {name for name, _ in samples}
    for name in (
        "flashsale_orders_total",
        "flashsale_request_seconds_bucket",
        "flashsale_request_seconds_count",
        "flashsale_responses_total",
        "flashsale_stock_units",
        "flashsale_holds_pending",
        "flashsale_stream_backlog",
        "flashsale_dead_letters_waiting",
        "flashsale_sale_fenced",
        "flashsale_writer_rows_total",
        "flashsale_dead_letters_total",
        "flashsale_writer_last_commit_timestamp_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert name in names, name
    assert samples[("flashsale_orders_total", (("outcome", "created"),))] == 1
    assert samples[("flashsale_orders_total", (("outcome", "sold_out"),))] == 1
    orders = (("method", "POST"), ("route", "/api/orders"))
    assert samples[("flashsale_request_seconds_count", orders)] == 2
    assert samples[("flashsale_responses_total", (("code", "201"), *orders))] == 1
    assert samples[("flashsale_responses_total", (("code", "409"), *orders))] == 1
    stock = {
        state: samples[("flashsale_stock_units", (("sale", sale), ("sku", sku), ("state", state)))]
        for state in ("available", "held", "sold", "reserve")
    }
    assert stock == {"available": 2, "held": 2, "sold": 0, "reserve": 1}
    assert samples[("flashsale_holds_pending", (("sale", sale),))] == 1
    assert samples[("flashsale_stream_backlog", (("sale", sale),))] >= 2
    assert samples[("flashsale_dead_letters_waiting", (("sale", sale),))] == 0
    assert samples[("flashsale_sale_fenced", (("sale", sale),))] == 0
    # No writer ran: "never" is 0, which the writer-stalled alert reads as long ago.
    assert samples[("flashsale_writer_last_commit_timestamp_seconds", ())] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0


async def test_every_route_is_counted_by_its_template(service: Service) -> None:
    """Latency and answers by status code for every route, labelled by the route's template:
    ids in paths, unknown paths and made-up methods never become label values."""
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    order_id = (await expect_json(await service.order("alice", sku), 201))["order_id"]
    for oid in (order_id, "o-no-such-order-1", "o-no-such-order-2"):
        await service.client.get(f"/api/orders/{oid}", headers=buyer("alice"))
    for n in range(3):
        await expect_json(await service.client.get(f"/no/such/path/{n}"), 404, "not_found")
    await expect_json(await service.client.delete("/api/orders"), 405, "method_not_allowed")
    resp = await service.client.request("PROPFIND", "/healthz")  # a WebDAV method
    assert resp.status == 405

    samples = await scrape(service)
    answers = {
        (labels["method"], labels["route"], labels["code"]): value
        for (name, pairs), value in samples.items()
        if name == "flashsale_responses_total"
        for labels in [dict(pairs)]
    }
    lookup = ("GET", "/api/orders/{order_id}")
    assert answers[(*lookup, "200")] == 1 and answers[(*lookup, "404")] == 2
    assert answers[("GET", "unmatched", "404")] == 3
    assert answers[("DELETE", "unmatched", "405")] == 1
    assert answers[("other", "unmatched", "405")] == 1
    assert answers[("POST", "/api/orders", "201")] == 1
    assert samples[("flashsale_request_seconds_count", (("method", "GET"), ("route", lookup[1])))] == 3
    templates = {resource.canonical for resource in service.app.router.resources()} | {"unmatched"}
    routes = {dict(pairs)["route"] for (_, pairs) in samples if "route" in dict(pairs)}
    assert routes <= templates, routes - templates
    assert not any(order_id in label or "no-such" in label for label in routes)


async def test_series_of_ended_sales_leave_metrics(
    service: Service, redis_client: Redis, writer_running: Any, drained: Any
) -> None:
    """A sale's series stay while it lives — and afterwards for ``ended_sale_s`` since its
    last decision — then leave; never while orders wait for PostgreSQL, a dead letter waits
    or a fence stands. A deleted sale leaves at once; a scheduled one stays."""
    skus = {name: new_id("sku") for name in ("quiet", "closed", "deleted", "fenced", "dead")}
    sales = {name: (await service.create_sale({sku: 10}))["sale"] for name, sku in skus.items()}
    scheduled = (await service.create_sale({new_id("sku"): 10}, opens_at=now_ms() + 3_600_000))["sale"]
    for name, sku in skus.items():
        await expect_json(await service.order(f"buyer-{name}", sku), 201)
    await expect_json(
        await service.client.post(f"/api/admin/sales/{sales['closed']}/close", headers=ADMIN), 200
    )
    async with writer_running():
        await drained(redis_client, list(sales.values()) + [scheduled])
    waiting = (await service.create_sale({new_id("sku"): 10}))["sale"]  # its stock event waits
    everything = {*sales.values(), scheduled, waiting}
    assert sales_in(await scrape(service)) == everything  # ended_sale_s (15 min) not over yet

    # From now on a sale ends as soon as nothing more happens to it.
    service.state.metrics.ended_sale_s = 0.0
    await redis_client.delete(f"fs:sale:{sales['deleted']}")
    await redis_client.hset(f"fs:sale:{sales['fenced']}", "fenced", "drill: Redis lost data")
    await redis_client.xadd(dead_letter_key("fs", sales["dead"]), {"type": "order", "dead_error": "drill"})
    stay = {sales["fenced"], sales["dead"], scheduled, waiting}  # `waiting` was never drained
    samples = await scrape_until(service, lambda s: sales_in(s) == stay, f"only {sorted(stay)} left")
    assert samples[("flashsale_sale_fenced", (("sale", sales["fenced"]),))] == 1
    assert samples[("flashsale_dead_letters_waiting", (("sale", sales["dead"]),))] == 1
    assert samples[("flashsale_stream_backlog", (("sale", waiting),))] > 0

    # A new decision brings an ended sale back.
    await expect_json(await service.order("another-buyer", skus["quiet"]), 201)
    assert sales["quiet"] in sales_in(await scrape(service))


async def test_writer_progress_and_the_last_audit_reach_metrics(
    start_service: ServiceFactory,
    pipeline_db_url: str,
    redis_client: Redis,
    writer_running: Any,
    drained: Any,
) -> None:
    """The writer publishes through Redis (it serves no /metrics); every audit leaves its
    violation counts, which stay until the next audit."""
    service = await start_service(database_url=pipeline_db_url)
    sku = new_id("sku")
    sale = (await service.create_sale({sku: 10}))["sale"]
    await expect_json(await service.order("alice", sku), 201)
    started = time.time()
    async with writer_running():
        samples = await scrape_until(
            service,
            lambda s: s.get(("flashsale_writer_last_commit_timestamp_seconds", ()), 0) > 0,
            "the writer's last commit",
        )
        await drained(redis_client, [sale])
    assert started - 5 < samples[("flashsale_writer_last_commit_timestamp_seconds", ())] <= time.time()
    assert samples[("flashsale_writer_rows_total", ())] > 0
    assert not any(name == "flashsale_audit_violations" for name, _ in samples)  # no audit ran yet

    report = await expect_json(await service.client.post("/api/admin/audit", json={}, headers=ADMIN), 200)
    assert report["ok"], report
    samples = await scrape(service)
    kinds = {
        dict(pairs)["kind"]: v for (name, pairs), v in samples.items() if name == "flashsale_audit_violations"
    }
    assert set(kinds) == set(report["violations_by_kind"]) and not any(kinds.values())
    assert samples[("flashsale_audit_last_run_timestamp_seconds", ())] >= started - 1

    await redis_client.xadd(dead_letter_key("fs", sale), {"type": "order", "dead_error": "drill"})
    report = await expect_json(await service.client.post("/api/admin/audit", json={}, headers=ADMIN), 200)
    assert report["violations_by_kind"]["dead_letter"] == 1
    samples = await scrape(service)
    assert samples[("flashsale_audit_violations", (("kind", "dead_letter"),))] == 1


def test_the_documented_readiness_body_fits_the_schema() -> None:
    """docs/http-api.md's example /readyz body is one the schema (and so the service) allows."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text(encoding="utf-8")
    probes = doc.split("## Probes", 1)[1]
    (example,) = re.findall(r"```json\n(.*?)```", probes, re.S)
    _ready_body(json.loads(example))


async def test_a_full_pool_is_not_postgresql_down(
    start_service: ServiceFactory, pipeline_db_url: str, pipeline_pool: Any
) -> None:
    """During a surge every connection of the service's small pool can be busy (buyers'
    order look-ups read PostgreSQL). The probes then ask PostgreSQL on a connection of their
    own, closed after, so a busy pool never reads as ``flashsale_postgres_up 0``."""
    service = await start_service(database_url=pipeline_db_url)
    pool = service.state.pg
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        assert pool.get_idle_size() == 0 and pool.get_size() == pool.get_max_size()
        body = _ready_body(await expect_json(await service.client.get("/readyz"), 200))
        assert body["reported"]["postgres"] == "ok", body
        samples = await scrape(service)
        assert samples[("flashsale_postgres_up", ())] == 1

        # The probes' own connections (named so in pg_stat_activity) do not pile up: each
        # is closed after its check (its backend leaves pg_stat_activity shortly after).
        async def probes_connected() -> int:
            n: int = await pipeline_pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flashsale-probe'"
            )
            return n

        deadline = time.monotonic() + 30
        while await probes_connected():
            assert time.monotonic() < deadline, "the probes' connections stayed open"
            await asyncio.sleep(0.05)
    finally:
        for conn in held:
            await pool.release(conn)
