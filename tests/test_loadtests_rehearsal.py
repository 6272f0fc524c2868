"""A short headless rehearsal end to end (service, worker, Locust, oracle, report) against the
real Redis and PostgreSQL — and the oracle failing when it should: after the run the stores
are tampered with (an oversell, a lost order, a duplicate) and the verdict must say so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from flashsale.drills.rehearse import Rehearsal, RehearsalSettings
from flashsale.runtime.embedded import EmbeddedStack
from loadtests import exit_codes, oracle
from loadtests.history import read_history, summarize_history


@dataclass(frozen=True)
class Drill:
    summary: dict[str, Any]
    folder: Path
    env: dict[str, str]
    code: int

    @property
    def sale(self) -> str:
        return str(self.summary["run"]["sale"])


def short_rehearsal(stack: EmbeddedStack, folder: Path, prefix: str, **settings: Any) -> Drill:
    """A short headless rehearsal on ``stack`` (keys under ``<prefix>…``), report in ``folder``."""
    env = {
        **stack.environ(),
        "FLASHSALE_KEY_PREFIX": f"{prefix}{uuid.uuid4().hex[:6]}",
        "FLASHSALE_TOKEN_SECRET": uuid.uuid4().hex,
        "FLASHSALE_ADMIN_TOKEN": uuid.uuid4().hex,
    }
    options = RehearsalSettings(
        peak_rps=60.0,
        time_scale=0.3,
        hold_ttl_s=3.0,
        audit_wait_s=30.0,
        report_dir=folder,
        env=env,
        # A CI machine is shared: judge correctness here, and latency loosely.
        slo="latency_corrected:p(99)<5000;error_ratio:rate<0.02;arrival_ratio:value>0.9",
        **settings,
    )
    with open(folder / "rehearse.out", "w") as out:
        code = Rehearsal(options, out=out).run()
    summary = json.loads((folder / "summary.json").read_text())
    return Drill(summary, folder, env, code)


def recording_wrapper(folder: Path) -> tuple[Path, Path]:
    """A wrapper command that writes the command line it was given to a file, then runs it."""
    wrapper, seen = folder / "wrapper.sh", folder / "wrapped.txt"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{seen}"\nexec "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, seen


@pytest.fixture(scope="module")
def drill(embedded_stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Drill:
    # Locust runs under a wrapper that only records its command line (what a profiler such
    # as valgrind or py-spy would be): the whole drill must pass all the same.
    folder = tmp_path_factory.mktemp("rehearsal")
    wrapper, _ = recording_wrapper(folder)
    return short_rehearsal(embedded_stack, folder, "rt", locust_wrapper=(str(wrapper),))


@pytest.mark.timeout(300)
def test_short_headless_rehearsal_passes_the_oracle(drill: Drill) -> None:
    s = drill.summary
    assert s["oracle"]["invariants_held"] is True, s["oracle"]
    assert drill.code == exit_codes.OK, (s["validity"], s["slo"])
    assert s["arrivals"]["dropped"] == 0 and s["ratios"]["arrival_ratio"] > 0.95, s["arrivals"]
    log = s["oracle"]["log"]
    assert log["acknowledged"] > 0 and log["paid"] > 0
    orders = s["requests"]["order"]["outcomes"]
    assert orders.get("409:sold_out", 0) > 0  # the hot SKU sold out: demand beat stock
    assert orders.get("429:limit_exceeded", 0) > 0, orders  # bots asked beyond the per-user limit
    assert log["replays"] > 0, log  # retries reused their request id and got their first order back
    assert s["service"]["sold_out_at_s_from_t0"], "no sold-out moment in the stats timeline"
    assert s["events"] and "reserve" in s["events"][0]["what"]
    for name in (
        "report.html",
        "timeline.csv",
        "latency-raw.hlog",
        "latency-corrected.hlog",
        "requests.jsonl",
    ):
        assert (drill.folder / name).is_file(), name
    text = (drill.folder / "rehearse.out").read_text()
    assert "VERDICT  exit 0" in text
    # The Locust process ran under --locust-wrapper, its own command line handed on whole.
    (wrapped,) = (drill.folder / "wrapped.txt").read_text().splitlines()
    assert wrapped.startswith(f"{sys.executable} -m locust -f ") and " --headless " in wrapped
    # The report names the run's settings, never the admin token among them.
    assert s["run"]["settings"]["admin_token"] == "(secret)" and s["run"]["settings"]["peak_rps"] == 60.0
    token = drill.env["FLASHSALE_ADMIN_TOKEN"]
    assert all(token not in (drill.folder / f).read_text() for f in ("summary.json", "report.html"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_again(env: dict[str, str]) -> Iterator[str]:
    """``flashsale serve`` started again on a finished drill's stores (``env``), until ready;
    yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(port), "--workers", "1"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{host}/readyz", timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    try:
        yield host
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def judge(drill: Drill) -> Iterator[Any]:
    """The service started again on the drill's stores; ``judge()`` reruns the oracle (exit code)."""
    with serve_again(drill.env) as host:
        yield lambda *extra: _oracle(drill, host, *extra)


