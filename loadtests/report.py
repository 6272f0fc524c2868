"""The report folder: ``summary.json`` (schema-versioned), ``timeline.csv`` (one row per
second), HdrHistogram logs (``latency-raw.hlog``, ``latency-corrected.hlog``), ``requests.jsonl``
(the merged history, ``loadtests.history/1``, written during the run), ``plots/*.png`` and
``report.html`` with the plots embedded — and the end-of-run table on the console, k6-style.

The plots tell the run's story to someone who was not watching; each is drawn only when
its data exists:

1. arrivals the shape asked for vs arrivals sent (and dropped) — did the generator keep up;
2. latency percentiles over time, raw and corrected for coordinated omission;
3. orders per second by outcome (created, replayed, each refusal's code, unknown) — when
   the run has order operations;
4. stock remaining per item, with the sold-out moments and the drill's actions marked —
   when a sampler reported stock;
5. a queue's backlog and its writer's rate — when a sampler reported them.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import exit_codes
from loadtests.history import HISTORY_FORMAT
from loadtests.latency import INTERVAL_SIGNIFICANT_FIGURES, merge, summarize, write_log
from loadtests.recording import RunCollector, ServiceSample
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
    "order_columns",
    "write_report",
]

SCHEMA = "flashsale.drill.summary"
#: 2: the oracle section is the kit's verdict (``not_judged``, ``drained``, ``evidence`` — flashsale's
#: audit moved to ``evidence.audit``), ``run.sampler_errors`` (was ``stats_errors``), ``request_log.format``.
SCHEMA_VERSION = 2
CPU_BUSY_PERCENT = 90.0

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
        row["p50_ms"] = raw.get_value_at_percentile(50) / 1000 if raw.get_total_count() else ""
        row["p99_ms"] = raw.get_value_at_percentile(99) / 1000 if raw.get_total_count() else ""
        row["p99_corrected_ms"] = (
            corrected.get_value_at_percentile(99) / 1000 if corrected.get_total_count() else ""
        )
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
        rows.append(row)
    return rows


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
    for name in [n for n in names if n != "all"]:
        outcomes = {k[len(f"out.{name}.") :]: v for k, v in totals.items() if k.startswith(f"out.{name}.")}
        per_name[name] = {
            "count": totals.get(f"req.{name}", 0),
            "errors": totals.get(f"err.{name}", 0),
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
            }
        )
    cpu_max = {p: max(v.values(), default=0.0) for p, v in collector.cpu.items()}
    cpu_busy = {
        p: (sum(1 for x in v.values() if x > CPU_BUSY_PERCENT) / len(v)) if v else 0.0
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
    summary["validity"] = validity.as_dict()
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


# -- plots -----------------------------------------------------------------------------------
def _plots(
    rows: Sequence[Mapping[str, Any]],
    shape: Shape,
    events: Sequence[tuple[float, str]],
    sold_out: Mapping[str, list[float]],
    out: Path,
    run_id: str = "",
) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    x = [r["t_from_t0_s"] for r in rows]
    label_x = "seconds from the opening (T0)" if shape.t0_s else "seconds from the start"

    def num(key: str) -> list[float]:
        return [float(r[key]) if r.get(key, "") != "" else math.nan for r in rows]

    def decorate(ax: Any, title: str, ylabel: str) -> None:
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel(label_x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        for w in shape.windows:
            if w.kind == "countdown":
                ax.axvspan(w.start - shape.t0_s, w.end - shape.t0_s, color="0.92", zorder=0)
        if shape.t0_s:
            ax.axvline(0, color="k", lw=0.8, ls="--")
        for t, what in events:
            ax.axvline(t, color="tab:purple", lw=0.8, ls=":")
            ax.annotate(
                what,
                (t, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="tab:purple",
                rotation=90,
                va="top",
                ha="right",
            )

    made: list[tuple[str, Path]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append((caption, path))

    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.step(x, num("target_arrivals"), where="post", label="target (shape)", color="0.55", lw=4, alpha=0.6)
    ax.step(
        x, num("arrivals_started"), where="post", label="sent (by intended second)", color="tab:blue", lw=1.2
    )
    dropped = num("arrivals_dropped")
    if any(v > 0 for v in dropped if not math.isnan(v)):
        ax.bar(
            x, dropped, width=1.0, align="edge", color="tab:red", alpha=0.6, label="dropped (no free slot)"
        )
    decorate(ax, "Arrivals per second: what the shape asked for vs what was sent", "arrivals / s")
    for w in shape.windows:  # name the shape's windows along the top
        ax.annotate(
            w.name,
            (w.start - shape.t0_s, 0.99),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="0.35",
            va="top",
            ha="left",
        )
    if shape.t0_s:
        ax.annotate(" T0 rendezvous", (0, 0.86), xycoords=("data", "axes fraction"), fontsize=8, ha="left")
    ax.legend(loc="upper right", fontsize=8)
    save(fig, "arrivals", "Target vs achieved arrivals (grey band: countdown before T0)")

    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(x, num("p50_ms"), label="p50 raw", color="tab:blue", lw=1)
    ax.plot(x, num("p99_ms"), label="p99 raw", color="tab:orange", lw=1.2)
    ax.plot(
        x, num("p99_corrected_ms"), label="p99 corrected (from intended send time)", color="tab:red", lw=1.2
    )
    ax.set_yscale("log")
    decorate(ax, "Latency percentiles per second (by completion time)", "ms (log scale)")
    ax.legend(loc="upper right", fontsize=8)
    save(fig, "latency", "Latency percentiles over time, raw and corrected for coordinated omission")

    buckets = [k[len("orders_") :] for k in (rows[0].keys() if rows else []) if k.startswith("orders_")]
    if buckets:
        colours = {"created": "tab:green", "replayed": "tab:olive", "ok": "tab:green", "unknown": "tab:red"}
        refusal_colours = iter(
            ["tab:orange", "tab:brown", "0.6", "tab:pink", "tab:cyan", "tab:purple", "0.3"]
        )
        fig, ax = plt.subplots(figsize=(10, 3.6))
        bottom = [0.0] * len(rows)
        for name in buckets:
            vals = [float(r[f"orders_{name}"]) for r in rows]
            colour = colours.get(name) or next(refusal_colours, None)
            ax.bar(
                x, vals, width=1.0, align="edge", bottom=bottom, color=colour, label=name.replace("_", " ")
            )
            bottom = [b + v for b, v in zip(bottom, vals)]
        decorate(ax, "Orders per second by outcome", "orders / s")
        ax.legend(loc="upper right", fontsize=8, ncol=2)
        save(fig, "orders", "Order answers per second by outcome")

    stock_keys = [k for k in (rows[0].keys() if rows else []) if k.startswith("available_")]
    if stock_keys:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for key in stock_keys:
            sku = key[len("available_") :]
            label = sku.removesuffix(f"-{run_id}") if run_id else sku  # per-run item names carry the run id
            (line,) = ax.plot(x, num(key), label=label, lw=1.4)
            for k, t in enumerate(sold_out.get(sku, [])):
                ax.plot([t], [0], marker="v", color=line.get_color(), ms=9)
                if k == 0:  # later ones are lapsed holds sold again: the marker is enough
                    ax.annotate(
                        f"{label} sold out",
                        (t, 0),
                        textcoords="offset points",
                        xytext=(3, 8),
                        fontsize=7,
                        color=line.get_color(),
                    )
        ax.set_yscale("symlog", linthresh=10)
        ax.legend(loc="upper right", fontsize=8)
        decorate(
            ax,
            "Stock available per item (▼ sold out; stock can come back, e.g. as unpaid holds lapse)",
            "units (symlog)",
        )
        save(fig, "stock", "Stock remaining per item, with sold-out moments and the run's actions")

    backlog, rate = num("backlog"), num("writer_rows_per_s")
    if any(not math.isnan(v) for v in backlog + rate):
        fig, ax = plt.subplots(figsize=(10, 3.6))
        ax.plot(x, backlog, label="backlog: entries not yet recorded", color="tab:purple", lw=1.4)
        ax2 = ax.twinx()
        ax2.step(x, rate, where="post", label="orders recorded / s", color="tab:green", lw=1)
        ax2.set_ylabel("orders recorded / s")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
        decorate(ax, "Queue: backlog and writer rate", "entries")
        save(fig, "queue", "Queue backlog and writer rate: the peak shaved into the database")
    return made


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
    images: list[tuple[str, Path]] = []
    if plots and rows:
        event_marks = [(e.t - collector.start_epoch - shape.t0_s, e.what) for e in events]
        images = _plots(
            rows,
            shape,
            event_marks,
            summary["service"]["sold_out_at_s_from_t0"],
            folder / "plots",
            str(run.get("id", "")),
        )
        files += [f"plots/{p.name}" for _, p in images]
        files.append("report.html")
    if collector.requests_path is not None:
        files.append(collector.requests_path.name)
    summary["files"] = files
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if images:
        (folder / "report.html").write_text(_html(summary, images), encoding="utf-8")
    return Report(folder, summary, files)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


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


def _html(summary: Mapping[str, Any], images: Sequence[tuple[str, Path]]) -> str:
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
                    *(f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")),
                ]
            )
    validity = summary["validity"]
    ratio = ratios.get("arrival_ratio")
    plots = "".join(
        f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, p in images
    )
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
figcaption{{font-size:12px;color:#57606a}}
</style></head><body>
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
<h2>Arrivals</h2><p>target {arr["target"]}, sent {arr["started"]}, dropped {arr["dropped"]}
(achieved/target {"—" if ratio is None else f"{ratio:.3f}"})</p>{windows}
<h2>Latency (ms)</h2>{_table(["request", "kind", "count", "p50", "p90", "p99", "p99.9", "max"], lat_rows)}
<h2>The run in plots</h2>{plots}
<p>Files: {", ".join(html.escape(f) for f in summary.get("files", []))}</p>
</body></html>
"""


