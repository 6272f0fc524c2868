"""What the service counts, and how it is read: Prometheus exposition at ``/metrics``
and the live numbers behind ``/api/admin/stats`` (progress lines, the war room).

Per process (prometheus-client; in multi-process mode merged through
``PROMETHEUS_MULTIPROC_DIR``): order outcomes, and for every route — labelled by the
route's template (``/api/orders/{order_id}``), never the raw path, so the label values
stay bounded — a latency histogram and the answers by status code (:meth:`ServiceMetrics.record_answer`).
``process_*``: prometheus-client's process collector; in multi-process mode summed over the
service processes that share the port (:class:`_ServiceProcesses`).

A request does not touch prometheus-client: its answer and outcome are counted in plain
numbers (:class:`ServiceMetrics`), which become the same families, value for value and
byte for byte, when /metrics is rendered. One process alone (``--workers 1``) reads them at
each scrape: exact. With ``--workers N`` each process writes its figures to its files in
``PROMETHEUS_MULTIPROC_DIR`` before each scrape it answers, every :data:`FLUSH_INTERVAL_S`
(0.5 s) and when it stops: a scrape answered by another process shows this one's answers
at most about half a second late (a process killed outright loses that last half second).

Numbers that belong to the whole deployment are read from Redis at scrape time, so every
process reports the same truth (:func:`read_deployment`): stock per SKU, holds pending,
stream backlog, dead letters waiting and the fence, per sale; for a sale behind its waiting
room, the room's queue, admissions, tickets, waits and "sold out" tellings (read from the
room's own counters in Redis: :class:`inventory.RoomFigures`); the order writer's counters and
its last commit (the writer publishes them to Redis; it serves no ``/metrics`` of its own);
the last audit's violations. A sale's series leave ``/metrics`` once it has ended — nothing
decided for ``ended_sale_s`` (closed, or simply over) with nothing left to write, no dead
letter and no fence — so a deployment that ran many drills does not keep a series per sale
forever; a deleted sale leaves at once.

Whether this process reaches PostgreSQL (:func:`postgres_up`) is asked at each scrape by
:mod:`flashsale.service.probes`, not read from Redis; absent without a database.

Each process also publishes its outcome counters and recent latency percentiles to
Redis once a second (``<prefix>:stats:proc:<pid>``, expiring, named in the set
``<prefix>:stats:procs``), so ``/api/admin/stats`` can add up all processes whichever one
answers (:func:`read_published`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from flashsale.keys import ServiceKeys
from inventory import RoomFigures

if TYPE_CHECKING:
    from flashsale.service.state import ServiceState

__all__ = [
    "FLUSH_INTERVAL_S",
    "OUTCOMES",
    "PrometheusMetrics",
    "ServiceMetrics",
    "postgres_up",
    "Published",
    "read_deployment",
    "read_published",
    "stream_backlog",
    "sum_published",
]

log = logging.getLogger("flashsale.service")

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
    "no_ticket",  # the sale is behind its waiting room and the order had no valid ticket
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
    0.25,  # the order p99 objective the alerts and the war room start from (250 ms)
    0.5,
    1.0,
    2.0,
    5.0,
)


#: How often, at most, a process of ``flashsale serve --workers N`` lets its figures wait
#: before writing them where the other processes read them (:meth:`ServiceMetrics.flush`).
FLUSH_INTERVAL_S = 0.5

#: Methods counted under their own name; any other becomes "other" (label values stay bounded).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a request no route matched (404, 405): one value, whatever the path.
UNMATCHED = "unmatched"


class _Deployment(Collector):
    """The deployment-wide families (:func:`read_deployment`), set just before each scrape."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _ServiceProcesses(Collector):
    """``process_*`` in multi-process mode: prometheus-client's process collector read for
    every service process behind this port (the children of our parent that run our
    command line), then added up — CPU, memory and open files are the target's. A scrape
    answered by one process alone would otherwise report a different process each time."""

    def __init__(self) -> None:
        self._pid: int | str = "self"
        self._reader = ProcessCollector(pid=lambda: self._pid, registry=None)

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, float] = {}
        docs: dict[str, tuple[str, str]] = {}
        for pid in _service_pids():
            self._pid = pid
            for family in self._reader.collect():
                (sample,) = family.samples
                docs[sample.name] = (family.documentation, family.type)
                if sample.name == "process_start_time_seconds":  # the oldest one
                    totals[sample.name] = min(totals.get(sample.name, sample.value), sample.value)
                elif sample.name == "process_max_fds":  # a per-process limit, not a sum
                    totals[sample.name] = sample.value if pid == os.getpid() else totals.get(sample.name, 0)
                else:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        self._pid = "self"
        for name, value in totals.items():
            doc, kind = docs[name]
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


