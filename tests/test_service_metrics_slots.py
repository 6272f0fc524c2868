"""The service's own families (``flashsale_orders``, ``flashsale_request_seconds``,
``flashsale_responses``) counted in plain numbers per label set instead of
prometheus-client's children (flashsale/service/metrics.py): /metrics reads byte for byte
what prometheus-client's ``observe()``/``inc()`` would show for the same answers — one
process alone at every scrape; in multi-process mode in the files each process writes,
with the figures of a process that did not answer the scrape at most a flush late."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families
from service_support import Service, buyer, expect_json
from service_support import service as service  # noqa: F401  (fixture)
from service_support import start_service as start_service  # noqa: F401  (fixture)
from test_service_serve import _children, _wait_until_serving
from test_service_serve import serve_two as serve_two  # noqa: F401  (fixture)

from flashsale.service.metrics import FLUSH_INTERVAL_S, PrometheusMetrics, ServiceMetrics

OURS = ("flashsale_orders", "flashsale_request_seconds", "flashsale_responses")
BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0)
TEMPLATES = ("/api/orders", "/api/orders/{order_id}", "/api/sales/{sale}")

Step = list[Any]


def _steps() -> list[Step]:
    """Answers on every bucket edge — exactly on each bound, the next float above it, just
    below it — plus 0, past the last bound (+Inf), a route no request matched, another
    method, several codes; and outcomes in a mixed order, with scrapes in between."""
    steps: list[Step] = [["count", "sold_out"], ["answer", "POST", TEMPLATES[0], 409, 0.0]]
    for i, bound in enumerate(BOUNDS):
        template = TEMPLATES[i % len(TEMPLATES)]
        steps += [
            ["answer", "POST", TEMPLATES[0], 201, bound],
            ["answer", "GET", template, 200, math.nextafter(bound, math.inf)],
            ["answer", "GET", template, 404, math.nextafter(bound, 0.0)],
            ["count", "created"],
        ]
        if i % 5 == 4:
            steps.append(["scrape"])
    steps += [
        ["answer", "POST", TEMPLATES[0], 201, 5.000001],
        ["answer", "other", None, 405, 3600.0],
        ["answer", "GET", None, 404, 0.0003],
        ["count", "invalid"],
        ["count", "sold_out"],
        ["scrape"],
        ["answer", "DELETE", TEMPLATES[1], 200, 0.1 + 0.2],  # (a sum that float rounds)
        ["count", "shed"],
    ]
    return steps


def _families(text: str) -> dict[str, str]:
    """The service's own families in an exposition: name -> its block of lines, in order."""
    blocks: dict[str, str] = {}
    name = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("# HELP "):
            name = line.split()[2].removesuffix("_total")
        if name in OURS:
            blocks[name] = blocks.get(name, "") + line
    return blocks


def _ours(text: str) -> str:
    """The blocks of the service's own families, as they appear in an exposition."""
    return "".join(_families(text).values())


class _Routes:
    """Real aiohttp routes for the steps' answers: one per method and template on an app's
    router — and a twin, the same template on another app's router (two routes, one label
    set) — or, for no template, the route aiohttp makes for a request none matched (a new
    one each time, as aiohttp does)."""

    def __init__(self) -> None:
        self.routers = (web.Application().router, web.Application().router)
        self.made: dict[tuple[str, str, int], web.AbstractRoute] = {}

    def __call__(self, method: str, template: str | None, twin: bool) -> web.AbstractRoute:
        if template is None:
            return SystemRoute(web.HTTPNotFound())
        key = (method, template, int(twin))
        if key not in self.made:
            self.made[key] = self.routers[int(twin)].add_route(method, template, _never_called)
        return self.made[key]


async def _never_called(request: web.Request) -> web.StreamResponse:
    raise AssertionError("no request is served here")


def _feed(
    steps: list[Step], metrics: ServiceMetrics | None, direct: PrometheusMetrics | None
) -> Iterator[None]:
    """Feeds the steps to ``metrics`` (the service's way) and/or ``direct``
    (prometheus-client's children, fed as the service once fed them); yields at each scrape."""
    routes = _Routes()
    for n, (kind, *args) in enumerate(steps):
        if kind == "count":
            if metrics is not None:
                metrics.count(args[0])
            if direct is not None:
                direct.orders.labels(args[0]).inc()
        elif kind == "answer":
            method, template, status, seconds = args
            if metrics is not None:
                metrics.answered(method, routes(method, template, twin=n % 2 == 1), status, seconds)
            if direct is not None:
                label = template or "unmatched"
                direct.latency.labels(method, label).observe(seconds)
                direct.responses.labels(method, label, str(status)).inc()
        else:
            yield


def test_slots_read_as_prometheus_client_children_would() -> None:
    """One process alone: at every scrape, the same text as the old direct path."""
    metrics = ServiceMetrics()
    assert not metrics.multiprocess
    registry = CollectorRegistry()
    direct = PrometheusMetrics(registry)
    scrapes = 0
    for _ in _feed(_steps(), metrics, direct):
        scrapes += 1
        assert _ours(metrics.exposition([]).decode()) == generate_latest(registry).decode()
    text = _ours(metrics.exposition([]).decode())
    assert text == generate_latest(registry).decode()
    assert scrapes == sum(step == ["scrape"] for step in _steps()) > 1
    assert 'le="+Inf",method="other",route="unmatched"} 1.0' in text
    assert 'flashsale_request_seconds_bucket{le="5.0",method="POST",route="/api/orders"} 15.0' in text
    (latency,) = [f for f in text_string_to_metric_families(text) if f.name == "flashsale_request_seconds"]
    edges = [s.labels["le"] for s in latency.samples if s.name.endswith("_bucket")][: len(BOUNDS) + 1]
    assert edges == [repr(bound) for bound in BOUNDS] + ["+Inf"], "the steps miss the service's bounds"
    assert metrics.counts["created"] == len(BOUNDS) and metrics.counts["sold_out"] == 2


