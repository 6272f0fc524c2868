"""The report folder: ``summary.json`` (schema-versioned), ``timeline.csv`` (one row per
second), HdrHistogram logs (``latency-raw.hlog``, ``latency-corrected.hlog``), ``requests.jsonl``
(the merged history, ``loadtests.history/1``, written during the run), ``plots/*.png`` and
``report.html`` — and the end-of-run table on the console, k6-style.

Figures as the tools its readers know them: p50/p90/p95/p99/p99.9, max and mean (k6, Locust,
Gatling); requests and errors per second over time, in all and per request kind; latency per
second per kind; the machine, the software's versions and the run's settings; and the load
generator's own figures behind the word "valid".

The charts tell the run's story to someone who was not watching; each is drawn only when
its data exists, as a PNG and as an interactive chart in ``report.html`` (``loadtests.charts``):

1. arrivals the shape asked for vs arrivals sent (and dropped) — did the generator keep up;
2. requests and errors per second, in all and per request kind;
3. latency percentiles and mean over time, raw and corrected for coordinated omission;
4. p50 and p99 over time per request kind — when the run has more than one kind;
5. orders per second by outcome (created, replayed, each refusal's code, unknown) — when
   the run has order operations;
6. stock remaining per item, with the sold-out moments and the drill's actions marked —
   when a sampler reported stock;
7. a queue's backlog and its writer's rate — when a sampler reported them;
8. the load generator's CPU against its bound of validity — when the processes measured it.
"""

from __future__ import annotations

import csv
import html
import json
import math
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtests import exit_codes
from loadtests.charts import (
    COLOURS,
    PALETTE,
    UPLOT_VERSION,
    Chart,
    Frame,
    Series,
    draw_pngs,
    figures,
    page_assets,
)
from loadtests.history import HISTORY_FORMAT
from loadtests.latency import (
    INTERVAL_SIGNIFICANT_FIGURES,
    mean_us,
    merge,
    percentiles_us,
    summarize,
    write_log,
)
from loadtests.recording import RunCollector, ServiceSample, describe_machine
from loadtests.shapes import Shape
from loadtests.slo import RunValidity, Validity, check_validity, evaluate
from loadtests.verdict import Verdict

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "DrillEvent",
    "Report",
    "build_summary",
    "build_timeline",
    "format_console",
    "generator_health",
    "latency_lines",
    "order_columns",
    "run_charts",
    "software_versions",
    "write_report",
]

SCHEMA = "flashsale.drill.summary"
#: 2: the oracle section is the kit's verdict (``not_judged``, ``drained``, ``evidence`` — flashsale's
#: audit moved to ``evidence.audit``), ``run.sampler_errors`` (was ``stats_errors``), ``request_log.format``.
SCHEMA_VERSION = 2
#: Each second's latency percentiles in the timeline (all requests; each kind has p50 and p99).
TIMELINE_PERCENTILES = (50.0, 90.0, 95.0, 99.0)

#: What the report says when no oracle judged the run (never "invariants held").
NO_ORACLE = (
    "no oracle: nothing checked for oversold, lost or duplicate orders — add one with @rehearsal.oracle "
    "(docs/your-backend.md)"
)


@dataclass(frozen=True)
class DrillEvent:
    """Something the run did to the backend (e.g. released a reserve pool), for the plots."""

    t: float  # epoch seconds
    what: str


def software_versions() -> dict[str, str]:
    """The software that ran the load and wrote the report: Python, the kit's distribution,
    Locust and what it runs on, the histogram and plotting libraries, the charts' uPlot."""
    out = {"python": platform.python_version()}
    kit = metadata.packages_distributions().get("loadtests", [])
    for dist in [*kit[:1], "locust", "gevent", "hdrhistogram", "matplotlib", "psutil"]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["uplot"] = UPLOT_VERSION
    return out


def order_columns(collector: RunCollector, order_operations: Sequence[str]) -> list[str]:
    """The order-outcome buckets seen in the run, in the timeline's column order: created,
    replayed, then each refusal's code (most frequent first), unknown last."""
    totals: Counter[str] = Counter()
    for c in collector.seconds.values():
        for key, n in c.items():
            for op in order_operations:
                if key.startswith(f"res.{op}."):
                    totals[key[len(f"res.{op}.") :]] += n
    first, last = ("created", "replayed", "ok"), ("unknown",)
    middle = sorted((b for b in totals if b not in first + last), key=lambda b: (-totals[b], b))
    return [b for b in first if b in totals] + middle + [b for b in last if b in totals]


