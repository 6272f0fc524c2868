"""Every fault drill in its short (CI) form, on one embedded stack: each must pass the
checker and the audit, and show the fault really happened and did what it proves.

Each drill starts `flashsale serve --workers 2` and `flashsale worker` as subprocesses
against embedded Redis (AOF) and PostgreSQL behind the fault proxies, runs a 6 s surge
with the fault a third of the way in, lets holds lapse and checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flashsale.drills.drill import FAULTS, DrillReport, DrillSettings, DrillStack, run_drill

SHORT = DrillSettings(duration_s=6.0, concurrency=8, hold_ttl_s=2.0, seed=7)


@pytest.fixture(scope="module")
def stack() -> Iterator[DrillStack]:
    with DrillStack() as s:
        yield s


def _answers(report: DrillReport, prefix: str) -> int:
    return sum(n for k, n in report.answers.items() if k.startswith(prefix))


def _notes(report: DrillReport) -> str:
    return "\n".join(report.timeline["notes"])


def test_every_fault_has_a_drill_here() -> None:
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    assert set(FAULTS) <= tested


def _run(stack: DrillStack, fault: str) -> DrillReport:
    report = run_drill(stack, fault, SHORT)
    assert report.verdict == "PASS", report.text()
    assert report.requests["ok"] > 100, report.text()  # a surge, not a trickle
    assert report.checks["order_ids"]["acknowledged"] > 50, report.text()
    return report


def test_worker_kill(stack: DrillStack) -> None:
    report = _run(stack, "worker-kill")
    assert "killed" in _notes(report) and "worker restarted" in _notes(report)


def test_service_kill(stack: DrillStack) -> None:
    report = _run(stack, "service-kill")
    assert "supervisor restarted it" in _notes(report), report.text()


def test_postgres_stop(stack: DrillStack) -> None:
    report = _run(stack, "postgres-stop")
    assert "PostgreSQL stopped" in _notes(report) and "PostgreSQL started" in _notes(report)
    assert report.orders_per_s["during"] > 10, report.text()  # Redis decides: sales went on


def test_redis_pause(stack: DrillStack) -> None:
    report = _run(stack, "redis-pause")
    assert report.unknown["attempts"] > 0 and report.unknown["unsettled"] == 0, report.text()
    assert _answers(report, "order 504 outcome_unknown") > 0, report.answers  # unknown, never "failed"


def test_redis_restart(stack: DrillStack) -> None:
    report = _run(stack, "redis-restart")
    assert "Redis restarted" in _notes(report) and report.time_to_recover_s is not None, report.text()
    assert _answers(report, "order 503 sale_fenced") == 0 or report.orders_per_s["after"] > 10


def test_redis_data_loss(stack: DrillStack) -> None:
    report = _run(stack, "redis-data-loss")
    notes = _notes(report)
    assert "sale fenced: Redis lost data" in notes, report.text()
    assert "`flashsale recover` exit 0: ok=True" in notes, report.text()
    assert _answers(report, "order 503 sale_fenced") > 0, report.answers  # buyers were told, clearly
    assert report.orders_per_s["after"] > 10, report.text()  # the sale continued


def test_net_latency(stack: DrillStack) -> None:
    report = _run(stack, "net-latency")
    assert "latency" in _notes(report)


def test_net_reset(stack: DrillStack) -> None:
    report = _run(stack, "net-reset")
    assert "connections reset" in _notes(report)


def test_net_blackhole(stack: DrillStack) -> None:
    report = _run(stack, "net-blackhole")
    assert _answers(report, "order 504 outcome_unknown") > 0, report.answers
    # The scripts ran while their replies were held: the retries with the same request id
    # came back with the real outcome, the first hold (replayed), not a second one.
    assert report.unknown["had_run"] > 0 and report.unknown["unsettled"] == 0, report.text()