def _service_pids() -> list[int]:
    """This process and its siblings started with the same command line (``flashsale serve``
    starts its processes that way), from ``/proc/<parent>/task/<parent>/children``."""
    me, parent = os.getpid(), os.getppid()
    try:
        command = Path(f"/proc/{me}/cmdline").read_bytes()
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return [me]
    pids = {me}
    for child in children:
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                pids.add(int(child))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return sorted(pids)


async def stream_backlog(redis: Any, stream: str) -> int:
    """Entries the order writer has not committed yet (see ``flashsale.streams.stream_backlog``:
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


@dataclass(slots=True)
class Published:
    """Every live process's published numbers, added up."""

    processes: int = 0
    in_flight: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    p50_ms: float = 0.0  # the worst process's (percentiles do not add up)
    p99_ms: float = 0.0
    at: float = 0.0  # the newest publish time (epoch s)
    stale: list[str] = field(default_factory=list)  # keys whose process stopped publishing


async def sum_published(redis: Any, prefix: str) -> Published:
    """The deployment's counters: each process's last publish (:func:`read_published`) added up."""
    total = Published()
    for key, raw in await read_published(redis, prefix):
        if raw is None:
            total.stale.append(key)
            continue
        proc = json.loads(raw)
        total.processes += 1
        total.in_flight += int(proc["in_flight"])
        total.at = max(total.at, float(proc["at"]))
        for outcome, n in proc["counts"].items():
            total.counts[outcome] = total.counts.get(outcome, 0) + int(n)
        if proc["latency"]["n"]:
            total.p50_ms = max(total.p50_ms, float(proc["latency"]["p50_ms"]))
            total.p99_ms = max(total.p99_ms, float(proc["latency"]["p99_ms"]))
    return total


async def read_deployment(state: ServiceState) -> list[Metric]:
    """The deployment-wide families, read from Redis (see the module docstring). A Redis
    that does not answer leaves them out: the scrape still answers with the process's own."""
    try:
        return await _read_deployment(state)
    except Exception:
        return []


