"""The order service's ``POST /api/orders`` beside the HTTP ceiling, with the same load
generator, in the same run.

Two servers, each one process started the way it is deployed, each driven by ``wrk``
(Debian package ``wrk``; one thread, 64 connections, a Lua script that POSTs a fresh
request id per request and takes buyers in turn from a pool of 20,000 tokens so no buyer
trips the per-buyer rate limit):

* the HTTP ceiling: ``benchmarks.hello_app``, a trivial aiohttp endpoint that parses the
  same JSON body and answers 201 (uvloop, one process, no access log);
* the service: ``flashsale serve --workers 1`` against the run's Redis and PostgreSQL,
  one open sale with one SKU stocked deep enough never to sell out, so every request is
  a real reservation (a hold, its idempotency record, its event).

Figures count only 201 answers. ``wrk`` runs as a child process, and its CPU share is
its own CPU time (``wait4``) over its wall time: above ~90 % the figure measures ``wrk``.
After the service's run, the holds Redis gained are compared with the 201s ``wrk`` saw:
fewer holds than acknowledged orders would be a lost order, and fails the run.

Run alone: ``python -m benchmarks.service_bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from flashsale.service.tokens import mint

from .harness import PidTreeCpu
from .report import Figure
from .servers import Servers
from .settings import BenchSettings

__all__ = ["WRK_SCRIPT", "WrkRun", "measure_service", "run_wrk"]

SECTION = "service"
CEILING = "trivial aiohttp endpoint (HTTP ceiling)"
SERVICE = "POST /api/orders (the service)"
CONNECTIONS = 64
BUYERS = 20_000
_ROOT = Path(__file__).resolve().parent.parent

#: POST /api/orders with a fresh request id each time; buyers taken in turn from a token
#: file (one per line). ``done`` prints the summary as one JSON line for the parent.
WRK_SCRIPT = r"""
local tokens, prefix, sku = {}, "w", "hot"
local n, i = 0, 0

function init(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  prefix, sku = args[2], args[3]
end

function request()
  n = n + 1
  i = i % #tokens + 1
  local body = '{"request_id":"' .. prefix .. n .. '","sku":"' .. sku .. '","qty":1}'
  return wrk.format("POST", "/api/orders",
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, as it reported itself, plus its own CPU time."""

    requests: int
    non_2xx: int
    socket_errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: float

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def rate(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def generator_cpu(self) -> float:
        return self.cpu_s / self.duration_s if self.duration_s > 0 else 0.0


def run_wrk(url: str, script: Path, *, seconds: int, connections: int, args: list[str]) -> WrkRun:
    """Run wrk to completion (blocking). Its CPU time comes from ``wait4`` on its pid."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk)")
    command = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode("utf-8", "replace")
    err = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {(err or out).strip()[-500:]}")
    report = json.loads(line[4:])
    return WrkRun(
        requests=report["requests"],
        non_2xx=report["status"],
        socket_errors=report["connect"] + report["read"] + report["write"] + report["timeout"],
        duration_s=report["duration_us"] / 1e6,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Served:
    """A server process of this run: started, awaited until it answers, always stopped."""

    def __init__(self, command: list[str], env: dict[str, str], ready_path: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [*command, "--port", str(self.port)]
        self._env = env
        self._ready_path = ready_path
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> _Served:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._command,
                env=self._env,
                cwd=_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self._command[2]} exited with {self.proc.returncode}:\n{self._tail()}"
                    )
                try:
                    async with session.get(self.url + self._ready_path) as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{' '.join(self._command)} did not become ready in 60 s:\n{self._tail()}"
                    )
                await asyncio.sleep(0.1)

    async def __aexit__(self, *_exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)

    def _tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


def _args(wrk_args: list[str], phase: str) -> list[str]:
    """The script's arguments: token file, request-id prefix (unique per phase, or the
    measured run would replay the warm-up's request ids), SKU."""
    tokens, prefix, sku = wrk_args
    return [tokens, f"{prefix}{phase}-", sku]


async def _warm(server: _Served, script: Path, wrk_args: list[str]) -> None:
    """One second of load first: connections, caches and the script cache are warm."""
    await asyncio.to_thread(
        run_wrk, server.url, script, seconds=1, connections=CONNECTIONS, args=_args(wrk_args, "warm")
    )


async def _drive(
    server: _Served, script: Path, settings: BenchSettings, wrk_args: list[str]
) -> tuple[WrkRun, float]:
    """The measured run, with the server's CPU share."""
    assert server.proc is not None
    meter = PidTreeCpu(server.proc.pid)
    before = await meter.seconds()
    started = time.perf_counter()
    run = await asyncio.to_thread(
        run_wrk,
        server.url,
        script,
        seconds=max(1, round(settings.seconds)),
        connections=CONNECTIONS,
        args=_args(wrk_args, "run"),
    )
    wall = time.perf_counter() - started
    after = await meter.seconds()
    return run, (after - before) / wall if before is not None and after is not None else float("nan")


