"""The command line, as real processes: ``flashsale serve --workers 2`` runs two service
processes on one port (each with its own SO_REUSEPORT listening socket, both answering,
their counters merged in /metrics and /api/admin/stats), replaces one that dies, and
SIGTERM stops all of them; ``flashsale token`` mints tokens the service accepts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from service_support import (
    ADMIN,
    ADMIN_TOKEN,
    TOKEN_SECRET,
    Service,
    buyer,
    expect_json,
    new_id,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale import exit_codes
from flashsale.service.serve import GC_YOUNG_THRESHOLD
from flashsale.service.tokens import verify

REQUESTS = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1:``port`` (state 0A in /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rpartition(":")[2], 16) == port:
            inodes.add(inode)
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.fixture
def serve_two(
    redis_client: Redis, redis_url: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """``flashsale serve --workers 2`` against the suite's Redis, on its own key prefix;
    killed (its whole session) if the test leaves it running."""
    port = _free_port()
    prefix = new_id("serve").replace("-", "")
    env = dict(
        os.environ,
        FLASHSALE_REDIS_URL=redis_url,
        FLASHSALE_TOKEN_SECRET=TOKEN_SECRET,
        FLASHSALE_ADMIN_TOKEN=ADMIN_TOKEN,
        FLASHSALE_KEY_PREFIX=prefix,
        FLASHSALE_USER_RATE="0",
        FLASHSALE_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flashsale",
                "serve",
                "--workers",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, port, prefix
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.returncode not in (0, None):
            print((tmp_path / "serve.log").read_text(errors="replace"))


def _listeners(pid: int, port: int) -> dict[int, set[str]]:
    """Each child of ``pid`` and the sockets it listens on ``port`` with."""
    listening = _listening_inodes(port)
    owned = {}
    for child in _children(pid):
        try:
            owned[child] = _socket_inodes(child) & listening
        except OSError:  # exited meanwhile
            continue
    return owned


async def _wait_until_serving(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> None:
    """Until two workers listen on the port and /healthz answers."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, "flashsale serve exited early"
            owned = _listeners(proc.pid, port)
            if len(owned) == 2 and all(owned.values()):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
            assert time.monotonic() < deadline, f"flashsale serve did not start two workers in time: {owned}"
            await asyncio.sleep(0.1)


async def test_serve_runs_two_processes_on_one_port_and_sigterm_stops_all(
    serve_two: tuple[subprocess.Popen[bytes], int, str], redis_client: Redis
) -> None:
    proc, port, prefix = serve_two
    base = f"http://127.0.0.1:{port}"
    await _wait_until_serving(proc, port)
    # Each worker has its own listening socket on the port (SO_REUSEPORT), and the
    # parent listens on none: the kernel hands connections to the two workers.
    owned = _listeners(proc.pid, port)
    workers = sorted(owned)
    assert len(workers) == 2 and all(len(inodes) == 1 for inodes in owned.values()), owned
    assert len(set().union(*owned.values())) == 2, "the workers share one socket instead of one each"
    assert not _socket_inodes(proc.pid) & _listening_inodes(port)

    # New connection per request: each lands on one worker or the other.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(REQUESTS):
            body = {"request_id": f"r-{i}", "sku": "x", "qty": 0}
            async with http.post(f"{base}/api/orders", json=body, headers=buyer(f"u{i}")) as resp:
                assert resp.status == 422, await resp.text()
        await asyncio.sleep(1.5)  # each worker publishes its counters once a second
        # Both workers answered: each one's own published counters show some of the requests.
        per_worker = {}
        for pid in workers:
            raw = await redis_client.get(f"{prefix}:stats:proc:{pid}")
            assert raw is not None, f"worker {pid} published nothing"
            per_worker[pid] = json.loads(raw)["counts"]["invalid"]
        assert sum(per_worker.values()) == REQUESTS and all(n > 0 for n in per_worker.values()), per_worker

        async with http.get(f"{base}/api/admin/stats", headers=ADMIN) as resp:
            stats = await resp.json()
        assert stats["processes"] == 2 and stats["orders"]["invalid"] == REQUESTS, stats
        # /metrics, whichever worker answers, adds up both (prometheus multi-process mode).
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    invalid = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "flashsale_orders_total" and sample.labels.get("outcome") == "invalid"
    ]
    assert invalid == [REQUESTS], invalid

    # A worker that dies once it was running (both answered above: both listen) is replaced;
    # one that dies before it listened stops everything (see the next test).
    killed = workers[0]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _alive(killed):
        assert time.monotonic() < deadline, "the killed worker did not go"
        await asyncio.sleep(0.02)
    await _wait_until_serving(proc, port)
    workers = sorted(_children(proc.pid))
    assert killed not in workers and len(workers) == 2

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived flashsale serve"
    assert not _listening_inodes(port), "something still listens on the port"


