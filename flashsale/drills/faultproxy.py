"""The fault proxy: a small asyncio TCP proxy put between a client (the service, the
worker) and a server (Redis, PostgreSQL) so a drill can degrade the network on demand.

Toxiproxy is not installable here; this does the three faults the drills need:

* **latency** — every chunk is delayed by ``ms`` (± ``jitter_ms``) in each direction,
  order preserved, pipelining kept (a chunk does not wait for the previous one's delay);
* **reset** — every open connection is closed with a TCP RST (``SO_LINGER 0``), and
  while ``refuse`` is on, new connections are reset as soon as they are accepted;
* **blackhole** — bytes stop moving in one direction (``down``: server → client, the
  replies; ``up``: client → server, the requests) or both. Nothing is dropped: bytes
  wait in the proxy and the kernel's buffers, as they would behind a partition while
  TCP retransmits, and flow again after :meth:`FaultProxy.heal` — by which time the
  client has usually timed out and closed the connection.

:class:`FaultProxy` runs in the caller's event loop; :class:`ProxyThread` runs one in a
thread of its own (with its own loop), so a busy load generator in the main loop does not
add latency of its own to the proxied traffic. Every control method of
:class:`ProxyThread` is thread-safe.

Run it by hand in front of your own servers::

    python -m flashsale.drills.faultproxy --listen 6390 --target 127.0.0.1:6379

then type ``latency 200``, ``blackhole down``, ``reset``, ``refuse``, ``heal`` or ``stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

__all__ = ["Direction", "FaultProxy", "ProxyStats", "ProxyThread"]

Direction = Literal["up", "down", "both"]
_CHUNK = 65536
_T = TypeVar("_T")


@dataclass(slots=True)
class ProxyStats:
    accepted: int = 0
    open: int = 0
    reset: int = 0  # connections this proxy ended with an RST
    bytes_up: int = 0
    bytes_down: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: the peer sees 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: client <-> proxy <-> server."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.ensure_future(self._direction("up", self.client_reader, self.server_writer)),
            asyncio.ensure_future(self._direction("down", self.server_reader, self.client_writer)),
        ]

    async def _direction(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(name, queue, writer))
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.proxy._gate(name).wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await queue.put((loop.time() + self.proxy._delay_s(), data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await sender
            self.close()

    async def _send(
        self, name: str, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.proxy._gate(name).wait()
            writer.write(data)
            await writer.drain()
            if name == "up":
                self.proxy.stats.bytes_up += len(data)
            else:
                self.proxy.stats.bytes_down += len(data)
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    def close(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            if not writer.is_closing():
                writer.close()
        if self in self.proxy._links:
            self.proxy._links.discard(self)
            self.proxy.stats.open -= 1

    def reset(self) -> None:
        _rst(self.client_writer)
        _rst(self.server_writer)
        for task in self.tasks:
            task.cancel()
        if self in self.proxy._links:
            self.proxy._links.discard(self)
            self.proxy.stats.open -= 1
            self.proxy.stats.reset += 1


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port`` with faults
    switched on and off at run time (see the module docstring). Use in one event loop."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "proxy",
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.name = name
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._latency_s = 0.0
        self._jitter_s = 0.0
        self._refusing = False
        self._gates: dict[str, asyncio.Event] = {}

    # -- life
    async def start(self) -> Self:
        self._gates = {"up": asyncio.Event(), "down": asyncio.Event()}
        for gate in self._gates.values():
            gate.set()
        self._server = await asyncio.start_server(self._accept, *self.listen, reuse_address=True)
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    async def aclose(self) -> None:
        for gate in self._gates.values():
            gate.set()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- faults
    def set_latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every chunk by ``ms`` ± ``jitter_ms`` milliseconds (0 = none)."""
        self._latency_s = max(ms, 0.0) / 1000
        self._jitter_s = max(jitter_ms, 0.0) / 1000

    def blackhole(self, direction: Direction = "both") -> None:
        """Stop moving bytes in ``direction`` until :meth:`heal`."""
        for name in ("up", "down") if direction == "both" else (direction,):
            self._gates[name].clear()

    def reset(self) -> int:
        """RST every open connection now; returns how many."""
        links = list(self._links)
        for link in links:
            link.reset()
        return len(links)

    def refuse(self, on: bool = True) -> None:
        """While on, every new connection is reset as soon as it is accepted."""
        self._refusing = on

    def heal(self) -> None:
        """Undo every fault: no latency, bytes flow both ways, new connections accepted."""
        self._latency_s = self._jitter_s = 0.0
        self._refusing = False
        for gate in self._gates.values():
            gate.set()

    @property
    def faults(self) -> dict[str, Any]:
        return {
            "latency_ms": round(self._latency_s * 1000, 3),
            "blackholed": [n for n, g in self._gates.items() if not g.is_set()],
            "refusing": self._refusing,
        }

    # -- internals
    def _gate(self, name: str) -> asyncio.Event:
        return self._gates[name]

    def _delay_s(self) -> float:
        if not self._latency_s:
            return 0.0
        return max(0.0, self._latency_s + random.uniform(-self._jitter_s, self._jitter_s))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._refusing:
            self.stats.reset += 1
            _rst(writer)
            return
        try:
            server = await asyncio.wait_for(asyncio.open_connection(*self.target), timeout=5)
        except (OSError, TimeoutError):
            self.stats.reset += 1
            _rst(writer)  # the server is down: the client sees what it would see without us
            return
        link = _Link(self, (reader, writer), server)
        self._links.add(link)
        self.stats.open += 1
        link.start()


