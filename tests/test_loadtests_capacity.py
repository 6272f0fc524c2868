"""`flashsale capacity`'s reading of a capacity_step drill, its plan, and the CLI's flags."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest

from flashsale.drills.cli import register
from loadtests.capacity import PUBLISHED_PEAKS, CapacityLimits, plan_for, read_steps, sustained


def _window(
    name: str, rps: float, p99: float, errors: int = 0, sent: float = 1.0, dropped: int = 0
) -> dict[str, Any]:
    target = rps * 20
    return {
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
