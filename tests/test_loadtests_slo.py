"""k6-style thresholds, run validity and the drill's exit codes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from loadtests import exit_codes
from loadtests.slo import DEFAULT_THRESHOLDS, RunValidity, check_validity, evaluate, parse_threshold


def _summary(
    p99: float = 120.0,
    p99c: float = 300.0,
    errors: float = 0.001,
    arrivals: float = 0.99,
    dropped: float = 0.0,
    cpu_busy: float = 0.0,
    lag_p99: float = 2.0,
) -> dict[str, Any]:
    def lat(p: float) -> dict[str, float]:
        return {
            "count": 1000,
            "p50_ms": p / 4,
            "p90_ms": p / 2,
            "p99_ms": p,
            "p99.9_ms": p * 2,
            "max_ms": p * 3,
            "mean_ms": p / 3,
        }

    return {
        "latency": {
            "raw": {"all": lat(p99), "order": lat(p99 / 2)},
            "corrected": {"all": lat(p99c), "order": lat(p99c)},
        },
        "ratios": {
            "error_ratio": errors,
            "arrival_ratio": arrivals,
            "dropped_ratio": dropped,
            "error_ratio_count": 5,
            "arrival_ratio_count": 990,
            "dropped_ratio_count": 0,
        },
        "generator": {"cpu_busy_ratio": {"local": cpu_busy}, "dispatch_lag": {"p99_ms": lag_p99}},
    }


def test_parse_threshold() -> None:
    t = parse_threshold("latency{name:order}:p(99.9) <= 800")
    assert (t.metric, t.name, t.agg, t.op, t.limit) == ("latency", "order", "p(99.9)", "<=", 800.0)
    assert parse_threshold("error_ratio:rate<0.01").name == "all"
    for bad in ("latency<500", "latency:p99<5", "cpu:value<3", "error_ratio:p(99)<1", "latency:rate<1"):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold(bad)


def test_defaults_pass_on_a_healthy_run_and_each_fails_alone() -> None:
    assert all(r.passed for r in evaluate(DEFAULT_THRESHOLDS, _summary()))
    breaking = {
        "latency:p(99)<1000": _summary(p99=1100),
        "latency_corrected:p(99)<1500": _summary(p99c=1600),
        "error_ratio:rate<0.01": _summary(errors=0.02),
        "arrival_ratio:value>0.95": _summary(arrivals=0.9),
        "dropped_ratio:rate<0.01": _summary(dropped=0.02),
    }
    for threshold, summary in breaking.items():
        failed = [r.threshold for r in evaluate(DEFAULT_THRESHOLDS, summary) if not r.passed]
        assert failed == [threshold]


def test_per_request_thresholds_and_missing_samples() -> None:
    results = evaluate(["latency{name:order}:p(99)<100", "latency{name:pay}:max<1"], _summary(p99=150))
    assert results[0].passed and results[0].observed == 75
    assert not results[1].passed and results[1].observed is None  # nothing to judge is not a pass


def test_validity_bounds() -> None:
    assert check_validity(_summary()).valid
    busy = check_validity(_summary(cpu_busy=0.5))
    assert not busy.valid and "CPU" in busy.reasons[0] and "--locust-workers" in busy.reasons[0]
    assert not check_validity(_summary(dropped=0.2)).valid
    assert check_validity(_summary(dropped=0.2), RunValidity(max_dropped_ratio=0.3)).valid
    assert not check_validity(_summary(lag_p99=900)).valid
    failed = _summary()
    failed["generator"]["failures"] = {"w1": "cannot mint buyer tokens: 401"}
    assert check_validity(failed).reasons == (
        "Locust process w1 could not send its share: cannot mint buyer tokens: 401",
    )


@pytest.mark.parametrize("invariants,valid,slo", list(itertools.product([True, False], repeat=3)))
def test_exit_code_precedence(invariants: bool, valid: bool, slo: bool) -> None:
    code = exit_codes.decide(invariants_held=invariants, run_valid=valid, slo_passed=slo)
    if not invariants:
        assert code == exit_codes.INVARIANT_VIOLATED == 2
    elif not valid:
        assert code == exit_codes.RUN_INVALID == 3
    elif not slo:
        assert code == exit_codes.SLO_MISSED == 1
    else:
        assert code == exit_codes.OK == 0
    assert code in exit_codes.MEANING