async def _read_deployment(state: ServiceState) -> list[Metric]:

    redis, prefix = state.redis, state.settings.key_prefix
    stock = GaugeMetricFamily(
        "flashsale_stock_units", "units per SKU by state", labels=["sale", "sku", "state"]
    )
    holds = GaugeMetricFamily("flashsale_holds_pending", "holds waiting for payment", labels=["sale"])
    backlog = GaugeMetricFamily(
        "flashsale_stream_backlog", "events not yet written to PostgreSQL", labels=["sale"]
    )
    dead = GaugeMetricFamily(
        "flashsale_dead_letters_waiting", "events set aside in the sale's dead-letter stream", labels=["sale"]
    )
    fenced = GaugeMetricFamily(
        "flashsale_sale_fenced", "1 while the sale is fenced (sales refused until recovery)", labels=["sale"]
    )
    room = _RoomFamilies()
    ended_before_ms = (time.time() - state.metrics.ended_sale_s) * 1000
    for sale in await state.sales.all_sales():
        settings = await state.sales.sale(sale)
        if settings is None:  # a bucket's sale id (counted under its sale), or a deleted sale
            continue
        parts = state.engine_parts(settings)
        waiting = sum([await stream_backlog(redis, p.keys.events) for p in parts])
        dead_letters = sum([int(await redis.xlen(ServiceKeys(prefix).dead_letters(p.sale))) for p in parts])
        last_ms = max([settings.opens_at_ms] + [await _last_decision_ms(redis, p.keys.events) for p in parts])
        if last_ms < ended_before_ms and not (waiting or dead_letters or settings.fenced):
            continue  # ended: its series leave
        for sku, snap in (await state.engine(settings).snapshots()).items():
            for name in ("available", "held", "sold", "reserve"):
                stock.add_metric([sale, sku, name], getattr(snap, name))
        holds.add_metric([sale], sum([await redis.zcard(p.keys.deadlines) for p in parts]))
        backlog.add_metric([sale], waiting)
        dead.add_metric([sale], dead_letters)
        fenced.add_metric([sale], 1 if settings.fenced else 0)
        if settings.room:  # only a sale behind its room has one to read
            from flashsale.service.waiting_room import room_of  # (it imports the service state)

            room.add(sale, await room_of(state, sale).figures())
    writer = await redis.hgetall(ServiceKeys(prefix).writer_stats)
    families: list[Metric] = [
        stock,
        holds,
        backlog,
        dead,
        fenced,
        *room.families(),
        CounterMetricFamily(
            "flashsale_writer_rows",
            "order, line and stock-event rows the order writers wrote to PostgreSQL",
            value=float(writer.get(b"rows_total", 0)),
        ),
        CounterMetricFamily(
            "flashsale_dead_letters",
            "events the order writers set aside in dead-letter streams",
            value=float(writer.get(b"dead_letters_total", 0)),
        ),
        GaugeMetricFamily(
            "flashsale_writer_last_commit_timestamp_seconds",
            "when an order writer last committed a batch to PostgreSQL (0: never)",
            value=int(writer.get(b"last_commit_ms", 0)) / 1000,
        ),
    ]
    audit = await redis.hgetall(ServiceKeys(prefix).audit_last)
    if audit:
        at_ms = int(audit.pop(b"at_ms", 0))
        violations = GaugeMetricFamily(
            "flashsale_audit_violations", "violations the last audit found, by kind", labels=["kind"]
        )
        for kind, count in sorted(audit.items()):
            violations.add_metric([kind.decode()], int(count))
        families.append(violations)
        families.append(
            GaugeMetricFamily(
                "flashsale_audit_last_run_timestamp_seconds",
                "when the last audit started",
                value=at_ms / 1000,
            )
        )
    return families


def postgres_up(up: bool) -> Metric:
    """1 while this process's PostgreSQL answers: orders go on without it, so readiness
    only reports it; this gauge is what the FlashsalePostgresDown alert reads."""
    return GaugeMetricFamily(
        "flashsale_postgres_up",
        "1 if PostgreSQL answered this scrape's SELECT 1 within a second",
        value=int(up),
    )


def _le(seconds: float) -> str:
    """A bucket's bound as Prometheus writes it (``+Inf``, ``0.1``, ``1800.0``)."""
    return "+Inf" if seconds == float("inf") else repr(float(seconds))