def build_timeline(
    collector: RunCollector, shape: Shape, last_second: int, order_operations: Sequence[str] = ("order",)
) -> list[dict[str, Any]]:
    """One row per second from the run's start to ``last_second`` (inclusive)."""
    samples: dict[int, ServiceSample] = {}
    for polled in collector.service:
        samples[int(math.floor(polled.t - collector.start_epoch))] = polled
    skus = sorted({sku for s in collector.service for sku in s.skus})
    buckets = order_columns(collector, order_operations)
    kinds = [n for n in collector.book.names() if n != "all"]
    first = min([0, *collector.seconds.keys()])
    rows: list[dict[str, Any]] = []
    prev_written: int | None = None
    for s in range(first, last_second + 1):
        c = collector.seconds.get(s, Counter())
        window = shape.window_at(s + 0.5)
        row: dict[str, Any] = {
            "second": s,
            "t_from_t0_s": round(s - shape.t0_s, 3),
            "window": window.name if window else "-",
            "target_arrivals": round(shape.expected(max(s, 0), s + 1), 3) if s >= 0 else 0.0,
            "arrivals_started": c.get("arrivals.started", 0),
            "arrivals_dropped": c.get("arrivals.dropped", 0),
        }
        for bucket in buckets:
            row[f"orders_{bucket}"] = sum(c.get(f"res.{op}.{bucket}", 0) for op in order_operations)
        row["requests"] = sum(n for k, n in c.items() if k.startswith("req."))
        row["errors"] = sum(n for k, n in c.items() if k.startswith("err."))
        raw, corrected = collector.book.interval(s)
        row.update(_second_latency(raw, TIMELINE_PERCENTILES))
        row["mean_ms"] = round(mean_us(raw) / 1000, 3) if raw.get_total_count() else ""
        row.update(_second_latency(corrected, (99.0,), "corrected"))
        row["max_corrected_ms"] = corrected.get_max_value() / 1000 if corrected.get_total_count() else ""
        sample = samples.get(s)
        row["backlog"] = sample.backlog if sample and sample.backlog is not None else ""
        if sample and sample.written is not None:
            row["writer_rows_per_s"] = sample.written - prev_written if prev_written is not None else ""
            prev_written = sample.written
        else:
            row["writer_rows_per_s"] = ""
        for sku in skus:
            row[f"available_{sku}"] = sample.skus.get(sku, {}).get("available", "") if sample else ""
        row["generator_cpu_max"] = max((cpu.get(s, 0.0) for cpu in collector.cpu.values()), default=0.0)
        for name in kinds:  # each request kind: its rate, its errors, its latency
            row[f"requests_{name}"] = c.get(f"req.{name}", 0)
            row[f"errors_{name}"] = c.get(f"err.{name}", 0)
            raw, corrected = collector.book.interval(s, name)
            row.update(_second_latency(raw, (50.0, 99.0), name=name))
            row.update(_second_latency(corrected, (99.0,), "corrected", name))
        rows.append(row)
    return rows


def _second_latency(
    histogram: HdrHistogram, percentiles: Sequence[float], which: str = "", name: str = ""
) -> dict[str, float | str]:
    """One second's percentiles as timeline columns: ``p99_ms``, ``p99_corrected_ms``,
    ``p99_ms_order`` …; "" when nothing completed in that second."""
    keys = {p: f"p{p:g}{f'_{which}' if which else ''}_ms{f'_{name}' if name else ''}" for p in percentiles}
    if not histogram.get_total_count():
        return dict.fromkeys(keys.values(), "")
    return {keys[p]: v / 1000 for p, v in percentiles_us(histogram, percentiles).items()}


def sold_out_moments(rows: Sequence[Mapping[str, Any]], t0_s: float) -> dict[str, list[float]]:
    """Per SKU, the seconds (from T0) at which its available stock reached 0."""
    out: dict[str, list[float]] = {}
    for key in rows[0].keys() if rows else []:
        if not key.startswith("available_"):
            continue
        sku, prev = key[len("available_") :], None
        for r in rows:
            v = r[key]
            if v == "":
                continue
            if v == 0 and prev not in (None, 0) and r["second"] >= t0_s - 1:
                out.setdefault(sku, []).append(r["t_from_t0_s"])
            prev = v
    return out


def _busiest_second(collector: RunCollector, prefix: str) -> int:
    """The most counts under ``prefix`` (``req.``: requests of every kind) in one second of the run."""
    return max(
        (sum(n for k, n in c.items() if k.startswith(prefix)) for c in collector.seconds.values()), default=0
    )