# -- the console -------------------------------------------------------------------------------
def _dots(label: str, width: int = 38) -> str:
    return f"{label} " + "." * max(width - len(label) - 1, 2)


def format_console(summary: Mapping[str, Any], folder: Path | None = None) -> str:
    """The end-of-run summary for a terminal, k6-style: a ✓/✗ line per invariant check and per
    threshold, validity, arrivals, latency, and the verdict with its exit code."""
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
    arr, ratios = summary["arrivals"], summary["ratios"]
    ratio = ratios.get("arrival_ratio")
    out.append(
        f"  arrivals: target {arr['target']:.0f}, sent {arr['started']}, dropped {arr['dropped']}"
        + (f" (achieved/target {ratio:.3f})" if ratio is not None else "")
    )
    lat = summary["latency"]
    out.append(f"  {'latency ms':<26}{'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>9}   count")
    for name in lat["raw"]:
        for which in ("raw", "corrected"):
            x = lat[which][name]
            out.append(
                f"  {name + ' ' + which:<26}{x['p50_ms']:>8.1f}{x['p90_ms']:>8.1f}{x['p99_ms']:>8.1f}"
                f"{x['p99.9_ms']:>8.1f}{x['max_ms']:>9.1f}   {x['count']}"
            )
    verdict = summary["exit_meaning"]
    if summary["exit_code"] == exit_codes.INVARIANT_VIOLATED and "checks" in oracle:
        failed = [c["name"].upper() for c in oracle["checks"] if not c["passed"]]
        verdict = f"INVARIANT VIOLATED: {', '.join(failed)}"
    out += ["", f"  VERDICT  exit {summary['exit_code']}: {verdict}"]
    if folder is not None:
        out.append(f"  report: {folder}")
    return "\n".join(out) + "\n"
