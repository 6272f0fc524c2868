"""``flashsale serve`` asks its stores once before it starts: a database URL that can never
work stops the start with one line (exit 64, the password blanked out), and a Redis that
does not answer is said at start — the service still starts and waits for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

from redis_mode import on_cluster
from service_support import ADMIN_TOKEN, TOKEN_SECRET

from flashsale import exit_codes
from flashsale.runtime.cluster import RedisClusterServer

PASSWORD = "s3cretpw"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return {**env, "FLASHSALE_TOKEN_SECRET": TOKEN_SECRET, "FLASHSALE_ADMIN_TOKEN": ADMIN_TOKEN}


def _serve(*args: str, cluster: bool = on_cluster()) -> subprocess.CompletedProcess[str]:
    """``flashsale serve`` with ``args``; ``cluster``: FLASHSALE_REDIS_CLUSTER=1 (the suite's
    Redis is a cluster under FLASHSALE_TEST_REDIS=cluster)."""
    return subprocess.run(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(_free_port()), *args],
        env={**_env(), "FLASHSALE_REDIS_CLUSTER": "1"} if cluster else _env(),
        capture_output=True,
        text=True,
        timeout=90,
    )


def _one_clear_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == exit_codes.USAGE, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    return lines[0]


def test_a_database_that_refuses_the_url_stops_serve_at_start(redis_url: str, database_url: str) -> None:
    parts = urlsplit(database_url)
    wrong = urlunsplit(
        parts._replace(
            netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}", path="/no_such_db"
        )
    )
    line = _one_clear_line(_serve("--redis-url", redis_url, "--database-url", wrong))
    assert "no_such_db" in line and "does not exist" in line and ":***@" in line, line


def test_a_url_that_is_not_postgresql_is_one_line(redis_url: str) -> None:
    line = _one_clear_line(
        _serve("--redis-url", redis_url, "--database-url", f"mysql://shop:{PASSWORD}@db/shop")
    )
    assert "FLASHSALE_DATABASE_URL" in line and "postgresql://" in line, line
    line = _one_clear_line(_serve("--redis-url", f"http://:{PASSWORD}@cache:6379"))
    assert "FLASHSALE_REDIS_URL" in line and "redis://" in line, line


def test_a_cluster_node_given_as_one_server_stops_serve_at_start(
    redis_cluster_server: RedisClusterServer,
) -> None:
    """FLASHSALE_REDIS_CLUSTER forgotten: the node answers PING, so the service would start
    and most keys would answer MOVED. It refuses, saying what to set (exit 64: a setting)."""
    line = _one_clear_line(_serve("--redis-url", redis_cluster_server.url, cluster=False))
    assert "Redis Cluster" in line and "set FLASHSALE_REDIS_CLUSTER=1" in line, line


def test_an_unreachable_redis_is_said_at_start() -> None:
    nobody = f"redis://:{PASSWORD}@127.0.0.1:{_free_port()}/0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(_free_port()), "--redis-url", nobody],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if "service process starting" in line:
                break
        said = [line for line in seen if "does not answer at start" in line]
        assert said and "Redis at redis://:***@127.0.0.1" in said[0], seen
        assert proc.poll() is None, "serve gave up; it should wait for Redis (/readyz says 503 meanwhile)"
        assert PASSWORD not in "".join(seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
