"""Instructions per order: the order service beside the trivial endpoint, each counted by
callgrind, so that a change to the hot path can be judged on a busy machine.

    python -m benchmarks.instructions_bench [--quick] [--seconds 20] [--json FILE]

The ``service`` benchmark's throughput ratio is the goal of issue 15, but on a shared 2-core
machine its rounds spread by a quarter and more: a change of a few percent cannot be seen in
it. Instructions do not depend on what else the machine runs. Each server runs alone under
``valgrind --tool=callgrind`` (Debian package ``valgrind``), with instrumentation switched on
only once it has started and warmed up:

* The load is lock-step: ``--connections`` (32) keep-alive connections, and in each round
  every connection posts one order at once and the round ends when all are answered. Under
  valgrind a server is ~50x slower than it is, so a closed loop such as ``wrk`` would give it
  batches that depend on how busy the machine is (and the cost of an order depends on its
  batch's size); lock-step rounds give it the same batches however fast it runs.
* What a server does with no request at all (timers, the service's once-a-second publishing
  and sale-book reads) is counted over an idle window of its own, and that rate times the
  loaded window is taken off: the figure is instructions per request, net of idle.
* The ratio is the trivial endpoint's instructions per request over the service's per order:
  the CPU-cost ratio the ``service`` benchmark prints beside its throughput ratio, without
  the machine in it. Instructions are not time (cache misses and system calls are not in
  them), so it is a way to judge a change, not the goal's figure.

Servers: ``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` when set (``python -m
benchmarks`` passes its own), else embedded ones started here. Exit 0 with a note, and no
figures, when valgrind is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flashsale.runtime.embedded import EmbeddedStack

from .callgrind import Counter, run_counted, wrapper
from .served import HOT_SKU, OrderService, Served, forget_prefix
from .servers import Servers, open_servers

__all__ = ["Reading", "lockstep", "main", "measure_instructions", "net_per_request"]

CONNECTIONS = 32
TOKENS = 2_000
#: How long a server under valgrind may take to start (it imports everything ~50x slower).
START_S = 600.0


@dataclass(frozen=True)
class Reading:
    """One server's count: requests answered with 2xx in the loaded window, the
    instructions of that window and of an idle one, and what that makes per request."""

    server: str
    requests: int
    loaded_s: float
    loaded_instructions: int
    idle_s: float
    idle_instructions: int

    @property
    def per_request(self) -> float:
        return net_per_request(self)


def net_per_request(r: Reading) -> float:
    """Instructions per request of the loaded window, less what the server spends idle
    over the same length of time."""
    idle_rate = r.idle_instructions / r.idle_s if r.idle_s > 0 else 0.0
    return (r.loaded_instructions - idle_rate * r.loaded_s) / max(r.requests, 1)


def _order(token: str, request_id: str) -> bytes:
    body = b'{"request_id":"%s","sku":"%s","qty":1}' % (request_id.encode(), HOT_SKU.encode())
    return (
        b"POST /api/orders HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body)
    )


async def lockstep(port: int, tokens: list[str], *, seconds: float, prefix: str) -> tuple[int, float]:
    """Rounds of one order per connection, all sent at once, until ``seconds`` have passed:
    (2xx answers, seconds taken)."""
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    sent = ok = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            for _, writer in streams:
                writer.write(_order(tokens[sent % len(tokens)], f"{prefix}{sent}"))
                sent += 1
            for reader, _ in streams:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                ok += 200 <= int(head.split(b" ", 2)[1]) < 300
        return ok, time.monotonic() - started
    finally:
        for _, writer in streams:
            writer.close()


class _Counted:
    """A server under callgrind, instrumentation off until :meth:`count` switches it on."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], ready: str, workdir: Path) -> None:
        self.name = name
        self._out = workdir / f"callgrind.{name}"
        self.served = Served(
            [*wrapper(self._out), *command], env, ready, workdir / f"{name}.log", ready_s=START_S
        )

    async def count(self, tokens: list[str], *, warmup_s: float, idle_s: float, seconds: float) -> Reading:
        port = self.served.port
        await lockstep(port, tokens, seconds=warmup_s, prefix=f"w{time.time_ns()}-")
        counter = Counter(self.served.pid, self._out)
        await asyncio.to_thread(counter.start)
        started = time.monotonic()
        await asyncio.sleep(idle_s)
        idle = await asyncio.to_thread(counter.window)
        idle_taken = time.monotonic() - started
        ok, loaded_s = await lockstep(port, tokens, seconds=seconds, prefix=f"r{time.time_ns()}-")
        loaded = await asyncio.to_thread(counter.window)
        return Reading(self.name, ok, loaded_s, loaded, idle_taken, idle)


