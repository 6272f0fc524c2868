"""What a ``capacity_step`` drill says about this machine, and what a given peak would need.

The highest step that stayed within the SLO (corrected p99, error ratio, achieved arrival
ratio, no dropped arrivals beyond a bound) is the sustained rate. A step that missed says
what limited it: the load generator (its busiest second near a full core, or arrivals it
could not send) or the service (the SLO missed while the generator had room to spare). Divided by the service
processes that served it, it gives a rate per process; a plan for a target peak follows,
with its assumptions spelled out (it is an extrapolation, not a measurement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PUBLISHED_PEAKS",
    "CapacityLimits",
    "CapacityPlan",
    "StepResult",
    "plan_for",
    "read_steps",
    "sustained",
]

#: Published Double 11 peaks (orders created per second), for the plan's examples.
PUBLISHED_PEAKS: dict[str, float] = {"2013": 50_000.0, "2020": 583_000.0}
#: The engine's reserve script costs ~29 µs of Redis CPU (idempotency record, hold, deadline
#: and event included; INFO commandstats in `python -m benchmarks --only inventory`), so one
#: Redis core runs about 34,000 of them a second — not the 85,000/s of a trivial EVALSHA.
ENGINE_CALLS_PER_REDIS_CORE = 34_000.0


@dataclass(frozen=True)
class CapacityLimits:
    p99_corrected_ms: float = 1000.0
    max_error_ratio: float = 0.01
    min_arrival_ratio: float = 0.95
    max_dropped_ratio: float = 0.01
    #: A load process at or above this share of one core (its busiest second) in a step
    #: measured itself, not the service (the rehearsal's validity bound).
    generator_saturated_percent: float = 90.0


@dataclass(frozen=True)
class StepResult:
    name: str
    target_rps: float
    sent_rps: float
    orders_per_s: float
    requests_per_s: float
    p99_corrected_ms: float
    error_ratio: float
    dropped_ratio: float
    within_slo: bool
    why_not: str
    #: The busiest second of the busiest load process in the step, % of one core (None: not kept).
    generator_cpu_max: float | None = None
    #: What ran out in a step that missed: "service", "load generator", or "" (within the SLO,
    #: or the generator's CPU was not kept so it cannot be told).
    limited_by: str = ""


def read_steps(summary: Mapping[str, Any], limits: CapacityLimits = CapacityLimits()) -> list[StepResult]:
    """One result per stair of a capacity_step drill's ``summary.json``."""
    out = []
    for w in summary["arrivals"]["windows"]:
        length = w["end_s"] - w["start_s"]
        target_rps = w["target"] / length
        scheduled = w["started"] + w["dropped"]
        requests = w.get("requests", 0)
        p99 = float(w["latency_corrected"]["p99_ms"])
        error_ratio = w.get("errors", 0) / requests if requests else 1.0
        dropped_ratio = w["dropped"] / scheduled if scheduled else 1.0
        arrival_ratio = w["started"] / w["target"] if w["target"] else 0.0
        why = []
        if p99 > limits.p99_corrected_ms:
            why.append(f"p99 corrected {p99:.0f} ms > {limits.p99_corrected_ms:g}")
        if error_ratio > limits.max_error_ratio:
            why.append(f"errors {error_ratio:.1%}")
        if arrival_ratio < limits.min_arrival_ratio:
            why.append(f"sent only {arrival_ratio:.0%} of the target")
        if dropped_ratio > limits.max_dropped_ratio:
            why.append(f"dropped {dropped_ratio:.1%}")
        cpu = w.get("generator_cpu_max")
        limited_by = ""
        if why and cpu is not None:
            if cpu >= limits.generator_saturated_percent:
                limited_by = "load generator"
                why.append(
                    f"limited by the load generator ({cpu:.0f}% of a core in its busiest second: "
                    "add --locust-workers or a machine)"
                )
            else:
                limited_by = "service"
                why.append(
                    f"limited by the service and its databases (load generator at most {cpu:.0f}% of a core)"
                )
        out.append(
            StepResult(
                w["name"],
                target_rps,
                w["started"] / length,
                w.get("orders", 0) / length,
                requests / length,
                p99,
                error_ratio,
                dropped_ratio,
                not why,
                "; ".join(why),
                None if cpu is None else float(cpu),
                limited_by,
            )
        )
    return out


def sustained(steps: Sequence[StepResult]) -> StepResult | None:
    """The highest step within the SLO, provided every step below it was within too."""
    best = None
    for step in steps:
        if not step.within_slo:
            break
        best = step
    return best


@dataclass(frozen=True)
class CapacityPlan:
    peak_orders_per_s: float
    orders_per_s_per_process: float
    service_processes: int
    redis_shards: int
    assumptions: tuple[str, ...]


def plan_for(
    peak_orders_per_s: float,
    orders_per_s_per_process: float,
    *,
    lua_calls_per_order: float = 2.0,
    redis_calls_per_shard: float = ENGINE_CALLS_PER_REDIS_CORE,
) -> CapacityPlan:
    if orders_per_s_per_process <= 0:
        raise ValueError(
            "no sustained rate to plan from: the first step already missed the SLO; lower --peak-rps"
        )
    return CapacityPlan(
        peak_orders_per_s,
        orders_per_s_per_process,
        math.ceil(peak_orders_per_s / orders_per_s_per_process),
        max(1, math.ceil(peak_orders_per_s * lua_calls_per_order / redis_calls_per_shard)),
        (
            "service processes scale linearly, one per core, each as fast as here (the load generator, Redis and "
            "PostgreSQL shared this machine's cores during the measurement, so this is conservative per process)",
            f"each order costs about {lua_calls_per_order:g} engine script calls in Redis (reserve, then pay or "
            "expire), each counted at the reserve script's cost (the closing scripts cost less: conservative)",
            f"one Redis shard (core) runs about {redis_calls_per_shard:,.0f} engine script calls/s (~29 µs of Redis "
            "CPU each, measured on this project's machines with python -m benchmarks --only inventory)",
            "a hot SKU is split into buckets across shards (hot-SKU buckets) so its load spreads like the rest",
            "PostgreSQL keeps up through the queue (peak shaving): it needs the average rate, not the peak",
        ),
    )