class ProxyThread:
    """A :class:`FaultProxy` in a thread with its own event loop; a context manager.
    Every method may be called from any thread."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_port: int = 0, name: str = "proxy"
    ) -> None:
        self.proxy = FaultProxy(target_host, target_port, listen_port=listen_port, name=name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"faultproxy-{name}", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self.proxy.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def stats(self) -> ProxyStats:
        return self.proxy.stats

    def set_latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        self._run(lambda: self.proxy.set_latency(ms, jitter_ms))

    def blackhole(self, direction: Direction = "both") -> None:
        self._run(lambda: self.proxy.blackhole(direction))

    def reset(self) -> int:
        return self._run(self.proxy.reset)

    def refuse(self, on: bool = True) -> None:
        self._run(lambda: self.proxy.refuse(on))

    def heal(self) -> None:
        self._run(self.proxy.heal)

    @property
    def faults(self) -> dict[str, Any]:
        return self._run(lambda: self.proxy.faults)

    def _call(self, coro: Awaitable[_T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def _run(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._call(call())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashsale.drills.faultproxy",
        description=(
            "Proxy 127.0.0.1:LISTEN to TARGET and read fault commands from stdin, one per line: "
            "'latency MS [JITTER_MS]', 'blackhole [up|down|both]', 'reset', 'refuse', 'heal', "
            "'stats', 'quit'. Point the service (FLASHSALE_REDIS_URL) or the worker "
            "(FLASHSALE_DATABASE_URL) at the listening port."
        ),
    )
    parser.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--target", required=True, help="HOST:PORT of the real server")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    with ProxyThread(host or "127.0.0.1", int(port), listen_port=args.listen, name="cli") as proxy:
        print(f"proxying 127.0.0.1:{proxy.port} -> {args.target}", flush=True)
        for line in sys.stdin:
            word, *rest = line.split() or [""]
            if word == "latency" and rest:
                proxy.set_latency(float(rest[0]), float(rest[1]) if len(rest) > 1 else 0.0)
            elif word == "blackhole":
                proxy.blackhole(rest[0] if rest else "both")  # type: ignore[arg-type]
            elif word == "reset":
                print(f"reset {proxy.reset()} connection(s)", flush=True)
            elif word == "refuse":
                proxy.refuse(True)
            elif word == "heal":
                proxy.heal()
            elif word == "stats":
                print(proxy.stats, proxy.faults, flush=True)
            elif word in ("quit", "exit"):
                break
            elif word:
                print(f"unknown command {word!r}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