def _files() -> str:
    """What this process's PROMETHEUS_MULTIPROC_DIR holds, as text."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry).decode()


def _one_way_in_multi_process_mode(way: str) -> None:
    """Run in a process of its own, in multi-process mode (prometheus-client picks its value
    class on import): the steps from stdin, one way ("slots": the service's, "direct":
    prometheus-client's children); prints, at each scrape and at the end, the text the
    process's files hold (at a scrape, for "slots", this process's /metrics text)."""
    metrics = ServiceMetrics()
    assert metrics.multiprocess
    steps = json.load(sys.stdin)
    seen = []
    if way == "slots":
        for _ in _feed(steps, metrics, None):
            seen.append(metrics.exposition([]).decode())
        before = _files()

        async def stop() -> None:  # the app stops: its flusher, cancelled, writes the last answers
            flusher = asyncio.ensure_future(metrics.flush_forever(interval_s=3600))
            await asyncio.sleep(0)
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

        asyncio.run(stop())
        assert before != _files(), "the last answers were written before the app stopped"
    else:
        for _ in _feed(steps, None, PrometheusMetrics(None)):
            seen.append(_files())
    seen.append(_files())
    print(json.dumps(seen))


def _run_process(way: str, steps: list[Step], directory: Path) -> list[dict[str, str]]:
    directory.mkdir()
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {tests!r}); import {Path(__file__).stem} as t; "
            "t._one_way_in_multi_process_mode(sys.argv[1])",
            way,
        ],
        input=json.dumps(steps),
        env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    texts: list[str] = json.loads(done.stdout)
    # (Families in the order prometheus-client globs the files: the directory's, not ours.)
    return [_families(text) for text in texts]


def test_multi_process_files_hold_what_prometheus_client_children_would(tmp_path: Path) -> None:
    """Multi-process mode: what a process writes to its files (before each scrape it answers,
    and when it stops) is what prometheus-client's children would have written. This pins
    the histogram children's private ``_buckets``/``_sum`` the flush writes through: an
    upgrade of prometheus-client that changes them fails here."""
    steps = _steps()
    slots = _run_process("slots", steps, tmp_path / "slots")
    direct = _run_process("direct", steps, tmp_path / "direct")
    assert len(slots) == sum(step == ["scrape"] for step in steps) + 1 and all(
        len(families) == 3 for families in slots
    )
    assert slots == direct


def _invalid_order_figures(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[float]:
    route = (("method", "POST"), ("route", "/api/orders"))
    return [
        samples.get(("flashsale_orders_total", (("outcome", "invalid"),)), 0.0),
        samples.get(("flashsale_responses_total", (("code", "422"), *route)), 0.0),
        samples.get(("flashsale_request_seconds_count", route), 0.0),
    ]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_one_process_metrics_are_exact_right_after_each_answer(service: Service) -> None:
    for n in range(1, 6):
        body = {"request_id": f"r-{n}", "sku": "x", "qty": 0}
        resp = await service.client.post("/api/orders", json=body, headers=buyer(f"u{n}"))
        await expect_json(resp, 422, "invalid_quantity")
        resp = await service.client.get("/metrics")
        samples = _samples(await resp.text())
        assert _invalid_order_figures(samples) == [n, n, n]
        # A scrape's own answer is counted once it is answered: the next one shows it.
        scrapes = (("code", "200"), ("method", "GET"), ("route", "/metrics"))
        assert samples.get(("flashsale_responses_total", scrapes), 0.0) == n - 1


async def test_multi_process_figures_reach_the_files_within_the_flush_interval(
    serve_two: tuple[subprocess.Popen[bytes], int, str],  # noqa: F811
) -> None:
    """``flashsale serve --workers 2``: with no scrape to make it write (and no process
    stopping), each process's answers reach its files, where the other process reads them,
    by its periodic flush: within FLUSH_INTERVAL_S (the bound below leaves room for a busy
    machine). /metrics then shows all of them, whichever process answers."""
    proc, port, _ = serve_two
    await _wait_until_serving(proc, port)
    (directory,) = {
        line.split(b"=", 1)[1].decode()
        for pid in _children(proc.pid)
        for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if line.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    }
    base = f"http://127.0.0.1:{port}"
    requests = 20
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(requests):
            body = {"request_id": f"r-{i}", "sku": "x", "qty": 0}
            async with http.post(f"{base}/api/orders", json=body, headers=buyer(f"u{i}")) as resp:
                assert resp.status == 422
        answered = time.monotonic()
        deadline = answered + 10 * FLUSH_INTERVAL_S
        while True:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            figures = _invalid_order_figures(_samples(generate_latest(registry).decode()))
            if figures == [requests] * 3:
                break
            assert time.monotonic() < deadline, f"after {time.monotonic() - answered:.2f} s: {figures}"
            await asyncio.sleep(0.02)
        async with http.get(f"{base}/metrics") as resp:
            assert _invalid_order_figures(_samples(await resp.text())) == [requests] * 3
