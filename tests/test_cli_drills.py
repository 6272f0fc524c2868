"""``flashsale rehearse`` and ``flashsale capacity`` check every option before anything
starts: a bad ``--slo`` once started Redis, PostgreSQL and the service, then exited 3
("run invalid") with the reason only in locust.log. Now: exit 64, the reason on stderr,
no server started, no report folder made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import flashsale

from flashsale import exit_codes


def _refused(command: str, *args: str, tmp_path: Path) -> str:
    report = tmp_path / "report"
    done = flashsale(command, "--report-dir", str(report), *args, timeout=120)
    assert done.returncode == exit_codes.USAGE, done.stdout + done.stderr
    assert done.stdout == "", f"it started something: {done.stdout}"
    assert not report.exists(), "a report folder was made before the options were checked"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flashsale: {command}: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("slo", "said"),
    [
        ("latency:p99<300", "write METRIC"),  # the k6 spelling is p(99)
        ("latency:p(99)<300;error_rate:rate<0.01", "error_rate"),  # one bad among good ones
        ("latency:p(97)<300", "only p(50), p(90), p(95), p(99), p(99.9)"),  # not recorded
        ("error_ratio:p(99)<1", "takes rate, value or count"),
    ],
)
def test_a_bad_threshold_is_refused_before_anything_starts(slo: str, said: str, tmp_path: Path) -> None:
    line = _refused("rehearse", "--slo", slo, tmp_path=tmp_path)
    assert "--slo" in line and said in line, line


@pytest.mark.parametrize(
    ("command", "args", "said"),
    [
        ("rehearse", ["--peak-rps", "0"], "--peak-rps must be above 0"),
        ("rehearse", ["--service-workers", "0"], "--service-workers must be at least 1"),
        ("rehearse", ["--locust-workers", "-1"], "--locust-workers must be at least 0"),
        ("rehearse", ["--hold-ttl", "0"], "--hold-ttl must be above 0"),
        ("rehearse", ["--audit-wait", "nan"], "--audit-wait"),
        ("rehearse", ["--duration", "-5"], "--duration must be above 0"),
        ("rehearse", ["--redis-url", "localhost:6379"], "FLASHSALE_REDIS_URL"),
        ("rehearse", ["--locust-wrapper", "no-such-profiler --out x"], "'no-such-profiler' is not a command"),
        ("capacity", ["--steps", "0"], "--steps must be at least 1"),
        ("capacity", ["--plan-for", "50000", "--plan-for", "-1"], "--plan-for must be above 0"),
        ("capacity", ["--slo", "latency:p(99)<"], "--slo"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_every_option_is_checked_before_anything_starts(
    command: str, args: list[str], said: str, tmp_path: Path
) -> None:
    line = _refused(command, *args, tmp_path=tmp_path)
    assert said in line, line


def test_a_report_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    done = flashsale("rehearse", "--report-dir", str(taken))
    assert done.returncode == exit_codes.USAGE and "is a file" in done.stderr, done.stderr
    assert done.stdout == ""


def test_options_passed_to_the_drill_are_checked_by_its_own_parser(tmp_path: Path) -> None:
    line = _refused("rehearse", "--", "--personas-typo", "bot=1", tmp_path=tmp_path)
    assert "after '--'" in line and "--personas-typo" in line, line
    line = _refused("capacity", "--", "--arrival-process", "bursty", tmp_path=tmp_path)
    assert "bursty" in line, line
