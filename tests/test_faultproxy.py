"""The fault proxy against a real Redis: traffic passes untouched, and each fault does
what the drills rely on (latency delays, reset breaks connections, a one-way blackhole
lets a command run while its reply never arrives)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flashsale.drills.faultproxy import FaultProxy, ProxyThread


def _client(port: int, timeout: float = 1.0) -> Redis:
    return Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.fixture
async def proxy(redis_client: Redis) -> AsyncIterator[FaultProxy]:
    kwargs = redis_client.connection_pool.connection_kwargs
    p = await FaultProxy(kwargs["host"], kwargs["port"]).start()
    try:
        yield p
    finally:
        await p.aclose()


async def test_passes_traffic_through(proxy: FaultProxy, redis_client: Redis) -> None:
    client = _client(proxy.port)
    try:
        await client.set("k", "v" * 200_000)  # larger than one chunk
        assert await redis_client.get("k") == b"v" * 200_000
        assert await client.get("k") == b"v" * 200_000
        pipe = client.pipeline(transaction=False)
        for _ in range(500):
            pipe.incr("n")
        assert (await pipe.execute())[-1] == 500
    finally:
        await client.aclose()
    assert proxy.stats.accepted >= 1 and proxy.stats.bytes_up > 200_000


async def test_latency_delays_each_round_trip(proxy: FaultProxy) -> None:
    client = _client(proxy.port)
    try:
        await client.ping()
        started = time.perf_counter()
        await client.ping()
        fast = time.perf_counter() - started
        proxy.set_latency(100)
        started = time.perf_counter()
        await client.ping()
        slow = time.perf_counter() - started
        proxy.heal()
        started = time.perf_counter()
        await client.ping()
        healed = time.perf_counter() - started
    finally:
        await client.aclose()
    assert slow >= 0.19, slow  # 100 ms each way
    assert fast < 0.1 and healed < 0.1, (fast, healed)


async def test_reset_breaks_open_connections_and_refuse_new_ones(proxy: FaultProxy) -> None:
    client = _client(proxy.port)
    try:
        await client.ping()
        assert proxy.reset() == 1
        with pytest.raises(RedisConnectionError):
            await client.ping()
        proxy.refuse(True)
        with pytest.raises(RedisConnectionError):
            await client.ping()
        proxy.heal()
        assert await client.ping()
    finally:
        await client.aclose()
    assert proxy.stats.reset >= 2


async def test_blackhole_down_runs_the_command_but_loses_the_reply(
    proxy: FaultProxy, redis_client: Redis
) -> None:
    client = _client(proxy.port, timeout=0.3)
    try:
        await client.ping()
        proxy.blackhole("down")
        with pytest.raises(RedisTimeoutError):
            await client.incr("counter")
        # The command reached Redis: only the answer is missing (an unknown outcome).
        assert await redis_client.get("counter") == b"1"
        proxy.heal()
        assert await client.incr("counter") == 2
    finally:
        await client.aclose()


async def test_blackhole_up_holds_the_command_until_healed(proxy: FaultProxy, redis_client: Redis) -> None:
    client = _client(proxy.port, timeout=0.3)
    raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        proxy.blackhole("up")
        raw_writer.write(b"*2\r\n$4\r\nINCR\r\n$4\r\nheld\r\n")
        await raw_writer.drain()
        await asyncio.sleep(0.3)
        assert await redis_client.get("held") is None  # not delivered while blackholed
        proxy.heal()
        assert await asyncio.wait_for(raw_reader.readline(), 2) == b":1\r\n"  # nothing was dropped
    finally:
        raw_writer.close()
        await raw_writer.wait_closed()
        await client.aclose()


def test_proxy_thread_is_controlled_from_another_thread(redis_client: Redis) -> None:
    kwargs = redis_client.connection_pool.connection_kwargs

    async def ping(port: int) -> float:
        client = _client(port)
        try:
            started = time.perf_counter()
            await client.ping()
            return time.perf_counter() - started
        finally:
            await client.aclose()

    with ProxyThread(kwargs["host"], kwargs["port"], name="t") as proxy:
        assert asyncio.run(ping(proxy.port)) < 0.5
        proxy.set_latency(150)
        assert proxy.faults["latency_ms"] == 150
        assert asyncio.run(ping(proxy.port)) >= 0.29
        proxy.heal()
        assert proxy.faults == {"latency_ms": 0.0, "blackholed": [], "refusing": False}


def test_the_command_line_proxy_takes_faults_from_stdin(redis_client: Redis) -> None:
    import socket
    import subprocess
    import sys

    kwargs = redis_client.connection_pool.connection_kwargs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flashsale.drills.faultproxy",
            "--listen",
            str(port),
            "--target",
            f"{kwargs['host']}:{kwargs['port']}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert "proxying" in proc.stdout.readline()

        async def ping() -> float:
            client = _client(port)
            try:
                started = time.perf_counter()
                await client.ping()
                return time.perf_counter() - started
            finally:
                await client.aclose()

        assert asyncio.run(ping()) < 0.5
        proc.stdin.write("latency 150\nstats\n")
        proc.stdin.flush()
        assert "latency_ms': 150" in proc.stdout.readline()
        assert asyncio.run(ping()) >= 0.29
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
