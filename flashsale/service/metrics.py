"""What the service counts, and how it is read: Prometheus exposition at ``/metrics``
and the live numbers behind ``/api/admin/stats`` (progress lines, the war room).

Request counters and latency histograms live in each process (prometheus-client; in
multi-process mode they are merged through ``PROMETHEUS_MULTIPROC_DIR``). Numbers that
belong to the whole deployment — stock per SKU, holds pending, stream backlog, the
order writer's progress — are read from Redis at scrape time, so every process reports
the same truth.

Each process also publishes its outcome counters and recent latency percentiles to
Redis once a second (``<prefix>:stats:proc:<pid>``, expiring, named in the set
``<prefix>:stats:procs``), so ``/api/admin/stats`` can add up all processes whichever one
answers (:func:`read_published`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio.cluster import RedisCluster

from flashsale.keys import ServiceKeys

__all__ = ["OUTCOMES", "ServiceMetrics", "read_published", "stream_backlog"]

#: Outcomes of POST /api/orders, as counted everywhere (metrics, stats, the war room).
OUTCOMES = (
    "created",
    "replayed",
    "sold_out",
    "limit_exceeded",
    "rate_limited",
    "not_open",
    "invalid",
    "shed",
    "unknown",
    "fenced",
)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)


class _SaleGauges(Collector):
    """Deployment-wide gauges, filled just before each scrape."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, list[str], float]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, doc, labels, value in self.rows:
            label_names = _LABELS[name]
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, doc, labels=label_names)
            family.add_metric(labels, value)
        yield from families.values()


_LABELS = {
    "flashsale_stock_units": ["sale", "sku", "state"],
    "flashsale_holds_pending": ["sale"],
    "flashsale_stream_backlog": ["sale"],
    "flashsale_writer_rows_total": [],
    "flashsale_dead_letters_total": [],
}


async def stream_backlog(redis: Any, stream: str) -> int:
    """Entries the order writer has not committed yet (see ``flashsale.pipeline.writer.stream_backlog``:
    exact on Redis >= 7, and on 6.2 exact up to 10,000 undelivered entries)."""
    from flashsale.streams import stream_backlog as backlog_of  # the writer owns what "committed" means

    return (await backlog_of(redis, stream, count_up_to=10_000)).total


async def read_published(redis: Any, prefix: str) -> list[tuple[str, bytes | None]]:
    """Every process's last published numbers: (key, JSON, or None once it expired). One
    MGET on one server; on a Redis Cluster the keys hash to different slots, which one
    MGET may not span, so redis-py sends one MGET per slot (the values are read alike:
    each process's numbers are one key, so nothing is torn)."""
    keys = sorted(
        k.decode() if isinstance(k, bytes) else str(k)
        for k in await redis.smembers(ServiceKeys(prefix).stats_procs)
    )
    if not keys:
        return []
    values = await (redis.mget_nonatomic(keys) if isinstance(redis, RedisCluster) else redis.mget(keys))
    return list(zip(keys, values))


class ServiceMetrics:
    """One per process."""

    def __init__(self) -> None:
        # The *_created series (one timestamp per label set) is noise on a dashboard.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        self.orders = Counter(
            "flashsale_orders", "POST /api/orders answers by outcome", ["outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "flashsale_request_seconds",
            "time to answer, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gauges = _SaleGauges()
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._recent: list[float] = []  # order latencies since the last publish

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.orders.labels(outcome).inc()

    def observe(self, route: str, seconds: float) -> None:
        self.latency.labels(route).observe(seconds)
        if route == "orders" and len(self._recent) < 50_000:
            self._recent.append(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self.gauges)
            return generate_latest(registry)
        if self.gauges not in getattr(self.registry, "_collector_to_names", {}):
            self.registry.register(self.gauges)
        return generate_latest(self.registry)

    def take_percentiles(self) -> dict[str, float | int]:
        samples = sorted(self._recent)
        self._recent = []
        if not samples:
            return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def pct(q: float) -> float:
            return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 3)

        return {
            "n": len(samples),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(samples[-1] * 1000, 3),
        }

    async def publish_forever(self, redis: Any, prefix: str, in_flight: Any, interval_s: float = 1.0) -> None:
        """Publish this process's numbers to Redis once a second (until cancelled)."""
        key = ServiceKeys(prefix).stats_proc(os.getpid())
        while True:
            await asyncio.sleep(interval_s)
            payload = {
                "at": time.time(),
                "counts": self.counts,
                "latency": self.take_percentiles(),
                "in_flight": in_flight.current,
            }
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, json.dumps(payload), ex=max(3, int(interval_s * 5)))
                    pipe.sadd(ServiceKeys(prefix).stats_procs, key)
                    await pipe.execute()
            except Exception:  # stats are best effort; never take the process down
                pass
            # A cancel that arrives while the pipeline runs can be swallowed by redis-py (8.1:
            # execute() returns normally, the task stays "cancelling"); looping on would
            # make shutdown, which cancels and awaits this task, wait forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