def _figure(name: str, run: WrkRun, server_cpu: float, unit: str, notes: list[str]) -> Figure:
    if run.non_2xx:
        notes.append(f"{run.non_2xx:,} answers were not 2xx (not counted)")
    if run.socket_errors:
        notes.append(f"{run.socket_errors:,} socket errors")
    return Figure(
        section=SECTION,
        name=name,
        rate=run.rate,
        unit=unit,
        clients=CONNECTIONS,
        generator_cpu=run.generator_cpu,
        server_cpu=server_cpu,
        p50_ms=run.p50_ms,
        p99_ms=run.p99_ms,
        granted=run.ok,
        wall_s=run.duration_s,
        notes=("wrk, 1 thread", *notes),
    )


async def _held(session: aiohttp.ClientSession, url: str, admin: str, sale: str) -> int:
    async with session.get(
        f"{url}/api/admin/sales/{sale}", headers={"Authorization": f"Bearer {admin}"}
    ) as resp:
        resp.raise_for_status()
        body = await resp.json()
    return int(body["skus"]["hot"]["held"])


async def measure_service(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """Both figures; the service's as a ratio of the ceiling."""
    prefix = f"bench{servers.token}"
    sale = f"bench-{servers.token}"
    secret, admin = secrets.token_hex(16), secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-service-bench-"))
    try:
        script = workdir / "orders.lua"
        script.write_text(WRK_SCRIPT)
        tokens = workdir / "tokens.txt"
        tokens.write_text("\n".join(mint(secret, f"b{i}", ttl_s=3600) for i in range(BUYERS)) + "\n")
        env = {
            **os.environ,
            "FLASHSALE_REDIS_URL": servers.redis_url,
            "FLASHSALE_DATABASE_URL": servers.database_url,
            "FLASHSALE_TOKEN_SECRET": secret,
            "FLASHSALE_ADMIN_TOKEN": admin,
            "FLASHSALE_KEY_PREFIX": prefix,
            "FLASHSALE_LOG_LEVEL": "WARNING",
            "FLASHSALE_ACCESS_LOG": "0",
        }
        wrk_args = [str(tokens), f"{servers.token}-", "hot"]
        hello = _Served(
            [sys.executable, "-m", "benchmarks.hello_app"], env, "/healthz", workdir / "hello.log"
        )
        async with hello:
            await _warm(hello, script, wrk_args)
            ceiling_run, ceiling_cpu = await _drive(hello, script, settings, wrk_args)
        service = _Served(
            [sys.executable, "-m", "flashsale", "serve", "--workers", "1"],
            env,
            "/readyz",
            workdir / "service.log",
        )
        async with service, aiohttp.ClientSession() as session:
            async with session.post(
                f"{service.url}/api/admin/sales",
                headers={"Authorization": f"Bearer {admin}"},
                json={
                    "sale": sale,
                    "opens_at": int(time.time() * 1000) - 1000,
                    "open": True,
                    "skus": [{"sku": "hot", "stock": 1_000_000_000}],
                },
            ) as resp:
                if resp.status != 201:
                    raise RuntimeError(
                        f"could not create the benchmark sale: {resp.status} {await resp.text()}"
                    )
            await _warm(service, script, wrk_args)
            held_before = await _held(session, service.url, admin, sale)
            run, service_cpu = await _drive(service, script, settings, wrk_args)
            held = await _held(session, service.url, admin, sale) - held_before
    finally:
        await _forget(servers, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    ceiling = _figure(CEILING, ceiling_run, ceiling_cpu, "requests/s", [])
    return [ceiling, _service_figure(run, service_cpu, held, ceiling)]


def _service_figure(run: WrkRun, cpu: float, held: int, ceiling: Figure) -> Figure:
    """The service's figure, checked against Redis: every 201 wrk saw is a hold, and at
    most the requests still in flight when wrk stopped were held without being counted."""
    notes = [f"{run.ok:,} orders acknowledged, {held:,} holds made"]
    errors = 0
    if not run.ok <= held <= run.ok + CONNECTIONS:
        errors = 1
        notes.append(
            "MISMATCH: acknowledged orders without a hold (lost)"
            if held < run.ok
            else "MISMATCH: more holds than requests could explain (doubled)"
        )
    return replace(
        _figure(SERVICE, run, cpu, "orders/s", notes),
        errors=errors,
        ratio=run.rate / ceiling.rate if ceiling.rate > 0 else None,
        ratio_to="HTTP ceiling",
    )


async def _forget(servers: Servers, prefix: str) -> None:
    """Remove every key the service wrote under this run's prefix."""
    redis = servers.redis()
    try:
        batch: list[Any] = []
        async for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
