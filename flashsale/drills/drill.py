"""Fault drills: a short surge against the real stack with one part broken mid-surge, a
history of every request, and a verdict from the checker and the audit.

One drill (:func:`run_drill`):

1. the **stack** — embedded Redis (AOF on, ``everysec`` or ``always``) and PostgreSQL unless
   ``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` name servers (then only the faults
   that need no control of those servers' processes run); a :mod:`fault proxy
   <flashsale.drills.faultproxy>` between the service and Redis, another between the worker and
   PostgreSQL; ``flashsale migrate``;
2. ``flashsale serve --workers 2`` and ``flashsale worker`` as subprocesses (``FLASHSALE_*``
   environment), a key prefix of the drill's own, a sale created through the admin API:
   a hot SKU with little stock (sells out, holds lapse and it sells again) and a warm one
   with plenty (orders keep reaching Redis through the fault), a short hold TTL;
3. the **surge**: buyers in a loop — order (sometimes a two-line cart), sometimes resend
   the same request id (a replay), then pay, cancel or walk away; an answer that is not
   known (504, timeout, reset) is retried with the same request id and
   ``X-Retry-Attempt``. Every request goes into the :class:`~flashsale.drills.checker.History`;
4. the **fault**, a third of the way in (see :data:`FAULTS`), then its repair;
5. **settling**: the surge ends, holds lapse, the sweeper returns them, the writer drains;
6. the **verdict**: :func:`flashsale.drills.checker.check` plus :func:`flashsale.pipeline.audit.run_audit`.
   Also measured: requests ok / failed / unknown, orders per second before, during and
   after the fault, the time from the repair to the first new order, the longest gap
   without one, and what each unknown outcome turned out to be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from flashsale.drills.checker import CheckReport, History, Operation, check, classify, observe
from flashsale.drills.faultproxy import ProxyThread
from flashsale.keys import ServiceKeys
from flashsale.redis_client import connect
from flashsale.runtime.embedded import PostgresServer, RedisServer, parent_death_signal
from inventory import SaleKeys

__all__ = ["FAULTS", "DrillReport", "DrillSettings", "DrillStack", "run_drill", "summary_table"]

#: Every fault and what passing its drill proves.
FAULTS: dict[str, str] = {
    "worker-kill": "SIGKILL the order writer mid-batch and restart it: it re-reads what it had not acknowledged; no order lost or doubled",
    "service-kill": "SIGKILL one service process; the supervisor restarts it: requests it had in flight are unknown, retries learn their outcome",
    "postgres-stop": "stop PostgreSQL (immediate) and start it again: sales go on (Redis decides), the writer waits and catches up",
    "redis-pause": "SIGSTOP Redis, then SIGCONT: answers time out as unknown (never 'failed'), retries settle them, nothing sold twice",
    "redis-restart": "restart Redis from its AOF: the fence verifies the restarted server against PostgreSQL and sales carry on",
    "redis-data-loss": "fail over to an older copy of Redis's data (a lagging replica): the service fences, `flashsale recover` rebuilds, the sale continues without overselling",
    "net-latency": "add latency between the service and Redis and between the worker and PostgreSQL: slower, never wrong",
    "net-reset": "reset every connection to Redis and PostgreSQL and refuse new ones for a while: every answer is still true",
    "net-blackhole": "Redis's replies stop reaching the service (the scripts still run) and PostgreSQL stops answering the worker: 504 outcome_unknown, and the retry with the same request id returns the real outcome",
}
#: Faults that need the drill to run Redis / PostgreSQL itself (not a configured server).
NEEDS_REDIS_PROCESS = frozenset({"redis-pause", "redis-restart", "redis-data-loss"})
NEEDS_POSTGRES_PROCESS = frozenset({"postgres-stop"})
#: How many times net-blackhole opens its blackhole waiting for a script to run behind it.
BLACKHOLE_WINDOWS = 4

_ADMIN = "drill-admin-" + secrets.token_hex(8)
_SECRET = "drill-secret-" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class DrillSettings:
    """How big and how long a drill is. The defaults are the short form CI runs."""

    duration_s: float = 9.0  # the surge
    fault_at_s: float | None = None  # default: a third of the surge
    fault_s: float | None = None  # default: a quarter of the surge, 1.5 .. 5 s
    concurrency: int = 12  # buyers sending at once
    buyers: int = 400
    hot_stock: int = 40
    warm_stock: int = 20_000
    hold_ttl_s: float = 3.0
    service_workers: int = 2
    redis_timeout_s: float = 0.5
    pay_ratio: float = 0.5
    cancel_ratio: float = 0.1
    replay_ratio: float = 0.1
    max_retries: int = 8
    seed: int | None = None

    @property
    def fault_start(self) -> float:
        return self.fault_at_s if self.fault_at_s is not None else self.duration_s / 3

    @property
    def fault_length(self) -> float:
        return self.fault_s if self.fault_s is not None else min(5.0, max(1.5, self.duration_s / 4))


@dataclass(slots=True)
class Timeline:
    fault_start: float | None = None
    fault_end: float | None = None  # the repair is done
    surge_end: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DrillReport:
    fault: str
    verdict: str  # PASS, FAIL, SKIPPED
    why: str
    requests: dict[str, int]
    orders_per_s: dict[str, float]  # before / during / after
    time_to_recover_s: float | None
    longest_gap_s: float | None
    unknown: dict[str, int]
    answers: dict[str, int]  # "<kind> <status> <code>" -> requests
    failed_checks: list[str]
    checks: dict[str, Any]
    audit: dict[str, Any]
    timeline: dict[str, Any]
    settings: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.verdict in ("PASS", "SKIPPED")

    def to_json(self) -> dict[str, Any]:
        return {"schema": "flashsale.drill/1", **asdict(self)}

    def text(self) -> str:
        if self.verdict == "SKIPPED":
            return f"drill {self.fault}: SKIPPED — {self.why}"
        ops = self.orders_per_s
        rec = "-" if self.time_to_recover_s is None else f"{self.time_to_recover_s:.2f} s"
        gap = "-" if self.longest_gap_s is None else f"{self.longest_gap_s:.2f} s"
        u = self.unknown
        lines = [
            f"drill {self.fault}: {self.verdict}" + (f" — {self.why}" if self.why else ""),
            f"  proves: {FAULTS[self.fault]}",
            f"  requests: ok {self.requests['ok']}, failed {self.requests['failed']}, unknown {self.requests['unknown']}",
            f"  orders/s: before {ops['before']:.1f}, during {ops['during']:.1f}, after {ops['after']:.1f}; "
            f"time to recover {rec}; longest gap without a new order {gap}",
            f"  unknown outcomes: {u['attempts']} attempts on {u['request_ids']} request ids; settled by a retry "
            f"{u['settled']} ({u['had_run']} had run: replayed; {u['had_not_run']} had not), never settled {u['unsettled']}",
        ]
        lines.append(
            "  answers: "
            + ", ".join(f"{k} ×{n}" for k, n in sorted(self.answers.items(), key=lambda kv: -kv[1]))
        )
        lines += [f"  note: {n}" for n in self.timeline.get("notes", [])]
        lines.append(
            "  checks: " + (", ".join(self.failed_checks) + " FAILED" if self.failed_checks else "all passed")
        )
        for name, found in self.checks.get("violations", {}).items():
            lines += [f"    {name}: {v}" for v in found[:5]]
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_table(reports: list[DrillReport]) -> str:
    head = (
        "fault",
        "verdict",
        "ok",
        "failed",
        "unknown",
        "recover s",
        "gap s",
        "orders/s before",
        "during",
        "after",
    )
    rows: list[tuple[str, ...]] = [head]
    for r in reports:
        rows.append(
            (
                r.fault,
                r.verdict,
                str(r.requests.get("ok", 0)),
                str(r.requests.get("failed", 0)),
                str(r.requests.get("unknown", 0)),
                _fmt(r.time_to_recover_s),
                _fmt(r.longest_gap_s),
                f"{r.orders_per_s.get('before', 0):.1f}",
                f"{r.orders_per_s.get('during', 0):.1f}",
                f"{r.orders_per_s.get('after', 0):.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    failed = [r.fault for r in reports if not r.passed]
    out.append(
        f"{len(reports) - len(failed)} passed, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    return "\n".join(out)


# ----------------------------------------------------------------------- stack
class DrillStack:
    """Redis, PostgreSQL and the two fault proxies; shared by the drills of one run."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        database_url: str | None = None,
        workdir: Path | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        if appendfsync not in ("everysec", "always"):
            raise ValueError("appendfsync is 'everysec' or 'always'")
        self.appendfsync = appendfsync
        self._given_redis, self._given_pg = redis_url, database_url
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="flashsale-drill-"))
        self._own_workdir = workdir is None
        self.redis: RedisServer | None = None
        self.postgres: PostgresServer | None = None
        self.redis_proxy: ProxyThread | None = None
        self.pg_proxy: ProxyThread | None = None
        self.redis_url = ""
        self.database_url = ""

    def start(self) -> DrillStack:
        from flashsale.pipeline.migrate import migrate_url

        try:
            if self._given_redis:
                self.redis_url = self._given_redis
            else:
                self.redis = RedisServer(
                    appendonly=True,
                    appendfsync=self.appendfsync,  # type: ignore[arg-type]
                    data_dir=self.workdir / "redis",
                ).start()
                self.redis_url = self.redis.url
            if self._given_pg:
                self.database_url = self._given_pg
            else:
                self.postgres = PostgresServer(data_dir=self.workdir / "pg").start()
                self.database_url = self.postgres.url
            r_host, r_port = _host_port(self.redis_url, 6379)
            p_host, p_port = _host_port(self.database_url, 5432)
            self.redis_proxy = ProxyThread(r_host, r_port, name="redis").start()
            self.pg_proxy = ProxyThread(p_host, p_port, name="postgres").start()
            asyncio.run(migrate_url(self.database_url))
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def proxied_redis_url(self) -> str:
        assert self.redis_proxy is not None
        return _replace_host_port(self.redis_url, "127.0.0.1", self.redis_proxy.port)

    @property
    def proxied_database_url(self) -> str:
        assert self.pg_proxy is not None
        return _replace_host_port(self.database_url, "127.0.0.1", self.pg_proxy.port)

    def can_run(self, fault: str) -> str | None:
        """None if the fault can be applied here, else why not."""
        if fault in NEEDS_REDIS_PROCESS and self.redis is None:
            return (
                "needs an embedded Redis (FLASHSALE_REDIS_URL names one the drill cannot stop or roll back)"
            )
        if fault in NEEDS_POSTGRES_PROCESS and self.postgres is None:
            return "needs an embedded PostgreSQL (FLASHSALE_DATABASE_URL names one the drill cannot stop)"
        return None

    def stop(self) -> None:
        for proxy in (self.redis_proxy, self.pg_proxy):
            if proxy is not None:
                proxy.stop()
        try:
            if self.postgres is not None:
                self.postgres.stop()
        finally:
            if self.redis is not None:
                self.redis.stop()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DrillStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _host_port(url: str, default: int) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default