class _RoomFamilies:
    """The waiting rooms' families, one series per sale behind its room (docs/alerts.md)."""

    def __init__(self) -> None:
        labels = ["sale"]
        self.rooms = 0
        self.queue = GaugeMetricFamily(
            "flashsale_room_queue_buyers", "buyers waiting in the sale's room after T0", labels=labels
        )
        self.pre_queue = GaugeMetricFamily(
            "flashsale_room_prequeue_buyers",
            "buyers who joined the room before T0 (shuffled at T0, then 0)",
            labels=labels,
        )
        self.tickets_out = GaugeMetricFamily(
            "flashsale_room_tickets_outstanding",
            "admitted buyers whose ticket is neither used nor lapsed",
            labels=labels,
        )
        self.counters = {
            figure: CounterMetricFamily(f"flashsale_room_{name}", doc, labels=labels)
            for figure, name, doc in (
                ("joined", "joined", "buyers who joined the room (again after a lapsed ticket)"),
                ("admitted", "admitted", "buyers the room admitted (each got a ticket)"),
                ("used", "tickets_used", "tickets spent on an order"),
                ("expired", "tickets_expired", "tickets that lapsed unused (their buyers may join again)"),
                ("told_sold_out", "told_sold_out", "waiting buyers told their SKUs had sold out"),
            )
        }
        self.wait = HistogramMetricFamily(
            "flashsale_room_wait_seconds",
            "time from joining the room (or T0, for the pre-queue) to admission",
            labels=labels,
        )
        self.told = HistogramMetricFamily(
            "flashsale_room_told_after_seconds",
            "time from the room seeing a SKU sold out to a waiting buyer of it hearing so",
            labels=labels,
        )
        self.told_max = GaugeMetricFamily(
            "flashsale_room_told_after_max_seconds",
            "the longest a waiting buyer heard of a sell-out after the room saw it",
            labels=labels,
        )

    def add(self, sale: str, f: RoomFigures) -> None:
        self.rooms += 1
        self.queue.add_metric([sale], f.waiting)
        self.pre_queue.add_metric([sale], f.pre_queue)
        self.tickets_out.add_metric([sale], f.tickets_out)
        for name, counter in self.counters.items():
            counter.add_metric([sale], getattr(f, name))
        for histogram, buckets, total_ms in (
            (self.wait, f.wait_buckets, f.wait_sum_ms),
            (self.told, f.told_buckets, f.told_sum_ms),
        ):
            cumulative, rows = 0, []
            for bound_ms, n in buckets:
                cumulative += n
                rows.append((_le(bound_ms / 1000), float(cumulative)))
            histogram.add_metric([sale], rows, total_ms / 1000)
        self.told_max.add_metric([sale], f.told_max_ms / 1000)

    def families(self) -> list[Metric]:
        """The families, or none while no sale is behind its room (so /metrics of a
        deployment without rooms does not change)."""
        if not self.rooms:
            return []
        return [
            self.queue,
            self.pre_queue,
            self.tickets_out,
            *self.counters.values(),
            self.wait,
            self.told,
            self.told_max,
        ]


async def _last_decision_ms(redis: Any, stream: str) -> int:
    """When the engine last decided anything for a sale: every reservation, payment,
    cancellation, expiry and restock appends to its stream, whose last generated id keeps
    the time even after the writer trimmed the entries. 0 for a stream never written."""
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:  # no such key
        return 0
    last = info.get("last-generated-id") or b"0-0"
    return int((last.decode() if isinstance(last, bytes) else str(last)).split("-")[0])


#: (name, help, labels) of the service's own families, as /metrics has always shown them.
_ORDERS = ("flashsale_orders", "POST /api/orders answers by outcome", ("outcome",))
_LATENCY = ("flashsale_request_seconds", "time to answer, by method and route template", ("method", "route"))
_RESPONSES = (
    "flashsale_responses",
    "answers by method, route template and status code",
    ("method", "route", "code"),
)
#: A latency slot: the answers per bucket (``+Inf`` last), then the sum of their seconds.
_SUM = len(_LATENCY_BUCKETS) + 1
_LE = tuple(_le(bound) for bound in (*_LATENCY_BUCKETS, float("inf")))


class PrometheusMetrics:
    """The service's own families as prometheus-client's metric objects: in multi-process
    mode, what a process writes its figures into (:meth:`ServiceMetrics.flush`), for the
    other processes to read from its files. (A test feeds them directly, the way the
    service once did for every request, to check that the figures read the same.)"""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.orders = Counter(*_ORDERS, registry=registry)
        self.latency = Histogram(*_LATENCY, buckets=_LATENCY_BUCKETS, registry=registry)
        self.responses = Counter(*_RESPONSES, registry=registry)