def _oracle(drill: Drill, host: str, *extra: str) -> int:
    return oracle.main(
        [
            str(drill.folder / "requests.jsonl"),
            *("--host", host, "--sale", drill.sale, "--admin-token", drill.env["FLASHSALE_ADMIN_TOKEN"]),
            *("--wait", "5", *extra),
        ]
    )


@pytest.fixture
def stores(drill: Drill) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(drill.env["FLASHSALE_REDIS_URL"], decode_responses=True)
    try:
        yield client, "{" + drill.env["FLASHSALE_KEY_PREFIX"] + ":" + drill.sale + "}"
    finally:
        client.close()


def _acknowledged(drill: Drill) -> list[str]:
    return list(summarize_history(read_history([drill.folder / "requests.jsonl"]), ["order"]).acknowledged)


@pytest.mark.timeout(180)
def test_oracle_clean_before_tampering_and_chunked(
    drill: Drill, judge: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Many acknowledged ids go in several audit calls (the service takes 16 KiB bodies).
    monkeypatch.setattr(oracle, "AUDIT_CHUNK_BYTES", 400)
    assert judge() == exit_codes.OK, capsys.readouterr().out


@pytest.mark.timeout(180)
def test_planted_oversell_is_an_invariant_violation(
    drill: Drill, judge: Any, stores: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    client, tag = stores
    hot = next(k for k in client.hgetall(f"{tag}:stock") if k.startswith("phone-") and k.endswith(":sold"))
    client.hincrby(f"{tag}:stock", hot, 1)  # one more unit sold than was ever stocked
    try:
        assert judge() == exit_codes.INVARIANT_VIOLATED
        failed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if " FAIL " in line]
        assert "oversold" in failed
    finally:
        client.hincrby(f"{tag}:stock", hot, -1)


async def _pg(drill: Drill) -> asyncpg.Connection:
    return await asyncpg.connect(drill.env["FLASHSALE_DATABASE_URL"])


@pytest.mark.timeout(180)
async def test_planted_lost_order_is_an_invariant_violation(
    drill: Drill, judge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _acknowledged(drill)[0]
    conn = await _pg(drill)
    try:
        row = await conn.fetchrow("SELECT * FROM orders WHERE order_id = $1", victim)
        lines = await conn.fetch("SELECT * FROM order_lines WHERE order_id = $1", victim)
        assert row is not None, "an acknowledged order is missing before tampering"
        await conn.execute("DELETE FROM orders WHERE order_id = $1", victim)  # the 漏单 of 2012
        try:
            assert judge() == exit_codes.INVARIANT_VIOLATED
            failed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if " FAIL " in line]
            assert "lost" in failed
        finally:
            cols = list(row.keys())
            await conn.execute(
                f"INSERT INTO orders ({', '.join(cols)}) VALUES "
                f"({', '.join(f'${i + 1}' for i in range(len(cols)))})",
                *row.values(),
            )
            for line in lines:
                await conn.execute(
                    "INSERT INTO order_lines (order_id, sku, qty) VALUES ($1, $2, $3)",
                    line["order_id"],
                    line["sku"],
                    line["qty"],
                )
    finally:
        await conn.close()


@pytest.mark.timeout(180)
async def test_planted_duplicate_is_an_invariant_violation(
    drill: Drill, judge: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _acknowledged(drill)[-1]
    twin = original + "x"
    conn = await _pg(drill)
    try:
        # A second order for the same request id: what a retry must never create.
        await conn.execute(
            """INSERT INTO orders (order_id, sale, user_id, request_id, status, status_rank, created_at,
                                                  pay_by, status_at, last_stream_id)
                              SELECT $2, sale, user_id, request_id, status, status_rank, created_at, pay_by, status_at,
                                     last_stream_id FROM orders WHERE order_id = $1""",
            original,
            twin,
        )
        await conn.execute(
            """INSERT INTO order_lines (order_id, sku, qty)
                              SELECT $2, sku, qty FROM order_lines WHERE order_id = $1""",
            original,
            twin,
        )
        try:
            assert judge() == exit_codes.INVARIANT_VIOLATED
            failed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if " FAIL " in line]
            assert "duplicate" in failed
        finally:
            await conn.execute("DELETE FROM orders WHERE order_id = $1", twin)
    finally:
        await conn.close()


@pytest.mark.timeout(180)
def test_oracle_clean_again_after_restoring(judge: Any) -> None:
    assert judge() == exit_codes.OK


@pytest.mark.timeout(240)
def test_ctrl_c_stops_everything_and_still_judges(embedded_stack: EmbeddedStack, tmp_path: Path) -> None:
    import psutil  # type: ignore[import-untyped]

    env = {**os.environ, **embedded_stack.environ(), "FLASHSALE_KEY_PREFIX": f"rc{uuid.uuid4().hex[:6]}"}
    script = (
        "import sys; from pathlib import Path; from flashsale.drills.rehearse import Rehearsal, RehearsalSettings; "
        f"sys.exit(Rehearsal(RehearsalSettings(peak_rps=40, time_scale=1.0, hold_ttl_s=2, audit_wait_s=20, "
        f"report_dir=Path({str(tmp_path)!r}))).run())"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    progress = tmp_path / "progress.json"
    deadline = time.time() + 90
    while time.time() < deadline:  # interrupt once the doors have opened
        try:
            if json.loads(progress.read_text()).get("t_from_t0_s", -1) > 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the drill never reached T0")
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(children) >= 3  # the service, the worker, Locust (and their own children)
    proc.send_signal(__import__("signal").SIGINT)
    out, _ = proc.communicate(timeout=150)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Interrupted mid-surge, the drill still ended its visits, judged the run and reported.
    assert summary["oracle"]["invariants_held"] is True, summary["oracle"]
    assert summary["run"]["elapsed_s"] < 60 and summary["arrivals"]["started"] > 0
    assert proc.returncode == summary["exit_code"], out
    assert "VERDICT" in out
    time.sleep(1)
    left = [
        pid
        for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert left == [], f"processes left running after Ctrl-C: {left}"


@pytest.mark.timeout(300)
def test_the_live_lines_show_the_worst_second_and_when(drill: Drill) -> None:
    progress = json.loads((drill.folder / "progress.json").read_text())
    assert isinstance(progress["p99_by_second"], list)
    for second in progress["p99_by_second"]:
        assert set(second) == {"t_from_t0_s", "p99_ms", "p99_corrected_ms"}
    lines = (drill.folder / "rehearse.out").read_text().splitlines()
    assert any("@T0+" in line and " p99 " in line for line in lines), lines


@pytest.mark.timeout(240)
async def test_a_service_with_no_writer_is_not_drained_not_lost(
    embedded_stack: EmbeddedStack, tmp_path: Path
) -> None:
    """`flashsale serve` alone (no `flashsale worker`: nothing drains the stream into
    PostgreSQL) used to end "invariant violated: lost N"; the orders are only queued. The
    drill must say "run invalid: not drained" and leave "lost" not judged."""
    from flashsale.pipeline.migrate import migrate_url

    await migrate_url(embedded_stack.database_url)
    env = {
        **os.environ,
        **embedded_stack.environ(),
        "FLASHSALE_KEY_PREFIX": f"nd{uuid.uuid4().hex[:6]}",
        "FLASHSALE_TOKEN_SECRET": uuid.uuid4().hex,
        "FLASHSALE_ADMIN_TOKEN": uuid.uuid4().hex,
    }
    port = _free_port()
    service = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    host = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # until ready (bounded)
            try:
                with urllib.request.urlopen(f"{host}/readyz", timeout=2):
                    break
            except OSError:
                assert service.poll() is None, "the service exited"
                time.sleep(0.2)
        report = tmp_path / "report"
        drill = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(Path(oracle.__file__).with_name("surge.py")),
                "--headless",
            ]
            + [
                "--host",
                host,
                "--peak-rps",
                "20",
                "--time-scale",
                "0.15",
                "--hold-ttl",
                "2",
                "--audit-wait",
                "3",
            ]
            + ["--personas", "buyer=1", "--slo", "error_ratio:rate<0.5", "--no-plots", "--only-summary"]
            + ["--report-dir", str(report)],
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
        )
    finally:
        service.terminate()
        service.wait(15)
    summary = json.loads((report / "summary.json").read_text())
    assert drill.returncode == exit_codes.RUN_INVALID, (drill.stdout, drill.stderr[-3000:])
    assert summary["exit_meaning"].startswith("run invalid: not drained"), summary["exit_meaning"]
    assert summary["oracle"]["log"]["acknowledged"] > 0 and summary["oracle"]["drained"] is False
    assert "lost" in [c["name"] for c in summary["oracle"]["not_judged"]]
    assert all(c["passed"] for c in summary["oracle"]["checks"]), summary["oracle"]["checks"]
    assert "flashsale worker" in summary["oracle"]["drain_detail"]
    assert "VERDICT  exit 3: run invalid: not drained" in drill.stdout
