"""`flashsale capacity`'s reading of a capacity_step drill, its plan, and the CLI's flags."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
from report_support import two_kinds

from flashsale.drills.cli import register
from loadtests.capacity import PUBLISHED_PEAKS, CapacityLimits, plan_for, read_steps, sustained
from loadtests.report import build_summary


def _window(
    name: str,
    rps: float,
    p99: float,
    errors: int = 0,
    sent: float = 1.0,
    dropped: int = 0,
    cpu: float | None = None,
) -> dict[str, Any]:
    target = rps * 20
    more = {} if cpu is None else {"generator_cpu_max": cpu}
    return {
        **more,
        "name": name,
        "start_s": 0.0,
        "end_s": 20.0,
        "target": target,
        "started": int(target * sent),
        "dropped": dropped,
        "requests": int(target * 2),
        "orders": int(target),
        "errors": errors,
        "latency_corrected": {"p99_ms": p99},
    }


def test_sustained_is_the_highest_step_within_the_slo_with_all_below_it() -> None:
    summary = {
        "arrivals": {
            "windows": [
                _window("s1", 100, 20),
                _window("s2", 200, 40),
                _window("s3", 300, 1500),
                _window("s4", 400, 100),  # back under the SLO after a miss: not trusted
            ]
        }
    }
    steps = read_steps(summary, CapacityLimits(p99_corrected_ms=1000))
    assert [s.within_slo for s in steps] == [True, True, False, True]
    assert "p99 corrected 1500 ms" in steps[2].why_not
    best = sustained(steps)
    assert best is not None and best.name == "s2" and best.orders_per_s == pytest.approx(200)


@pytest.mark.parametrize(
    "kw,why", [({"errors": 100}, "errors"), ({"sent": 0.5}, "sent only"), ({"dropped": 80}, "dropped")]
)
def test_other_slo_limits(kw: dict[str, Any], why: str) -> None:
    (step,) = read_steps({"arrivals": {"windows": [_window("s", 100, 10, **kw)]}})
    assert not step.within_slo and why in step.why_not


def test_a_failed_step_names_what_limited_it() -> None:
    # An SRE reading the steps must not have to guess whether the service or the load
    # generator ran out: the step that missed says which, with the generator's busiest second.
    service, generator, unknown = read_steps(
        {
            "arrivals": {
                "windows": [
                    _window("s1", 400, 1500, cpu=38.0),
                    _window("s2", 800, 1500, sent=0.8, cpu=97.0),
                    _window("s3", 900, 1500),  # a summary written before the CPU was kept
                ]
            }
        }
    )
    assert service.generator_cpu_max == 38.0
    assert service.limited_by == "service"
    assert "limited by the service" in service.why_not and "38% of a core" in service.why_not
    assert generator.limited_by == "load generator"
    assert "limited by the load generator" in generator.why_not and "--locust-workers" in generator.why_not
    assert unknown.limited_by == "" and "limited by" not in unknown.why_not
    (fine,) = read_steps({"arrivals": {"windows": [_window("s", 100, 10, cpu=20.0)]}})
    assert fine.within_slo and fine.limited_by == "" and fine.why_not == ""


def test_the_summary_keeps_each_windows_busiest_generator_second() -> None:
    # What read_steps judges the limit by: per window, the busiest second of the busiest
    # load process (report_support's processes sample 40 + s % in second s).
    collector, shape, _ = two_kinds()
    summary = build_summary(collector, shape, {"id": "c1"}, elapsed_s=12.0, thresholds=[])
    windows = summary["arrivals"]["windows"]
    assert windows
    for w in windows:
        seconds = range(int(math.floor(w["start_s"])), min(int(math.ceil(w["end_s"])), 12))
        assert w["generator_cpu_max"] == (max(40.0 + s for s in seconds) if seconds else None)


def test_plan_for_the_published_peaks() -> None:
    plan = plan_for(PUBLISHED_PEAKS["2020"], 1_000.0)
    assert plan.service_processes == 583
    assert plan.redis_shards == math.ceil(583_000 * 2 / 34_000)
    assert any("34,000" in a for a in plan.assumptions)
    with pytest.raises(ValueError, match="lower --peak-rps"):
        plan_for(50_000, 0.0)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashsale")
    register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def test_rehearse_flags() -> None:
    from flashsale.drills.cli import _settings

    args = _parse(
        "rehearse",
        "--peak-rps",
        "80",
        "--duration",
        "30",
        "--locust-workers",
        "2",
        "--",
        "--personas",
        "buyer=1",
    )
    assert args.func.__name__ == "_rehearse" and args.duration == 30
    s = _settings(args, shape="midnight_surge", time_scale=args.duration / 75)
    assert (s.peak_rps, s.locust_workers, s.locust_args) == (80.0, 2, ("--personas", "buyer=1"))
    assert _parse("capacity").peak_rps == 600.0