async def test_serve_stops_with_an_error_when_workers_cannot_start(redis_url: str, tmp_path: Path) -> None:
    """The port is taken by a program that does not share it: the workers cannot bind.
    serve says so and exits 64 (a setting to fix) instead of restarting them forever."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = dict(
            os.environ,
            FLASHSALE_REDIS_URL=redis_url,
            FLASHSALE_TOKEN_SECRET=TOKEN_SECRET,
            FLASHSALE_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flashsale", "serve", "--workers", "2", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert code == exit_codes.USAGE, output  # a setting to fix; never 1 ("SLO missed")
    assert "exited while starting" in output and "port" in output
    assert output.count("restarting it") == 0, "it looped restarting workers that cannot start"
    assert not _children(proc.pid)


def _token_cli(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLASHSALE_TOKEN_SECRET"}
    if secret is not None:
        env["FLASHSALE_TOKEN_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "flashsale", "token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_token_command_mints_tokens_the_service_accepts(service: Service) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 5}, opens_at=int(time.time() * 1000) + 60_000, early_access_s=120)
    plain, member = await asyncio.gather(
        asyncio.to_thread(_token_cli, "--user", "alice", "--ttl", "600", secret=TOKEN_SECRET),
        asyncio.to_thread(_token_cli, "--user", "vip", "--member", "--secret", TOKEN_SECRET),
    )
    assert plain.returncode == 0 and member.returncode == 0, (plain.stderr, member.stderr)
    plain_token, member_token = plain.stdout.strip(), member.stdout.strip()
    assert verify(TOKEN_SECRET, plain_token).user == "alice"
    assert abs(verify(TOKEN_SECRET, plain_token).expires - (time.time() + 600)) < 30

    async def order(token: str) -> aiohttp.ClientResponse:
        return await service.client.post(
            "/api/orders",
            json={"request_id": new_id("r"), "sku": sku},
            headers={"Authorization": f"Bearer {token}"},
        )

    # Accepted (not 401); only the member is inside the early-access window.
    await expect_json(await order(plain_token), 409, "sale_not_open")
    await expect_json(await order(member_token), 201)


async def test_token_command_explains_what_is_missing() -> None:
    no_secret, bad_user = await asyncio.gather(
        asyncio.to_thread(_token_cli, "--user", "alice"),
        asyncio.to_thread(_token_cli, "--user", "not a user", secret="s"),
    )
    assert no_secret.returncode == exit_codes.USAGE and "FLASHSALE_TOKEN_SECRET" in no_secret.stderr
    assert bad_user.returncode == exit_codes.USAGE and "user ids" in bad_user.stderr
    assert no_secret.stdout == bad_user.stdout == ""


def test_a_service_process_settles_its_heap_before_it_serves() -> None:
    """What start-up built is frozen out of the collector's sight and the youngest
    generation is collected every GC_YOUNG_THRESHOLD allocations, not Python's 700 (at the
    peak the collector took ~13% of a service process's CPU). Run in a process of its own:
    it changes the interpreter's collector."""
    probe = "import gc; from flashsale.service.serve import settle_heap; settle_heap(); "
    probe += "print(gc.get_freeze_count(), gc.get_threshold()[0])"
    frozen, young = map(
        int, subprocess.check_output([sys.executable, "-c", probe], text=True, timeout=60).split()
    )
    assert frozen > 1000 and young == GC_YOUNG_THRESHOLD > 700