def _replace_host_port(url: str, host: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------- processes
class Processes:
    """``flashsale serve`` and ``flashsale worker`` for one drill."""

    def __init__(self, stack: DrillStack, prefix: str, settings: DrillSettings, logdir: Path) -> None:
        self.stack = stack
        self.prefix = prefix
        self.settings = settings
        self.logdir = logdir
        self.port = _free_port()
        self.service: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_starts = 0

    def env(self, *, redis_url: str, database_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        env.update(
            {
                "FLASHSALE_REDIS_URL": redis_url,
                "FLASHSALE_DATABASE_URL": database_url,
                "FLASHSALE_TOKEN_SECRET": _SECRET,
                "FLASHSALE_ADMIN_TOKEN": _ADMIN,
                "FLASHSALE_KEY_PREFIX": self.prefix,
                "FLASHSALE_LOG_LEVEL": "WARNING",
            }
        )
        return env

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        with (self.logdir / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=parent_death_signal(signal.SIGTERM),
            )

    def start_service(self) -> None:
        s = self.settings
        env = self.env(redis_url=self.stack.proxied_redis_url, database_url=self.stack.database_url)
        env.update(
            {
                "FLASHSALE_PORT": str(self.port),
                "FLASHSALE_WORKERS": str(s.service_workers),
                "FLASHSALE_USER_RATE": "1000",
                "FLASHSALE_USER_BURST": "1000",
                "FLASHSALE_REDIS_TIMEOUT": str(s.redis_timeout_s),
                "FLASHSALE_SALE_CACHE": "0.2",
                "FLASHSALE_SOLD_OUT_CACHE": "0.2",
            }
        )
        self.service = self._spawn(["-m", "flashsale", "serve"], env, "service")

    def start_worker(self) -> None:
        env = self.env(redis_url=self.stack.redis_url, database_url=self.stack.proxied_database_url)
        env.update(
            {
                "FLASHSALE_WORKER_CONSUMER": "drill-writer",
                "FLASHSALE_WORKER_BLOCK_MS": "50",
                # Entries read but not acknowledged when a connection broke are re-read by
                # XAUTOCLAIM only: keep its idle time short so a drill settles in seconds.
                "FLASHSALE_WORKER_CLAIM_IDLE_MS": "1500",
                "FLASHSALE_WORKER_CLAIM_INTERVAL_S": "0.5",
                "FLASHSALE_WORKER_SALES_REFRESH_S": "0.5",
                "FLASHSALE_WORKER_STATEMENT_TIMEOUT_MS": "5000",
                "FLASHSALE_WORKER_STOP_GRACE_S": "2",
                "FLASHSALE_SWEEPER_INTERVAL_MS": "100",
            }
        )
        self.worker = self._spawn(["-m", "flashsale", "worker"], env, f"worker-{self.worker_starts}")
        self.worker_starts += 1

    def service_children(self) -> list[int]:
        if self.service is None:
            return []
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if fields[1] == str(self.service.pid) and fields[0] not in ("Z", "X"):
                    found.append(int(entry.name))
        return sorted(found)

    def run_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = self.env(redis_url=self.stack.redis_url, database_url=self.stack.database_url)
        return subprocess.run(
            [sys.executable, "-m", "flashsale", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        for proc in (self.service, self.worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.service, self.worker):
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------- client
class Surge:
    """The drill's buyers: an asyncio HTTP client that logs every request."""

    def __init__(
        self,
        base_url: str,
        tokens: dict[str, str],
        skus: tuple[str, str],
        settings: DrillSettings,
        t0: float,
        rng: random.Random,
    ) -> None:
        self.base = base_url
        self.tokens = tokens
        self.users = sorted(tokens)
        self.hot, self.warm = skus
        self.s = settings
        self.t0 = t0
        self.rng = rng
        self.history = History()
        self.end = settings.duration_s  # moved later when a repair ends late (see Faults)
        self.fault_pending = True  # buyers keep going until the fault is repaired
        self._n = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _send(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        key: str,
        user: str,
        path: str,
        body: dict[str, Any] | None,
        attempt: int,
        lines: tuple[tuple[str, int], ...] = (),
    ) -> Operation:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        if attempt:
            headers["X-Retry-Attempt"] = str(attempt)
        started = self.now()
        status, code = 0, ""
        data: Any = {}
        try:
            async with session.post(self.base + path, json=body, headers=headers) as resp:
                status = resp.status
                with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                    data = await resp.json(content_type=None) or {}
                code = str(data.get("error", "")) if isinstance(data, dict) else ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            code = type(exc).__name__
        if not isinstance(data, dict):
            data = {}
        op = Operation(
            kind,  # type: ignore[arg-type]
            key,
            user,
            attempt,
            started,
            self.now(),
            status,
            classify(status, code),
            code,
            data.get("order_id") if status // 100 == 2 else None,
            data.get("status") if status // 100 == 2 else None,
            lines,
            bool(data.get("replayed")),
        )
        self.history.add(op)
        return op

    async def _until_known(self, send: Callable[[int], Awaitable[Operation]], deadline: float) -> Operation:
        op = await send(0)
        attempt, pause = 0, 0.1
        while op.outcome == "unknown" and attempt < self.s.max_retries and self.now() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            attempt += 1
            op = await send(attempt)
        return op

    async def buyer(self, session: aiohttp.ClientSession) -> None:
        while self.now() < self.end or self.fault_pending:
            # Retries may run past the surge's end for a while: an unknown outcome is
            # settled when possible, as a real client would.
            settle_by = self.end + 6.0
            user = self.rng.choice(self.users)
            self._n += 1
            request_id = f"{user}-{self._n}"
            roll = self.rng.random()
            lines = (
                ((self.hot, 1),)
                if roll < 0.6
                else ((self.warm, 1),)
                if roll < 0.92
                else ((self.hot, 1), (self.warm, 1))
            )
            body = {"request_id": request_id, "lines": [{"sku": s, "qty": q} for s, q in lines]}

            def order(
                attempt: int,
                body: dict[str, Any] = body,
                rid: str = request_id,
                u: str = user,
                ls: tuple[tuple[str, int], ...] = lines,
            ) -> Awaitable[Operation]:
                return self._send(session, "order", rid, u, "/api/orders", body, attempt, ls)

            op = await self._until_known(order, settle_by)
            if op.outcome == "failed" and op.code in ("sale_fenced", "overloaded"):
                await asyncio.sleep(0.2)
                continue
            if op.outcome != "ok" or op.order_id is None:
                continue
            if self.rng.random() < self.s.replay_ratio:
                await order(1)  # a client resending after a lost answer: must replay, never a second hold
            order_id = op.order_id
            roll = self.rng.random()
            if roll < self.s.pay_ratio + self.s.cancel_ratio:
                action = "pay" if roll < self.s.pay_ratio else "cancel"

                def close(
                    attempt: int, action: str = action, oid: str = order_id, u: str = user
                ) -> Awaitable[Operation]:
                    return self._send(session, action, oid, u, f"/api/orders/{oid}/{action}", None, attempt)

                closed = await self._until_known(close, settle_by)
                if closed.outcome == "failed" and closed.code == "sale_fenced":
                    await asyncio.sleep(0.3)
                    await self._until_known(close, settle_by)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(3.0, self.s.redis_timeout_s * 4 + 1))
        connector = aiohttp.TCPConnector(limit=self.s.concurrency * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self.buyer(session) for _ in range(self.s.concurrency)))


# ------------------------------------------------------------------------ faults
class Faults:
    """Applies and repairs one fault; blocking server operations run in a thread."""

    def __init__(self, stack: DrillStack, procs: Processes, timeline: Timeline, surge: Surge) -> None:
        self.stack = stack
        self.procs = procs
        self.timeline = timeline
        self.surge = surge
        self.clock = surge.now

    async def run(self, fault: str, at: float, length: float, prefix: str, sale: str) -> None:
        self.requests_key = SaleKeys(prefix, sale).requests  # the sale's idempotency records
        try:
            await self._run(fault, at, length, prefix, sale)
        finally:
            self.surge.fault_pending = False

    async def _run(self, fault: str, at: float, length: float, prefix: str, sale: str) -> None:
        await asyncio.sleep(max(0.0, at - self.clock()))
        if fault == "redis-data-loss":
            await self._redis_data_loss(prefix, sale, length)
        else:
            self.timeline.fault_start = self.clock()
            await getattr(self, "_" + fault.replace("-", "_"))(length)
            if self.timeline.fault_end is None:
                self.timeline.fault_end = self.clock()
        # Keep buying after a late repair: "after" must be measured, not assumed.
        tail = max(2.0, self.surge.s.duration_s / 3)
        if self.timeline.fault_end is not None and self.timeline.fault_end + tail > self.surge.end:
            self.surge.end = self.timeline.fault_end + tail
            self.note(f"surge extended to {self.surge.end:.1f} s to measure the sale after the repair")

    def note(self, text: str) -> None:
        self.timeline.notes.append(f"{self.clock():.2f} s: {text}")

    async def _worker_kill(self, length: float) -> None:
        assert self.procs.worker is not None
        self.procs.worker.send_signal(signal.SIGKILL)
        self.procs.worker.wait()
        self.note(f"worker {self.procs.worker.pid} killed")
        await asyncio.sleep(length)
        self.procs.start_worker()
        self.note("worker restarted (same consumer name: it re-reads its pending entries)")

    async def _service_kill(self, length: float) -> None:
        # Mid-surge every service process listens (the supervisor takes a death before a
        # process listened for a start-up failure and stops everything; after, it restarts it).
        children = self.procs.service_children()
        if not children:
            raise RuntimeError("no service process to kill")
        victim = children[0]
        os.kill(victim, signal.SIGKILL)
        self.note(f"service process {victim} killed (of {children})")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = self.procs.service_children()
            if victim not in now and len(now) == len(children):
                self.note(f"supervisor restarted it: {now}")
                break
            if self.procs.service is not None and self.procs.service.poll() is not None:
                self.note(f"the supervisor exited ({self.procs.service.returncode}) instead of restarting it")
                break
            await asyncio.sleep(0.05)

    async def _postgres_stop(self, length: float) -> None:
        assert self.stack.postgres is not None
        await asyncio.to_thread(self.stack.postgres.stop, "immediate")
        self.note("PostgreSQL stopped (immediate)")
        await asyncio.sleep(length)
        await asyncio.to_thread(self.stack.postgres.start)
        self.note("PostgreSQL started (crash recovery)")

    async def _redis_pause(self, length: float) -> None:
        assert self.stack.redis is not None
        await asyncio.to_thread(self.stack.redis.pause)
        self.note("Redis paused (SIGSTOP)")
        await asyncio.sleep(length)
        await asyncio.to_thread(self.stack.redis.resume)
        self.note("Redis resumed (SIGCONT)")

    async def _redis_restart(self, length: float) -> None:
        assert self.stack.redis is not None
        await asyncio.to_thread(self.stack.redis.restart)
        self.note("Redis restarted (SIGTERM, AOF reloaded)")

    async def _net_latency(self, length: float) -> None:
        assert self.stack.redis_proxy and self.stack.pg_proxy
        self.stack.redis_proxy.set_latency(60, 20)
        self.stack.pg_proxy.set_latency(200, 50)
        self.note("latency: service->Redis 60±20 ms, worker->PostgreSQL 200±50 ms each way")
        await asyncio.sleep(length)
        self.stack.redis_proxy.heal()
        self.stack.pg_proxy.heal()

    async def _net_reset(self, length: float) -> None:
        assert self.stack.redis_proxy and self.stack.pg_proxy
        for proxy in (self.stack.redis_proxy, self.stack.pg_proxy):
            proxy.refuse(True)
            n = proxy.reset()
            self.note(f"{proxy.proxy.name}: {n} connections reset, new ones refused")
        await asyncio.sleep(length)
        self.stack.redis_proxy.heal()
        self.stack.pg_proxy.heal()

    async def _net_blackhole(self, length: float) -> None:
        """What the drill proves needs an order whose script ran while its reply was held.
        Only orders that reach the reserve script in the first moments of a blackhole can
        be one: once the service's sale-book cache (0.5 s) lapses, every order waits on
        that read instead, which never runs a script. A busy machine can send none in
        that moment, so the blackhole is held again, after a repair, until an order
        answered 504 ``outcome_unknown`` has its idempotency record in Redis (read
        directly, not through the proxy): its retry has a real outcome to learn."""
        redis_proxy, pg_proxy = self.stack.redis_proxy, self.stack.pg_proxy
        assert redis_proxy and pg_proxy
        redis = connect(self.stack.redis_url, decode=True, timeout_s=10)
        try:
            for window in range(1, BLACKHOLE_WINDOWS + 1):
                opened = self.clock()
                redis_proxy.blackhole("down")
                pg_proxy.blackhole("both")
                self.note(
                    "blackhole: Redis->service replies held (commands still run), worker<->PostgreSQL held"
                )
                await asyncio.sleep(length)
                unknown = {
                    (op.user, op.key)
                    for op in self.surge.history
                    if op.kind == "order" and op.status == 504 and op.ended >= opened
                }
                ran = 0
                for user, request_id in unknown:
                    ran += await redis.hexists(self.requests_key, SaleKeys.request_field(user, request_id))
                redis_proxy.heal()
                pg_proxy.heal()
                if ran:
                    self.note(f"{ran} of {len(unknown)} order(s) answered 504 had run behind the blackhole")
                    return
                self.note(f"window {window}: none of {len(unknown)} order(s) answered 504 had run")
                await self._an_order_made_after(self.clock())
        finally:
            redis_proxy.heal()
            pg_proxy.heal()
            await redis.aclose()

    async def _an_order_made_after(self, healed: float, within_s: float = 20.0) -> None:
        """Until the repaired service has made an order again (so the next blackhole
        meets fresh caches and connections), at most ``within_s``."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if any(
                op.kind == "order" and op.outcome == "ok" and op.started > healed for op in self.surge.history
            ):
                return
            await asyncio.sleep(0.05)

    async def _redis_data_loss(self, prefix: str, sale: str, length: float) -> None:
        """An older copy is taken, the surge goes on, then the primary is cut off from the
        service, the writer drains what it acknowledged (so everything acknowledged is in
        PostgreSQL — the case where a failover loses nothing a buyer was told, but Redis
        goes back in time), and Redis restarts from the older copy."""

        from flashsale.streams import stream_backlog

        server, proxy = self.stack.redis, self.stack.redis_proxy
        assert server is not None and proxy is not None
        copy = self.procs.logdir / "older-redis"
        await asyncio.sleep(max(0.0, length / 2))
        await asyncio.to_thread(shutil.copytree, server.data_dir, copy)
        self.note("older copy of Redis's data dir taken")
        await asyncio.sleep(max(0.5, length / 2))
        self.timeline.fault_start = self.clock()
        proxy.blackhole("both")
        self.note("service cut off from the primary")
        redis = connect(server.url, decode=True, timeout_s=5)
        try:
            deadline = time.monotonic() + 20
            members = {str(m) for m in await redis.smembers(ServiceKeys(prefix).sales)}
            engines = sorted(m for m in members if m == sale or m.startswith(sale + "-b"))
            while time.monotonic() < deadline:
                backlog = [await stream_backlog(redis, ServiceKeys(prefix).events(e)) for e in engines]
                if all(b.total == 0 for b in backlog):
                    break
                await asyncio.sleep(0.05)
            else:
                self.note("the writer did not drain within 20 s: acknowledged orders may be lost for real")
        finally:
            await redis.aclose()

        def fail_over() -> None:
            server.kill()
            shutil.rmtree(server.data_dir)
            shutil.copytree(copy, server.data_dir)
            server.start()

        await asyncio.to_thread(fail_over)
        proxy.reset()
        proxy.heal()
        self.note("Redis restarted from the older copy")
        redis = connect(server.url, decode=True, timeout_s=5)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not await redis.hget(
                ServiceKeys(prefix).sale(sale), "fenced"
            ):
                await asyncio.sleep(0.05)
            fenced = str(await redis.hget(ServiceKeys(prefix).sale(sale), "fenced") or "")
        finally:
            await redis.aclose()
        self.note(f"sale fenced: {fenced}" if fenced else "the sale was NOT fenced within 20 s")
        done = await asyncio.to_thread(self.procs.run_cli, "recover", "--json", "-")
        try:
            summary = json.loads(done.stdout)
            self.note(
                f"`flashsale recover` exit {done.returncode}: ok={summary['ok']}, "
                f"orders rebuilt {[r['orders'] for r in summary['recovered']]}"
            )
        except (ValueError, KeyError):
            self.note(
                f"`flashsale recover` exit {done.returncode}: {done.stdout[-300:]} {done.stderr[-500:]}"
            )
        self.timeline.fault_end = self.clock()


# ------------------------------------------------------------------------ a drill
async def _admin(
    session: aiohttp.ClientSession, base: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with session.post(base + path, json=body, headers={"Authorization": f"Bearer {_ADMIN}"}) as resp:
        data: dict[str, Any] = await resp.json(content_type=None)
        if resp.status // 100 != 2:
            raise RuntimeError(f"POST {path} answered {resp.status}: {data}")
        return data


async def _wait_ready(base: str, procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if procs.service is not None and procs.service.poll() is not None:
                raise RuntimeError(
                    f"the service exited ({procs.service.returncode}):\n{procs.log_tail('service')}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s:\n{procs.log_tail('service')}")


async def _recorded(database_url: str, prefix: str, sale: str, timeout: float = 10.0) -> bool:
    """Wait until the service's fence guard has recorded the sale (what recovery needs if
    Redis loses it)."""
    import asyncpg

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await conn.fetchval(
                "SELECT count(*) FROM fence_sales WHERE prefix = $1 AND sale = $2", prefix, sale
            ):
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await conn.close()


async def _settle(
    stack: DrillStack, prefix: str, sale: str, history: History, settings: DrillSettings
) -> tuple[CheckReport, Any]:

    from flashsale.pgpool import close_pool, create_pool
    from flashsale.pipeline.audit import run_audit

    await asyncio.sleep(settings.hold_ttl_s + 1.5)  # every hold lapses; the sweeper returns it
    acknowledged = sorted(
        {op.order_id for op in history if op.kind == "order" and op.outcome == "ok" and op.order_id}
    )
    redis = connect(stack.redis_url, decode=True, timeout_s=10)
    pool = await create_pool(stack.database_url, max_size=2, application_name="flashsale-drill-check")
    try:
        audit = await run_audit(
            redis, pool, prefix=prefix, acknowledged=acknowledged, wait_drain_s=30, expiry_grace_s=3
        )
        seen = await observe(redis, pool, prefix=prefix, sale=sale, audit=audit)
        return check(history, seen, lapsed=True, grace_ms=3000), audit
    finally:
        await close_pool(pool)
        await redis.aclose()


def _rates(history: History, timeline: Timeline, recovered_at: float | None) -> dict[str, float]:
    created = sorted(
        op.ended for op in history if op.kind == "order" and op.outcome == "ok" and not op.replayed
    )
    start = timeline.fault_start or 0.0
    back = recovered_at if recovered_at is not None else (timeline.fault_end or start)
    end = timeline.surge_end or (created[-1] if created else 0.0)

    def rate(a: float, b: float) -> float:
        return sum(1 for t in created if a <= t < b) / (b - a) if b - a > 0.05 else 0.0

    return {
        "before": rate(0.0, start),
        "during": rate(start, max(back, start + 0.05)),
        "after": rate(back, end),
    }


def _unknowns(history: History) -> dict[str, int]:
    attempts = [op for op in history if op.outcome == "unknown"]
    by_request = history.orders()
    ids = {(op.user, op.key) for op in attempts if op.kind == "order"}
    had_run = had_not = unsettled = 0
    for rid in ids:
        later = [op for op in by_request[rid] if op.outcome != "unknown"]
        if not later:
            unsettled += 1
        elif any(op.outcome == "ok" and op.replayed for op in later):
            had_run += 1
        else:
            had_not += 1
    return {
        "attempts": len(attempts),
        "request_ids": len(ids),
        "settled": had_run + had_not,
        "had_run": had_run,
        "had_not_run": had_not,
        "unsettled": unsettled,
    }


async def _drill(stack: DrillStack, fault: str, settings: DrillSettings, logdir: Path) -> DrillReport:
    rng = random.Random(settings.seed)
    prefix = "dr" + secrets.token_hex(4)
    sale = "drill-" + secrets.token_hex(3)
    hot, warm = f"{sale}-hot", f"{sale}-warm"
    procs = Processes(stack, prefix, settings, logdir)
    timeline = Timeline()
    base = f"http://127.0.0.1:{procs.port}"
    try:
        procs.start_service()
        procs.start_worker()
        await _wait_ready(base, procs)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await _admin(
                session,
                base,
                "/api/admin/sales",
                {
                    "sale": sale,
                    "open": True,
                    "hold_ttl_s": settings.hold_ttl_s,
                    "skus": [
                        {"sku": hot, "stock": settings.hot_stock, "limit_per_user": 2},
                        {"sku": warm, "stock": settings.warm_stock},
                    ],
                },
            )
            tokens = (
                await _admin(session, base, "/api/admin/tokens", {"prefix": "b", "count": settings.buyers})
            )["tokens"]
        if not await _recorded(stack.database_url, prefix, sale):
            timeline.notes.append(
                "the fence did not record the sale within 10 s: is it installed in the service?"
            )
        t0 = time.monotonic()
        surge = Surge(base, tokens, (hot, warm), settings, t0, rng)
        faults = Faults(stack, procs, timeline, surge)
        fault_task = asyncio.ensure_future(
            faults.run(fault, settings.fault_start, settings.fault_length, prefix, sale)
        )
        await surge.run()
        timeline.surge_end = min(surge.now(), surge.end)
        await fault_task
        check_report, audit = await _settle(stack, prefix, sale, surge.history, settings)
    finally:
        procs.stop()
    history = surge.history
    history.save(logdir / "history.jsonl")
    timeline.notes.append(f"history and logs: {logdir}")
    end = timeline.fault_end or 0.0
    recovered_at = min(
        (
            op.ended
            for op in history
            if op.kind == "order" and op.outcome == "ok" and not op.replayed and op.started >= end
        ),
        default=None,
    )
    created = sorted(
        op.ended for op in history if op.kind == "order" and op.outcome == "ok" and not op.replayed
    )
    window = [t for t in created if (timeline.fault_start or 0) - 1 <= t <= (recovered_at or end) + 1]
    gap = max((b - a for a, b in zip(window, window[1:])), default=None)
    failed = check_report.failed_checks()
    problems = ["checks failed: " + ", ".join(failed)] if failed else []
    if recovered_at is None:
        problems.append("no new order was taken after the repair: the sale never resumed")
    return DrillReport(
        fault=fault,
        verdict="FAIL" if problems else "PASS",
        why="; ".join(problems),
        requests=history.counts(),
        orders_per_s=_rates(history, timeline, recovered_at),
        time_to_recover_s=None if recovered_at is None else max(0.0, recovered_at - end),
        longest_gap_s=gap,
        unknown=_unknowns(history),
        answers=dict(sorted(Counter(f"{op.kind} {op.status} {op.code}".strip() for op in history).items())),
        failed_checks=failed,
        checks=check_report.to_json(),
        audit={"ok": audit.ok, "by_kind": audit.by_kind(), "counts": audit.counts},
        timeline=asdict(timeline),
        settings=asdict(settings),
    )


def run_drill(stack: DrillStack, fault: str, settings: DrillSettings | None = None) -> DrillReport:
    """Run one drill on ``stack`` (see the module docstring). Blocks; returns the report.
    The history (one JSON line per request) and the processes' logs stay in a folder of
    ``stack.workdir`` named in the report's timeline (``logdir``)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    settings = settings or DrillSettings()
    why = stack.can_run(fault)
    if why is not None:
        return DrillReport(
            fault,
            "SKIPPED",
            why,
            {"ok": 0, "failed": 0, "unknown": 0},
            {},
            None,
            None,
            {},
            {},
            [],
            {},
            {},
            {},
            asdict(settings),
        )
    logdir = stack.workdir / f"{fault}-{secrets.token_hex(3)}"
    logdir.mkdir(parents=True)
    return asyncio.run(_drill(stack, fault, settings, logdir))
