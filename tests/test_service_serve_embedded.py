"""``flashsale serve --embedded`` (the README's try-out): it starts Redis and PostgreSQL,
migrates, prints the variables that reach them, serves with a worker beside it (orders
reach PostgreSQL, unpaid holds lapse), and on Ctrl-C stops the service, the worker and
both servers — nothing left running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import asyncpg
import psutil

from flashsale.runtime.embedded import RedisServer
from flashsale.service.tokens import mint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _post(url: str, body: dict[str, Any], token: str) -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return int(resp.status)


def _order_status_in_postgres(database_url: str, user: str) -> str | None:
    async def read() -> str | None:
        conn = await asyncpg.connect(database_url)
        try:
            status: str | None = await conn.fetchval("SELECT status FROM orders WHERE user_id = $1", user)
            return status
        finally:
            await conn.close()

    return asyncio.run(read())


def _start_tryout(port: int) -> tuple[subprocess.Popen[str], dict[str, str], list[psutil.Process]]:
    """Start ``flashsale serve --embedded`` and wait until it is ready: the process, the
    variables it exported, and its children (servers, worker, service processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve", "--embedded", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    exported: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("export "):
            name, _, value = line[len("export ") :].strip().partition("=")
            exported[name] = value
        if line.startswith("# serving"):
            break
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the embedded service never became ready"
        time.sleep(0.2)
    return proc, exported, psutil.Process(proc.pid).children(recursive=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_serve_embedded_starts_everything_and_stops_it_on_ctrl_c() -> None:
    port = _free_port()
    proc, exported, children = _start_tryout(port)
    try:
        assert set(exported) == {
            "FLASHSALE_REDIS_URL",
            "FLASHSALE_DATABASE_URL",
            "FLASHSALE_TOKEN_SECRET",
            "FLASHSALE_ADMIN_TOKEN",
        }
        names = {c.name() for c in children}
        engine = RedisServer().binary.name[:15]  # e.g. valkey-server, the default engine
        assert engine in names and any("postgres" in n for n in names), names
        assert any("worker" in c.cmdline() for c in children), "no worker runs beside the try-out"

        # The worker really works: an unpaid hold reaches PostgreSQL, then lapses there.
        base = f"http://127.0.0.1:{port}"
        sale = {"sale": "tryout", "skus": [{"sku": "tee", "stock": 5}], "open": True, "hold_ttl_s": 1}
        assert _post(f"{base}/api/admin/sales", sale, exported["FLASHSALE_ADMIN_TOKEN"]) == 201
        buyer = mint(exported["FLASHSALE_TOKEN_SECRET"], "alice")
        assert _post(f"{base}/api/orders", {"request_id": "r1", "sku": "tee"}, buyer) == 201
        deadline = time.monotonic() + 60
        while (status := _order_status_in_postgres(exported["FLASHSALE_DATABASE_URL"], "alice")) != "expired":
            assert time.monotonic() < deadline, f"the order never lapsed in PostgreSQL (status {status})"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        _stop(proc)


def test_a_killed_tryout_leaves_nothing_running() -> None:
    """``kill -9`` of ``serve --embedded`` (a closed terminal, an OOM kill): its servers and
    the worker beside it go with it, instead of retrying vanished stores for ever."""
    proc, _, children = _start_tryout(_free_port())
    try:
        assert any("worker" in c.cmdline() for c in children)
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, f"left running after the try-out was killed: {[p.cmdline() for p in alive]}"
    finally:
        _stop(proc)