def build_summary(
    collector: RunCollector,
    shape: Shape,
    run: Mapping[str, Any],
    *,
    elapsed_s: float,
    thresholds: Sequence[str],
    bounds: RunValidity = RunValidity(),
    verdict: Verdict | None = None,
    oracle_error: str = "",
    oracle_skipped: str = "",
    rows: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The run in one JSON-able dict. ``verdict`` is the oracle's (None: no oracle ran —
    ``oracle_skipped`` says why, ``oracle_error`` if it failed, which makes the run invalid)."""
    totals = collector.totals()
    target = shape.expected(0.0, min(max(elapsed_s, 0.0), shape.duration_s))
    started, dropped = totals.get("arrivals.started", 0), totals.get("arrivals.dropped", 0)
    requests = sum(n for k, n in totals.items() if k.startswith("req."))
    errors = sum(n for k, n in totals.items() if k.startswith("err."))
    names = collector.book.names()
    per_name: dict[str, Any] = {}
    run_s = max(elapsed_s, 1.0)
    for name in [n for n in names if n != "all"]:
        outcomes = {k[len(f"out.{name}.") :]: v for k, v in totals.items() if k.startswith(f"out.{name}.")}
        per_name[name] = {
            "count": totals.get(f"req.{name}", 0),
            "errors": totals.get(f"err.{name}", 0),
            "per_s": round(totals.get(f"req.{name}", 0) / run_s, 3),
            "errors_per_s": round(totals.get(f"err.{name}", 0) / run_s, 3),
            "peak_per_s": max((c.get(f"req.{name}", 0) for c in collector.seconds.values()), default=0),
            "outcomes": dict(sorted(outcomes.items())),
        }
    windows = []
    for w in shape.windows:
        lo, hi = int(math.floor(w.start)), int(math.ceil(w.end))
        secs = [collector.seconds.get(s, Counter()) for s in range(lo, hi)]
        # Latency by completion second: a window's last slow answers may land in the next one.
        intervals = [collector.book.interval(s) for s in range(lo, hi)]
        windows.append(
            {
                "name": w.name,
                "start_s": w.start,
                "end_s": w.end,
                "target": round(shape.expected(w.start, w.end), 1),
                "started": sum(c.get("arrivals.started", 0) for c in secs),
                "dropped": sum(c.get("arrivals.dropped", 0) for c in secs),
                "requests": sum(n for c in secs for k, n in c.items() if k.startswith("req.")),
                "orders": sum(c.get("req.order", 0) for c in secs),
                "errors": sum(n for c in secs for k, n in c.items() if k.startswith("err.")),
                "latency_raw": summarize(merge((i[0] for i in intervals), INTERVAL_SIGNIFICANT_FIGURES)),
                "latency_corrected": summarize(
                    merge((i[1] for i in intervals), INTERVAL_SIGNIFICANT_FIGURES)
                ),
                # The busiest second of the busiest load process in the window (% of one core):
                # whether the generator or the backend ran out in it (``loadtests.capacity``).
                "generator_cpu_max": max(
                    (v for cpu in collector.cpu.values() for s, v in cpu.items() if lo <= s < hi),
                    default=None,
                ),
            }
        )
    cpu_max = {p: max(v.values(), default=0.0) for p, v in collector.cpu.items()}
    cpu_busy = {
        p: (sum(1 for x in v.values() if x > bounds.max_cpu_percent) / len(v)) if v else 0.0
        for p, v in collector.cpu.items()
    }
    final = collector.service[-1] if collector.service else None
    t0_epoch = collector.start_epoch + shape.t0_s
    t0_sent = {p: round((t - t0_epoch) * 1000, 3) for p, t in sorted(collector.rendezvous_first.items())}
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": {
            **run,
            "shape": shape.name,
            "peak_rps": shape.peak_rps,
            "shape_params": shape.params,
            "start_epoch": collector.start_epoch,
            "t0_epoch": collector.start_epoch + shape.t0_s,
            "shape_duration_s": shape.duration_s,
            "elapsed_s": round(elapsed_s, 3),
            "processes": sorted(collector.done),
        },
        "arrivals": {
            "target": round(target, 1),
            "started": started,
            "dropped": dropped,
            "windows": windows,
            "dispatch": collector.dispatch,
        },
        "requests": per_name,
        # Rates per second of the run (elapsed_s), and the busiest second's, k6's http_reqs style.
        "throughput": {
            "requests": requests,
            "requests_per_s": round(requests / run_s, 3),
            "requests_per_s_peak": _busiest_second(collector, "req."),
            "errors": errors,
            "errors_per_s": round(errors / run_s, 3),
            "errors_per_s_peak": _busiest_second(collector, "err."),
        },
        "ratios": {
            "arrival_ratio": (started / target) if target else None,
            "dropped_ratio": (dropped / (started + dropped)) if (started + dropped) else 0.0,
            "error_ratio": (errors / requests) if requests else None,
            "arrival_ratio_count": started,
            "dropped_ratio_count": dropped,
            "error_ratio_count": errors,
        },
        "latency": {
            which: {n: summarize(collector.book.total(f"{n}.{which}")) for n in names}
            for which in ("raw", "corrected")
        },
        "generator": {
            "cpu_max": cpu_max,
            "cpu_busy_ratio": cpu_busy,
            "failures": dict(collector.failures),
            "dispatch_lag": summarize(collector.book.total("dispatch_lag")),
            # When each process fired its share of the T0 rendezvous (ms after T0), and the spread.
            "t0_sent_ms": t0_sent,
            "t0_skew_ms": round(max(t0_sent.values()) - min(t0_sent.values()), 3) if t0_sent else None,
            "latency_clamped": collector.book.clamped,
            # What each load process ran on (a distributed run's workers may be elsewhere).
            "machines": dict(sorted(collector.machines.items())),
        },
        "service": {
            "final": (
                {"skus": final.skus, "backlog": final.backlog, "written": final.written} if final else None
            ),
            "samples": len(collector.service),
            "sold_out_at_s_from_t0": sold_out_moments(rows, shape.t0_s),
            "backlog_max": max((s.backlog for s in collector.service if s.backlog is not None), default=None),
        },
        "request_log": {
            "lines": collector.request_lines,
            "path": collector.requests_path.name if collector.requests_path else None,
            "format": HISTORY_FORMAT,
        },
    }
    slo_results = evaluate(thresholds, summary)
    validity = check_validity(summary, bounds)
    reasons = list(validity.reasons)
    if verdict is not None and not verdict.drained:
        # First: it is why the invariants could not all be judged.
        reasons.insert(
            0,
            "not drained: the backend had not finished recording when the oracle looked "
            f"({verdict.drain_detail or 'a backlog'}); lost orders cannot be told from a backlog — "
            "let it drain (is its writer running?) and judge again",
        )
    if oracle_error:
        reasons.append(f"the oracle could not judge the run: {oracle_error}")
    validity = Validity(not reasons, tuple(reasons))
    summary["slo"] = {
        "thresholds": [r.__dict__ for r in slo_results],
        "passed": all(r.passed for r in slo_results),
    }
    summary["validity"] = {**validity.as_dict(), "bounds": asdict(bounds)}
    # Where the report was written (the master, or the only process) and with what software.
    summary["machine"] = describe_machine()
    summary["versions"] = software_versions()
    if verdict is not None:
        summary["oracle"] = verdict.as_dict()
    else:
        summary["oracle"] = {"skipped": oracle_error or oracle_skipped or NO_ORACLE}
    code = exit_codes.decide(
        invariants_held=verdict.invariants_held if verdict else True,
        run_valid=validity.valid,
        slo_passed=summary["slo"]["passed"],
    )
    if verdict is None:
        unjudged = "no oracle" if not oracle_error else "the oracle failed"
    elif not verdict.judged:
        unjudged = "the oracle judged nothing"
    else:
        unjudged = ""
    summary["exit_code"] = code
    summary["exit_meaning"] = exit_codes.meaning(
        code,
        unjudged=unjudged,
        failed=[c.name for c in verdict.failed] if verdict else (),
        invalid_because=validity.reasons,
    )
    return summary


# -- charts ----------------------------------------------------------------------------------
def run_charts(
    rows: Sequence[Mapping[str, Any]],
    shape: Shape,
    events: Sequence[tuple[float, str]],
    sold_out: Mapping[str, list[float]],
    run_id: str = "",
    cpu_bound: float = RunValidity.max_cpu_percent,
) -> tuple[Frame, list[Chart]]:
    """The run's charts from its timeline (see the module docstring), each only when its data
    exists; ``events`` are (seconds from T0, what happened), ``cpu_bound`` the generator's CPU
    bound of validity."""
    frame = Frame(
        x=[r["t_from_t0_s"] for r in rows],
        x_label="seconds from the opening (T0)" if shape.t0_s else "seconds from the start",
        t0=bool(shape.t0_s),
        bands=[(w.start - shape.t0_s, w.end - shape.t0_s) for w in shape.windows if w.kind == "countdown"],
        events=list(events),
        windows=[(w.start - shape.t0_s, w.name) for w in shape.windows],
    )
    columns = list(rows[0].keys()) if rows else []

    def num(key: str) -> list[float | None]:
        return [None if r.get(key, "") == "" else float(r[key]) for r in rows]

    def has(values: Sequence[float | None]) -> bool:
        return any(v for v in values)

    kinds = [k[len("requests_") :] for k in columns if k.startswith("requests_")]
    charts: list[Chart] = []
    dropped = num("arrivals_dropped")
    charts.append(
        Chart(
            "arrivals",
            "Arrivals per second: what the shape asked for vs what was sent",
            "Target vs achieved arrivals (grey band: countdown before T0)",
            "arrivals / s",
            [
                Series("target (shape)", num("target_arrivals"), "#8c8c8c", "step", faint=True),
                Series("sent (by intended second)", num("arrivals_started"), COLOURS["blue"], "step"),
                *(
                    [Series("dropped (no free slot)", dropped, COLOURS["red"], "bars")]
                    if has(dropped)
                    else []
                ),
            ],
            name_windows=True,
        )
    )
    charts.append(
        Chart(
            "requests",
            "Requests and errors per second (by completion time)",
            "Requests per second, in all and by kind, and unexpected answers (errors) per second",
            "requests / s",
            [
                Series("all requests", num("requests"), "#24292f", "step", width=1.6),
                *(
                    Series(k, num(f"requests_{k}"), PALETTE[i % len(PALETTE)], "step", width=1)
                    for i, k in enumerate(kinds)
                ),
                Series("errors", num("errors"), COLOURS["red"], "bars"),
            ],
            legend_columns=2,
        )
    )
    charts.append(
        Chart(
            "latency",
            "Latency per second, every request (by completion time)",
            "Latency percentiles and mean over time, raw and corrected for coordinated omission",
            "ms (log scale)",
            [
                Series("p50 raw", num("p50_ms"), COLOURS["blue"], width=1),
                Series("p90 raw", num("p90_ms"), COLOURS["cyan"], width=1),
                Series("p95 raw", num("p95_ms"), COLOURS["green"], width=1),
                Series("p99 raw", num("p99_ms"), COLOURS["orange"]),
                Series("mean raw", num("mean_ms"), COLOURS["grey"], width=1, dash=True),
                Series("p99 corrected (from intended send time)", num("p99_corrected_ms"), COLOURS["red"]),
            ],
            scale="log",
            legend_columns=2,
        )
    )
    if len(kinds) > 1:
        per_kind = []
        for i, k in enumerate(kinds):
            colour = PALETTE[i % len(PALETTE)]
            per_kind += [
                Series(f"{k} p99", num(f"p99_ms_{k}"), colour),
                Series(f"{k} p50", num(f"p50_ms_{k}"), colour, width=1, dash=True),
            ]
        charts.append(
            Chart(
                "latency_by_kind",
                "Latency per second by request kind: p99 (solid) and p50 (dashed), raw",
                "Latency over time per request kind (each kind's corrected p99 is in timeline.csv)",
                "ms (log scale)",
                per_kind,
                scale="log",
                legend_columns=2,
            )
        )
    buckets = [k[len("orders_") :] for k in columns if k.startswith("orders_")]
    if buckets:
        colours = {"created": "green", "replayed": "olive", "ok": "green", "unknown": "red"}
        refusal_colours = iter(["#ff7f0e", "#8c564b", "#999999", "#e377c2", "#17becf", "#9467bd", "#4d4d4d"])
        charts.append(
            Chart(
                "orders",
                "Orders per second by outcome",
                "Order answers per second by outcome",
                "orders / s",
                [
                    Series(
                        b.replace("_", " "),
                        num(f"orders_{b}"),
                        COLOURS[colours[b]] if b in colours else next(refusal_colours, "#7f7f7f"),
                        "bars",
                    )
                    for b in buckets
                ],
                stacked=True,
                legend_columns=2,
            )
        )
    stock_keys = [k for k in columns if k.startswith("available_")]
    if stock_keys:
        stock: list[Series] = []
        for i, key in enumerate(stock_keys):
            sku = key[len("available_") :]
            label = sku.removesuffix(f"-{run_id}") if run_id else sku  # per-run item names carry the run id
            colour = PALETTE[i % len(PALETTE)]
            stock.append(Series(label, num(key), colour, width=1.4))
            moments = set(sold_out.get(sku, []))
            if moments:
                # Later moments are lapsed holds sold again: the marker is enough.
                marks = [0.0 if t in moments else None for t in frame.x]
                stock.append(Series(f"{label} sold out", marks, colour, "points", note=f"{label} sold out"))
        charts.append(
            Chart(
                "stock",
                "Stock available per item (▼ sold out; stock can come back, e.g. as unpaid holds lapse)",
                "Stock remaining per item, with sold-out moments and the run's actions",
                "units (symlog)",
                stock,
                scale="symlog",
            )
        )
    backlog, rate = num("backlog"), num("writer_rows_per_s")
    if any(v is not None for v in backlog + rate):
        charts.append(
            Chart(
                "queue",
                "Queue: backlog and writer rate",
                "Queue backlog and writer rate: the peak shaved into the database",
                "entries",
                [
                    Series("backlog: entries not yet recorded", backlog, COLOURS["purple"], width=1.4),
                    Series("orders recorded / s", rate, COLOURS["green"], "step", width=1, right=True),
                ],
                y2_label="orders recorded / s",
            )
        )
    cpu = num("generator_cpu_max")
    if has(cpu):
        charts.append(
            Chart(
                "generator",
                f"Load generator: CPU of its busiest process per second (above {cpu_bound:g} % it sets the pace)",
                "The load generator's own CPU, one of the figures behind the run's validity",
                "% of one core",
                [
                    Series("busiest process", cpu, COLOURS["blue"], "step"),
                    Series(
                        f"{cpu_bound:g} %",
                        [cpu_bound] * len(rows),
                        COLOURS["red"],
                        width=1,
                        dash=True,
                    ),
                ],
            )
        )
    return frame, charts


# -- the folder --------------------------------------------------------------------------------
@dataclass
class Report:
    folder: Path
    summary: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return int(self.summary["exit_code"])


def write_report(
    folder: Path,
    collector: RunCollector,
    shape: Shape,
    run: Mapping[str, Any],
    *,
    elapsed_s: float,
    thresholds: Sequence[str],
    bounds: RunValidity = RunValidity(),
    verdict: Verdict | None = None,
    oracle_error: str = "",
    oracle_skipped: str = "",
    events: Sequence[DrillEvent] = (),
    plots: bool = True,
) -> Report:
    """Write the folder. ``run`` describes the run (``id``, ``name``, ``host``, ``command``,
    ``order_operations`` …; it is copied into ``summary.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    last = max([int(math.ceil(elapsed_s)), *collector.seconds.keys(), *collector.book.seconds()])
    rows = build_timeline(collector, shape, last, tuple(run.get("order_operations", ("order",))))
    summary = build_summary(
        collector,
        shape,
        run,
        elapsed_s=elapsed_s,
        thresholds=thresholds,
        bounds=bounds,
        verdict=verdict,
        oracle_error=oracle_error,
        oracle_skipped=oracle_skipped,
        rows=rows,
    )
    summary["events"] = [
        {"t_from_t0_s": round(e.t - collector.start_epoch - shape.t0_s, 3), "what": e.what} for e in events
    ]
    files = ["summary.json", "timeline.csv", "latency-raw.hlog", "latency-corrected.hlog"]
    with open(folder / "timeline.csv", "w", newline="", encoding="utf-8") as f:
        if rows:
            fields = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    comment = f"run {run.get('id', '')} shape {shape.name} peak {shape.peak_rps:g}/s"
    write_log(folder / "latency-raw.hlog", collector.book, "raw", comment=comment)
    write_log(folder / "latency-corrected.hlog", collector.book, "corrected", comment=comment)
    charts: list[Chart] = []
    if plots and rows:
        event_marks = [(e.t - collector.start_epoch - shape.t0_s, e.what) for e in events]
        sold_out = summary["service"]["sold_out_at_s_from_t0"]
        frame, charts = run_charts(
            rows, shape, event_marks, sold_out, str(run.get("id", "")), bounds.max_cpu_percent
        )
        pngs = draw_pngs(charts, frame, folder / "plots")
        files += [f"plots/{p.name}" for p in pngs.values()]
        files.append("report.html")
    if collector.requests_path is not None:
        files.append(collector.requests_path.name)
    summary["files"] = files
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if charts:
        (folder / "report.html").write_text(_html(summary, figures(charts, frame, pngs)), encoding="utf-8")
    return Report(folder, summary, files)


def generator_health(summary: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """The figures behind "valid" (``slo.check_validity``): (figure, observed, bound, result)
    rows, result ``ok``/``FAIL`` against a bound or "" where a figure only informs. (A process
    that could not send its share is a reason of its own, not a figure.)"""
    gen, bounds = summary["generator"], summary["validity"].get("bounds", {})
    busy_bound, cpu_bound = (
        bounds.get("max_cpu_busy_ratio"),
        bounds.get("max_cpu_percent", RunValidity.max_cpu_percent),
    )

    def against(observed: float | None, bound: float | None) -> str:
        return "" if observed is None or bound is None else ("ok" if observed <= bound else "FAIL")

    out: list[tuple[str, str, str, str]] = []
    for proc, cpu_max in sorted(gen.get("cpu_max", {}).items()):
        busy = gen.get("cpu_busy_ratio", {}).get(proc, 0.0)
        machine = gen.get("machines", {}).get(proc, {})
        where = (
            f" ({machine.get('host', '?')}, {machine['cpus_usable']} cores)"
            if machine.get("cpus_usable")
            else ""
        )
        out.append((f"process {proc}{where}: CPU in its busiest second", f"{cpu_max:.0f} %", "", ""))
        out.append(
            (
                f"process {proc}: share of seconds above {cpu_bound:g} % CPU",
                f"{busy:.0%}",
                "" if busy_bound is None else f"≤ {busy_bound:.0%}",
                against(busy, busy_bound),
            )
        )
    ratios, arrivals = summary["ratios"], summary["arrivals"]
    dropped, dropped_bound = ratios.get("dropped_ratio"), bounds.get("max_dropped_ratio")
    out.append(
        (
            "arrivals dropped (no free slot)",
            f"{dropped or 0.0:.2%} ({arrivals['dropped']} of {arrivals['started'] + arrivals['dropped']})",
            "" if dropped_bound is None else f"≤ {dropped_bound:.0%}",
            against(dropped, dropped_bound),
        )
    )
    lag, lag_bound = gen.get("dispatch_lag") or {}, bounds.get("max_dispatch_lag_p99_ms")
    if lag.get("count"):
        out.append(
            (
                "arrival dispatcher waking late, p99 (p50, max)",
                f"{lag['p99_ms']:.1f} ms ({lag['p50_ms']:.1f}, {lag['max_ms']:.1f})",
                "" if lag_bound is None else f"≤ {lag_bound:g} ms",
                against(lag["p99_ms"], lag_bound),
            )
        )
    if gen.get("t0_skew_ms") is not None:
        out.append(("T0 rendezvous: spread between processes", f"{gen['t0_skew_ms']:.1f} ms", "", ""))
    out.append(
        ("latencies beyond the histograms' range (clamped)", str(gen.get("latency_clamped", 0)), "", "")
    )
    return out


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, head: bool = True) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{f'<thead><tr>{th}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>"


def _flat(figures: Mapping[str, Any], prefix: str = "") -> list[list[str]]:
    """A nested mapping as rows of (dotted name, value)."""
    rows: list[list[str]] = []
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flat(value, f"{name}.")
        else:
            rows.append(
                [name, json.dumps(value, default=str) if isinstance(value, list | Mapping) else str(value)]
            )
    return rows


def _figure_tables(log: Mapping[str, Any]) -> str:
    """The oracle's figures that come as a group (``Truth.figures`` entries that are
    mappings, e.g. flashsale's ``waiting_room``): one table each."""
    return "".join(
        f"<h2>{html.escape(key.replace('_', ' ').capitalize())} (from the oracle)</h2>"
        + _table(["figure", "value"], _flat(value))
        for key, value in log.items()
        if isinstance(value, Mapping) and value
    )


def _requests_html(summary: Mapping[str, Any]) -> str:
    """Requests and errors per request kind: how many, per second of the run, the busiest second."""
    throughput = summary["throughput"]
    return _table(
        ["request", "count", "per s", "busiest second", "errors", "errors per s"],
        [
            [
                "all",
                throughput["requests"],
                f"{throughput['requests_per_s']:.1f}",
                throughput["requests_per_s_peak"],
                throughput["errors"],
                f"{throughput['errors_per_s']:.2f}",
            ],
            *(
                [
                    name,
                    r["count"],
                    f"{r['per_s']:.1f}",
                    r["peak_per_s"],
                    r["errors"],
                    f"{r['errors_per_s']:.2f}",
                ]
                for name, r in summary["requests"].items()
            ),
        ],
    )


def _environment_html(summary: Mapping[str, Any]) -> str:
    """The machine the report was written on (and any other a load process ran on), the
    software's versions and the run's settings."""
    run = summary["run"]
    machine = summary.get("machine", {})
    memory = machine.get("memory_bytes")
    machine_rows = [
        ["host", machine.get("host", "")],
        ["OS", machine.get("os", "")],
        [
            "CPU",
            f"{machine.get('cpu') or machine.get('arch', '')}: {machine.get('cpus')} cores, {machine.get('cpus_usable')} usable by this process",
        ],
        *([["memory", f"{memory / 2**30:.1f} GiB"]] if memory else []),
        ["Python", machine.get("python", "")],
    ]
    others = {
        p: m
        for p, m in summary["generator"].get("machines", {}).items()
        if m.get("host") != machine.get("host")
    }
    machine_rows += [
        [f"load process {p}", f"{m.get('host')}: {m.get('cpus_usable')} cores usable"]
        for p, m in sorted(others.items())
    ]
    settings = run.get("settings") or {}
    return (
        "<h3>Machine (where the report was written)</h3>"
        + _table(["", ""], machine_rows, head=False)
        + "<h3>Versions</h3>"
        + _table(["software", "version"], sorted(summary.get("versions", {}).items()))
        + "<h3>Settings</h3>"
        + (
            _table(["option", "value"], sorted(settings.items()))
            if settings
            else "<p>not recorded (the report was not written by the kit's Locust plugin)</p>"
        )
    )


def _html(summary: Mapping[str, Any], charts: str) -> str:
    run, arr, ratios = summary["run"], summary["arrivals"], summary["ratios"]
    code = summary["exit_code"]
    colour = {0: "#1a7f37", 1: "#9a6700", 2: "#cf222e", 3: "#8250df"}.get(code, "#000")
    oracle = summary["oracle"]
    if "checks" in oracle:
        oracle_html = _table(
            ["check", "result", "observed", "detail"],
            [
                *(
                    [c["name"], "ok" if c["passed"] else "FAIL", c["observed"], c["detail"]]
                    for c in oracle["checks"]
                ),
                *([c["name"], "not judged", "—", c["detail"]] for c in oracle.get("not_judged", [])),
            ],
        )
    else:
        oracle_html = f"<p><strong>Not judged</strong> — {html.escape(str(oracle.get('skipped')))}</p>"
    slo_html = _table(
        ["threshold", "observed", "result"],
        [
            [
                t["threshold"],
                "—" if t["observed"] is None else f"{t['observed']:.4g}",
                "ok" if t["passed"] else "FAIL",
            ]
            for t in summary["slo"]["thresholds"]
        ],
    )
    lat = summary["latency"]
    lat_rows = []
    for name in lat["raw"]:
        for which in ("raw", "corrected"):
            s = lat[which][name]
            lat_rows.append(
                [
                    name,
                    which,
                    s["count"],
                    *(f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms", "max_ms")),
                    f"{s['mean_ms']:.1f}",
                ]
            )
    validity = summary["validity"]
    ratio = ratios.get("arrival_ratio")
    windows = _table(
        ["window", "target", "sent", "dropped"],
        [[w["name"], w["target"], w["started"], w["dropped"]] for w in arr["windows"]],
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(str(run.get("name", "")))} drill {html.escape(str(run.get("id", "")))}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1060px;margin:2em auto;color:#1f2328}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #d0d7de;padding:3px 8px;font-size:13px;text-align:left}}
.verdict{{font-size:1.3em;font-weight:600;color:{colour}}}figure{{margin:1em 0}}img{{max-width:100%}}
figcaption{{font-size:12px;color:#57606a}}.hint{{font-size:13px;color:#57606a}}
.chart-title{{font-size:14px;font-weight:600;margin:1.2em 0 .3em}}
.chart .u-legend{{font-size:12px;text-align:left;margin:0}}.chart .u-legend td,.chart .u-legend th{{border:0;padding:1px 4px}}
details summary{{font-size:12px;color:#57606a;cursor:pointer}}
</style>
{page_assets()}</head><body>
<h1>{html.escape(str(run.get("name", "")))} drill: {html.escape(run["shape"])} at {run["peak_rps"]:g} arrivals/s peak</h1>
<p class="verdict">exit {code}: {html.escape(summary["exit_meaning"])}</p>
<p>Run {html.escape(str(run.get("id", "")))} against {html.escape(str(run.get("host", "")))};
{len(run.get("processes", []))} load process(es); {run["elapsed_s"]:.0f} s.
Command: <code>{html.escape(str(run.get("command", "")))}</code></p>
<h2>Invariants (the oracle: the backend's truth against what clients were told)</h2>{oracle_html}
{_figure_tables(oracle.get("log") or {})}
<h2>SLO thresholds</h2>{slo_html}
<h2>Validity of the run</h2><p>{"valid" if validity["valid"] else "INVALID"}</p>
<ul>{"".join(f"<li>{html.escape(r)}</li>" for r in validity["reasons"])}</ul>
<p>The load generator's health, the figures behind that word:</p>{_table(["figure", "observed", "bound", "result"], generator_health(summary))}
<h2>Arrivals</h2><p>target {arr["target"]}, sent {arr["started"]}, dropped {arr["dropped"]}
(achieved/target {"—" if ratio is None else f"{ratio:.3f}"})</p>{windows}
<h2>Requests</h2>{_requests_html(summary)}
<h2>Latency (ms)</h2>{_table(["request", "kind", "count", "p50", "p90", "p95", "p99", "p99.9", "max", "mean"], lat_rows)}
<h2>The run in charts</h2>
<p class="hint">Drag across a chart to zoom into those seconds (every chart follows); double-click to zoom out.
Hover to read each series at that second; click a legend entry to hide it. Each chart's PNG is below it and in <code>plots/</code>.</p>
{charts}
<h2>The run's machine, versions and settings</h2>{_environment_html(summary)}
<p>Files: {", ".join(html.escape(f) for f in summary.get("files", []))}</p>
</body></html>
"""


# -- the console -------------------------------------------------------------------------------
def _dots(label: str, width: int = 38) -> str:
    return f"{label} " + "." * max(width - len(label) - 1, 2)


def latency_lines(summary: Mapping[str, Any], indent: str = "  ") -> list[str]:
    """The latency table, k6's columns and HdrHistogram's: p50/p90/p95/p99/p99.9, max, mean
    (ms), raw and corrected per request kind."""
    lat = summary["latency"]
    head = "".join(f"{h:>8}" for h in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean"))
    out = [f"{indent}{'latency ms':<26}{head}   count"]
    for name in lat["raw"]:
        for which in ("raw", "corrected"):
            x = lat[which][name]
            cells = "".join(
                f"{x[k]:>8.1f}"
                for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms", "max_ms", "mean_ms")
            )
            out.append(f"{indent}{name + ' ' + which:<26}{cells}   {x['count']}")
    return out


def format_console(summary: Mapping[str, Any], folder: Path | None = None) -> str:
    """The end-of-run summary for a terminal, k6-style: a ✓/✗ line per invariant check and per
    threshold, validity with the generator's figures behind it, arrivals, requests and errors
    per second, latency (p50/p90/p95/p99/p99.9, max, mean), and the verdict with its exit code."""
    run, oracle = summary["run"], summary["oracle"]
    out = [
        "",
        f"  {run.get('name', '')} drill {run.get('id', '')}: {run['shape']} at {run['peak_rps']:g} arrivals/s peak, "
        f"{len(run.get('processes', []))} process(es), {run['elapsed_s']:.0f} s",
        "",
        "  invariants (the oracle)",
    ]
    if "checks" in oracle:
        for c in oracle["checks"]:
            mark = "✓" if c["passed"] else "✗"
            detail = f"  {str(c['detail'])[:100]}" if c["detail"] else ""
            out.append(f"    {mark} {_dots(c['name'])} {c['observed']}{detail}")
        for c in oracle.get("not_judged", []):
            out.append(
                f"    - {_dots(c['name'])} not judged: {str(c['detail']).removeprefix('not judged: ')[:100]}"
            )
    else:
        out.append(f"    - {oracle.get('skipped')}")
    out += ["", "  thresholds"]
    for t in summary["slo"]["thresholds"]:
        observed = "no samples" if t["observed"] is None else f"{t['observed']:.4g}"
        out.append(f"    {'✓' if t['passed'] else '✗'} {_dots(t['threshold'])} {observed}")
    validity = summary["validity"]
    out += ["", f"  run validity: {'valid' if validity['valid'] else 'INVALID'}"]
    out += [f"    ✗ {r}" for r in validity["reasons"]]
    for figure, observed, bound, result in generator_health(summary):
        mark = {"ok": "✓", "FAIL": "✗"}.get(result, "-")
        out.append(f"    {mark} {_dots(figure, 56)} {observed}" + (f" (bound {bound})" if bound else ""))
    arr, ratios = summary["arrivals"], summary["ratios"]
    ratio = ratios.get("arrival_ratio")
    out.append(
        f"  arrivals: target {arr['target']:.0f}, sent {arr['started']}, dropped {arr['dropped']}"
        + (f" (achieved/target {ratio:.3f})" if ratio is not None else "")
    )
    tp = summary["throughput"]
    out.append(
        f"  requests: {tp['requests']} ({tp['requests_per_s']:.1f}/s, busiest second {tp['requests_per_s_peak']}), "
        f"errors: {tp['errors']} ({tp['errors_per_s']:.2f}/s, busiest second {tp['errors_per_s_peak']})"
    )
    out += latency_lines(summary)
    verdict = summary["exit_meaning"]
    if summary["exit_code"] == exit_codes.INVARIANT_VIOLATED and "checks" in oracle:
        failed = [c["name"].upper() for c in oracle["checks"] if not c["passed"]]
        verdict = f"INVARIANT VIOLATED: {', '.join(failed)}"
    out += ["", f"  VERDICT  exit {summary['exit_code']}: {verdict}"]
    if folder is not None:
        out.append(f"  report: {folder}")
    return "\n".join(out) + "\n"
