"""SLO thresholds, k6-style, and whether the run measured the service at all.

A threshold is ``METRIC[{name:REQUEST}]:EXPR``, e.g.::

    latency:p(99)<500                 raw p99 of every request, ms
    latency_corrected:p(99)<1000      the same, corrected for coordinated omission
    latency{name:order}:p(99.9)<800   only orders
    error_ratio:rate<0.01             unexpected answers / requests
    arrival_ratio:value>0.95          arrivals started / arrivals the shape asked for
    dropped_ratio:rate<0.01           arrivals dropped / arrivals the shape asked for

Aggregations: ``p(N)``, ``max``, ``avg``, ``med`` for latencies; ``rate``/``value`` for
ratios; ``count`` for either. Operators: ``<``, ``<=``, ``>``, ``>=``, ``==``.

Validity is separate: a run in which the load generator could not keep up (a Locust
process above ~90 % CPU for a good part of the run, too many dropped arrivals, or the
dispatcher waking far behind schedule) is **invalid** — its figures describe the generator.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_THRESHOLDS",
    "RunValidity",
    "Threshold",
    "ThresholdResult",
    "Validity",
    "check_validity",
    "evaluate",
    "parse_slo",
    "parse_threshold",
]

#: What a healthy service met in rehearsals on a 2-core machine shared with Redis,
#: PostgreSQL and Locust, T0 rendezvous included (docs/rehearsal.md); tighten for real hardware.
DEFAULT_THRESHOLDS: tuple[str, ...] = (
    "latency:p(99)<1000",
    "latency_corrected:p(99)<1500",
    "error_ratio:rate<0.01",
    "arrival_ratio:value>0.95",
    "dropped_ratio:rate<0.01",
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_RE = re.compile(
    r"^\s*(?P<metric>[a-z_]+)(?:\{name:(?P<name>[\w.-]+)\})?\s*:\s*"
    r"(?P<agg>p\(\s*[0-9.]+\s*\)|max|avg|med|rate|value|count)\s*"
    r"(?P<op><=|>=|==|<|>)\s*(?P<limit>-?[0-9.]+(?:e-?[0-9]+)?)\s*$"
)
_LATENCY = {"latency": "raw", "latency_corrected": "corrected"}
_RATIOS = ("error_ratio", "arrival_ratio", "dropped_ratio")


@dataclass(frozen=True)
class Threshold:
    text: str
    metric: str
    name: str
    agg: str
    op: str
    limit: float


def parse_threshold(text: str) -> Threshold:
    m = _RE.match(text)
    if not m or (m["metric"] not in _LATENCY and m["metric"] not in _RATIOS):
        raise ValueError(
            f"bad threshold {text!r}: write METRIC[{{name:REQUEST}}]:AGG OP VALUE, e.g. 'latency:p(99)<500'; "
            f"metrics: {', '.join([*_LATENCY, *_RATIOS])}"
        )
    agg = m["agg"].replace(" ", "")
    if m["metric"] in _RATIOS and agg not in ("rate", "value", "count"):
        raise ValueError(f"bad threshold {text!r}: {m['metric']} takes rate, value or count")
    if m["metric"] in _LATENCY and agg in ("rate", "value"):
        raise ValueError(f"bad threshold {text!r}: latencies take p(N), max, avg, med or count")
    return Threshold(text.strip(), m["metric"], m["name"] or "all", agg, m["op"], float(m["limit"]))


def parse_slo(text: str, *, percentiles: Sequence[float] = ()) -> list[Threshold]:
    """Every threshold of a ``--slo`` value (``;``- or newline-separated), parsed: a
    ValueError names the first bad one. With ``percentiles`` (those the run will record),
    a ``p(N)`` the report cannot show is refused too — before a run, not after it."""
    thresholds = [parse_threshold(t) for t in text.replace("\n", ";").split(";") if t.strip()]
    for t in thresholds:
        if percentiles and t.agg.startswith("p(") and float(t.agg[2:-1]) not in percentiles:
            recorded = ", ".join(f"p({p:g})" for p in percentiles)
            raise ValueError(f"bad threshold {t.text!r}: only {recorded} are recorded in the summary")
    return thresholds


@dataclass(frozen=True)
class ThresholdResult:
    threshold: str
    observed: float | None
    passed: bool
    detail: str = ""


def _observe(t: Threshold, summary: Mapping[str, Any]) -> float | None:
    if t.metric in _LATENCY:
        lat = summary.get("latency", {}).get(_LATENCY[t.metric], {}).get(t.name)
        if not lat or not lat.get("count"):
            return None
        if t.agg == "count":
            return float(lat["count"])
        if t.agg.startswith("p("):
            key = f"p{float(t.agg[2:-1]):g}_ms"
            if key not in lat:
                raise ValueError(
                    f"{t.text}: only p(50), p(90), p(95), p(99) and p(99.9) are recorded in the summary"
                )
            return float(lat[key])
        return float(lat["p50_ms" if t.agg == "med" else ("mean_ms" if t.agg == "avg" else "max_ms")])
    ratios = summary.get("ratios", {})
    if t.agg == "count":
        return float(ratios.get(f"{t.metric}_count", 0))
    value = ratios.get(t.metric)
    return None if value is None else float(value)


def evaluate(thresholds: Sequence[str | Threshold], summary: Mapping[str, Any]) -> list[ThresholdResult]:
    """Each threshold against a run summary (``report.build_summary``'s dict)."""
    results = []
    for item in thresholds:
        t = parse_threshold(item) if isinstance(item, str) else item
        observed = _observe(t, summary)
        if observed is None:
            results.append(ThresholdResult(t.text, None, False, "no samples: nothing to judge"))
            continue
        results.append(ThresholdResult(t.text, observed, _OPS[t.op](observed, t.limit)))
    return results


@dataclass(frozen=True)
class RunValidity:
    """Bounds beyond which the load generator, not the service, set the pace."""

    max_cpu_percent: float = 90.0
    #: Share of a process's seconds allowed above ``max_cpu_percent``.
    max_cpu_busy_ratio: float = 0.1
    max_dropped_ratio: float = 0.05
    max_dispatch_lag_p99_ms: float = 500.0


@dataclass(frozen=True)
class Validity:
    valid: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_validity(summary: Mapping[str, Any], bounds: RunValidity = RunValidity()) -> Validity:
    reasons: list[str] = []
    gen = summary.get("generator", {})
    for proc, failure in sorted((gen.get("failures") or {}).items()):
        reasons.append(f"Locust process {proc} could not send its share: {failure}")
    for proc, busy in sorted((gen.get("cpu_busy_ratio") or {}).items()):
        if busy > bounds.max_cpu_busy_ratio:
            reasons.append(
                f"Locust process {proc} was above {bounds.max_cpu_percent:g}% CPU for {busy:.0%} of the run "
                f"(bound {bounds.max_cpu_busy_ratio:.0%}): add Locust processes (--locust-workers) or lower --peak-rps"
            )
    dropped = summary.get("ratios", {}).get("dropped_ratio")
    if dropped is not None and dropped > bounds.max_dropped_ratio:
        reasons.append(
            f"{dropped:.1%} of arrivals were dropped (bound {bounds.max_dropped_ratio:.0%}): the generator had no free "
            "slot; raise --max-in-flight or add Locust processes"
        )
    lag = (gen.get("dispatch_lag") or {}).get("p99_ms")
    if lag is not None and lag > bounds.max_dispatch_lag_p99_ms:
        reasons.append(
            f"the arrival dispatcher woke {lag:.0f} ms late at p99 (bound {bounds.max_dispatch_lag_p99_ms:g} ms): "
            "the Locust process is starved of CPU"
        )
    return Validity(not reasons, tuple(reasons))