async def measure_instructions(
    servers: Servers, workdir: Path, *, warmup_s: float, idle_s: float, seconds: float
) -> list[Reading]:
    """The trivial endpoint, then the service, each alone under callgrind."""
    readings = []
    trivial = _Counted(
        "trivial",
        [sys.executable, "-m", "benchmarks.hello_app"],
        dict(os.environ),
        "/healthz",
        workdir,
    )
    async with trivial.served:
        readings.append(await trivial.count(["none"], warmup_s=warmup_s, idle_s=idle_s, seconds=seconds))
    service = OrderService.for_run(servers, "instr")
    counted = _Counted(
        "service",
        [sys.executable, "-m", "flashsale", "serve", "--workers", "1"],
        # The Redis deadline stays far beyond what valgrind's slowness makes of a round trip.
        {**service.environ(), "FLASHSALE_REDIS_TIMEOUT_S": "30"},
        "/readyz",
        workdir,
    )
    try:
        async with counted.served:
            await service.open_sale(counted.served.url)
            tokens = await service.buyer_tokens(counted.served.url, "ib", TOKENS)
            readings.append(await counted.count(tokens, warmup_s=warmup_s, idle_s=idle_s, seconds=seconds))
    finally:
        await forget_prefix(servers, service.prefix)
    return readings


def render(readings: list[Reading]) -> str:
    rows = [
        "| server | requests (2xx) | instructions per request, net of idle | idle instructions/s |",
        "|---|---|---|---|",
    ]
    for r in readings:
        rows.append(
            f"| {r.server} | {r.requests:,} | {r.per_request / 1000:,.1f}k | "
            f"{r.idle_instructions / max(r.idle_s, 1e-9) / 1e6:,.2f}M |"
        )
    by = {r.server: r for r in readings}
    if "trivial" in by and "service" in by:
        ratio = by["trivial"].per_request / by["service"].per_request
        rows.append(
            f"\nCPU-cost ratio by instructions (trivial per request / service per order): {ratio:.2f}x "
            "(issue 15's goal judges throughput: >= 0.6x)"
        )
    return "\n".join(rows)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    stack = await asyncio.to_thread(EmbeddedStack().start)  # or the servers the environment names
    try:
        with tempfile.TemporaryDirectory(prefix="flashsale-instructions-") as tmp:
            readings = await measure_instructions(
                open_servers(stack), Path(tmp), warmup_s=args.warmup, idle_s=args.idle, seconds=args.seconds
            )
    finally:
        await asyncio.to_thread(stack.stop)
    print(render(readings), flush=True)
    by = {r.server: r for r in readings}
    return {
        "machine": {"python": platform.python_version(), "cores": os.cpu_count()},
        "settings": {
            "connections": CONNECTIONS,
            "warmup_s": args.warmup,
            "idle_s": args.idle,
            "seconds": args.seconds,
        },
        "readings": [{**asdict(r), "per_request": round(r.per_request)} for r in readings],
        "ratio": round(by["trivial"].per_request / by["service"].per_request, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short windows (CI): 3 s loaded, 2 s idle, 2 s warm-up"
    )
    parser.add_argument("--seconds", type=float, help="seconds of the loaded window (default 20)")
    parser.add_argument("--json", type=Path, help="write the readings here")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 20.0)
    args.idle = 2.0 if args.quick else 10.0
    args.warmup = 2.0 if args.quick else 10.0
    return run_counted("instructions", lambda: _run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