class _Figures(Collector):
    """The service's own families, read from a :class:`ServiceMetrics`'s slots at each
    scrape: what prometheus-client's Counter and Histogram would show for the same answers."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        orders = CounterMetricFamily(*_ORDERS[:2], labels=_ORDERS[2])
        for outcome, n in self.metrics._orders.items():
            orders.add_metric([outcome], float(n))
        latency = HistogramMetricFamily(*_LATENCY[:2], labels=_LATENCY[2])
        for route, slot in self.metrics._latency.items():
            cumulative, rows = 0.0, []
            for le, answers in zip(_LE, slot):
                cumulative += answers
                rows.append((le, cumulative))
            latency.add_metric(route, rows, slot[_SUM])
        responses = CounterMetricFamily(*_RESPONSES[:2], labels=_RESPONSES[2])
        for code, (answers,) in self.metrics._responses.items():
            responses.add_metric(code, float(answers))
        yield from (orders, latency, responses)


class _FileWriter:
    """Multi-process mode: a process's slots written into prometheus-client's mmap-backed
    children (this process's files in ``PROMETHEUS_MULTIPROC_DIR``), what changed since the
    last write. A histogram child's ``_buckets`` and ``_sum`` are prometheus-client's private
    attributes (it has no public way to add n answers to one bucket):
    tests/test_service_metrics_slots.py compares the files written here with those the
    direct ``observe()``/``inc()`` path writes, so an upgrade that changes them fails there."""

    def __init__(self) -> None:
        self.metrics = PrometheusMetrics(registry=None)
        # What the files hold of each label set (a latency series: its child, the sum its
        # file held before this process wrote to it, and the slot as last written).
        self.orders: dict[str, int] = {}
        self.latency: dict[tuple[str, str], tuple[Any, float, list[float]]] = {}
        self.responses: dict[tuple[str, str, str], int] = {}

    def write(self, figures: ServiceMetrics) -> None:
        for outcome, n in figures._orders.items():
            written = self.orders.get(outcome, 0)
            if n != written:
                self.metrics.orders.labels(outcome).inc(n - written)
                self.orders[outcome] = n
        for labels, slot in figures._latency.items():
            series = self.latency.get(labels)
            if series is None:
                child = self.metrics.latency.labels(*labels)
                series = self.latency[labels] = (child, child._sum.get(), [0] * _SUM + [0.0])
            child, base, written_slot = series
            if slot == written_slot:
                continue
            for i in range(_SUM):
                if slot[i] != written_slot[i]:
                    child._buckets[i].inc(slot[i] - written_slot[i])
            # The sum is written whole, not as a delta: the same float, bit for bit, that
            # observe() would have added up one answer at a time (base is 0.0 unless a
            # process with this pid wrote before).
            child._sum.set(base + slot[_SUM])
            written_slot[:] = slot
        for key, (n,) in figures._responses.items():
            written = self.responses.get(key, 0)
            if n != written:
                self.metrics.responses.labels(*key).inc(n - written)
                self.responses[key] = n


class ServiceMetrics:
    """One per process. ``ended_sale_s``: how long after its last decision an ended sale's
    series stay (see the module docstring).

    Answers and outcomes are counted in plain Python numbers, one small slot per label set
    (a request pays a dict lookup, a ``bisect`` and three additions; prometheus-client's
    children took a lock per update and a linear scan of the buckets: ~4 % of an order's
    instructions). One process alone serves them from the slots at each scrape (:class:`_Figures`),
    exact; in multi-process mode they are written to this process's files in
    ``PROMETHEUS_MULTIPROC_DIR`` by :meth:`flush`: before each scrape this process answers,
    every :data:`FLUSH_INTERVAL_S` (:meth:`flush_forever`) and when the app stops."""

    def __init__(self, *, ended_sale_s: float = 900.0) -> None:
        # The *_created series (one timestamp per label set) is noise on a dashboard.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.ended_sale_s = ended_sale_s
        self.registry = CollectorRegistry()
        # The slots, by label values, in the order each label set was first seen (the
        # order prometheus-client showed its children in): outcome -> orders; (method,
        # route) -> a latency slot (see _SUM); (method, route, code) -> [answers].
        self._orders: dict[str, int] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}
        self._responses: dict[tuple[str, str, str], list[int]] = {}
        self.registry.register(_Figures(self))
        self.deployment = _Deployment()
        self.registry.register(self.deployment)
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)
        # (method, route, status) -> its latency and responses slots: the hot path pays one
        # dict lookup, not the label values' construction, per request.
        self._answers: dict[tuple[str, object, int], tuple[list[float], list[int]]] = {}
        self._files = _FileWriter() if self.multiprocess else None
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._recent: list[float] = []  # order latencies since the last publish

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        try:
            self._orders[outcome] += 1
        except KeyError:  # the first: /metrics shows an outcome once it happened
            self._orders[outcome] = 1

    def observe(self, route: str, seconds: float) -> None:
        """An order's time to answer, for the war room's percentiles (the histogram is fed
        for every route by :meth:`record_answer`)."""
        if route == "orders" and len(self._recent) < 50_000:
            self._recent.append(seconds)

    def record_answer(self, request: web.Request, status: int, started: float) -> None:
        """A request answered with ``status``, ``started`` at that ``time.perf_counter()``:
        its time to answer into the route's histogram, its answer into the route's counter.
        Called by the app's one middleware, for every answer as the client gets it."""
        method = request.method
        if method not in _METHODS:
            method = "other"
        self.answered(method, request.match_info.route, status, time.perf_counter() - started)

    def answered(self, method: str, route: web.AbstractRoute, status: int, seconds: float) -> None:
        """An answer (:meth:`record_answer`) on ``route``: the route that matched the
        request, or the one aiohttp makes for a request none matched (404, 405)."""
        latency, responses = self._answers.get((method, route, status)) or self._slots_for(
            method, route, status
        )
        # The first bucket whose bound is >= seconds (+Inf past the last), as prometheus-client.
        latency[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        latency[-1] += seconds  # (the sum, last: see _SUM)
        responses[0] += 1

    def _slots_for(self, method: str, route: web.AbstractRoute, status: int) -> tuple[list[float], list[int]]:
        resource = route.resource
        label = UNMATCHED if resource is None else resource.canonical
        # Two resources of one template (so two routes) share its label set's slots.
        latency = self._latency.get((method, label))
        if latency is None:
            latency = self._latency[(method, label)] = [0] * _SUM + [0.0]
        responses = self._responses.get((method, label, str(status)))
        if responses is None:
            responses = self._responses[(method, label, str(status))] = [0]
        slots = (latency, responses)
        if resource is not None:  # (aiohttp makes a route per unmatched request: none kept)
            self._answers[(method, route, status)] = slots
        return slots

    def flush(self) -> None:
        """Multi-process mode: write what this process counted since the last flush to its
        files, where the other processes read it. (One process alone: nothing to do.)"""
        if self._files is not None:
            self._files.write(self)

    async def flush_forever(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Multi-process mode: :meth:`flush` every ``interval_s``, and once more when
        cancelled (the app stops: its last answers). One process alone: returns at once."""
        if self._files is None:
            return
        try:
            while True:
                await asyncio.sleep(interval_s)
                self._flush_or_say()
        finally:
            self._flush_or_say()

    def _flush_or_say(self) -> None:
        try:
            self.flush()
        except Exception:  # (a full disk, say) the service goes on; the next flush tries again
            log.warning("could not write this process's metrics to PROMETHEUS_MULTIPROC_DIR", exc_info=True)

    def exposition(self, families: list[Metric]) -> bytes:
        """The text format: this process's metrics (all processes', in multi-process mode)
        and ``families`` (:func:`read_deployment`)."""
        self.deployment.families = families
        if self.multiprocess:
            self.flush()  # this process's own figures are exact at its own scrapes
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self.deployment)
            registry.register(_ServiceProcesses())
            return generate_latest(registry)
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
