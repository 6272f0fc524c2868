"""The opening burst: N buyers, each on a fresh TCP connection, post one order at the same
instant; how long until the last of them hears back — against the service and, the same
burst, against the trivial endpoint.

At T0 of a flash sale every buyer who was waiting presses "buy" within the same moment,
and many of them arrive on connections the server has never seen. For each burst:

1. N connections are opened (concurrently), one per buyer — the *connect* phase, timed
   but not part of the figure;
2. a barrier: nothing is sent until every connection is up;
3. every buyer's ``POST /api/orders`` (its own token, its own request id) is written in
   one loop pass, and the clock starts;
4. each answer is read to its last byte; the figure is the time until the **last** one
   (``max ms``), with p50 and p99 beside it. Every connection is closed after its answer.

The load generator is this process, on its event loop, with no HTTP client library: each
request is encoded before the barrier and written as raw bytes, and an answer is parsed
only far enough to know its status and that its body is complete. Its CPU share over the
burst is reported; above ~90 % of a core the figure measures the generator, and the
table says so. The trivial endpoint (``benchmarks.hello_app``) and the service (``flashsale
serve --workers 1``) are served the same way (one process, uvloop, backlog 4096); both
stay up, a warm-up burst goes to each, then the measured bursts alternate between them,
round after round (fresh buyers every burst). The ratio is the service's time until the
last answer over the trivial endpoint's, median of the per-round ratios: issue 15's goal
is at most 1.5x.

Run alone: ``python -m benchmarks.burst_bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from .harness import CpuMeter, PidTreeCpu, process_cpu_seconds, run_queue_seconds
from .report import Figure
from .rounds import combine
from .served import HOT_SKU, OrderService, Served, forget_prefix, hello_app, order_service
from .servers import Servers
from .settings import BenchSettings

__all__ = ["CEILING", "SERVICE", "Burst", "burst", "measure_burst"]

SECTION = "burst"
CEILING = "opening burst, trivial endpoint"
SERVICE = "opening burst, POST /api/orders"
#: Seconds a buyer waits for its answer before it counts as unanswered.
ANSWER_TIMEOUT_S = 30.0


def order_request(host: str, token: str, request_id: str) -> bytes:
    """One buyer's order, as the bytes that go on the wire."""
    body = json.dumps({"request_id": request_id, "sku": HOT_SKU, "qty": 1}, separators=(",", ":")).encode()
    head = (
        f"POST /api/orders HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Buyer(asyncio.Protocol):
    """One buyer's connection: sends its order when told to, reads one answer, closes."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = bytearray()
        self._need: int | None = None  # bytes of head + body, once the head is complete
        self.status = 0
        #: The status with the stable error code of a refusal ("429 overloaded").
        self.outcome = ""
        self.answered_at: float | None = None
        self.error: str | None = None
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self) -> None:
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = next(
                (
                    int(line.split(":", 1)[1])
                    for line in head[1:]
                    if line.lower().startswith("content-length:")
                ),
                None,
            )
            if length is None:  # every answer of both servers has a length; anything else is odd
                self._finish(f"answer without Content-Length (status {self.status})")
                return
            self._need = end + 4 + length
        if len(self._buffer) >= self._need:
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self.answered.done():
            return
        self.answered_at = time.perf_counter()
        self.error = error
        self.answered.set_result(None)
        self._transport.close()
        self.outcome = str(self.status)
        if self.status >= 300 and self._need is not None:  # after the clock: which refusal
            try:
                body = json.loads(bytes(self._buffer[self._buffer.find(b"\r\n\r\n") + 4 : self._need]))
                self.outcome += f" {body['error']}"
            except (ValueError, KeyError, TypeError):
                pass

    def give_up(self, why: str) -> None:
        if not self.answered.done():
            self.error = why
            self.answered.set_result(None)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.error = f"connection closed before the answer: {exc or 'by the server'}"
            self.answered.set_result(None)


@dataclass(frozen=True)
class Burst:
    """What one burst did, times in seconds from the moment the orders were released."""

    buyers: int
    connect_s: float
    send_s: float
    #: Per answered buyer: seconds from the release to the last byte of its answer.
    answers: tuple[float, ...]
    #: Answers by outcome: "201", "429 overloaded" …
    outcomes: Counter[str]
    unanswered: int
    first_error: str | None
    cpu_s: float
    wait_s: float | None
    server_cpu_s: float | None

    @property
    def last_s(self) -> float:
        return max(self.answers, default=0.0)

    def percentile_ms(self, p: float) -> float | None:
        if not self.answers:
            return None
        ordered = sorted(self.answers)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] * 1000

    def figure(self, name: str) -> Figure:
        wall = self.last_s
        notes = []
        if self.unanswered:
            notes.append(f"{self.unanswered:,} never answered; first: {self.first_error}")
        return Figure(
            section=SECTION,
            name=name,
            rate=len(self.answers) / wall if wall > 0 else 0.0,
            unit="answers/s",
            clients=self.buyers,
            generator_cpu=self.cpu_s / wall if wall > 0 else None,
            generator_wait=None if self.wait_s is None or wall <= 0 else self.wait_s / wall,
            server_cpu=None if self.server_cpu_s is None or wall <= 0 else self.server_cpu_s / wall,
            p50_ms=self.percentile_ms(50),
            p99_ms=self.percentile_ms(99),
            max_ms=wall * 1000,
            granted=self.outcomes.get("201", 0),
            errors=self.unanswered,
            wall_s=wall,
            notes=tuple(notes),
        )


async def burst(host: str, port: int, requests: Sequence[bytes], server: CpuMeter | None = None) -> Burst:
    """Connect one buyer per request, then release every order at once; wait for all.
    ``server`` reads the server's CPU time, before the release and after the last answer."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    connected = await asyncio.gather(
        *(loop.create_connection(functools.partial(_Buyer, r), host, port) for r in requests),
        return_exceptions=True,
    )
    buyers = [pair[1] for pair in connected if not isinstance(pair, BaseException)]
    refused = [pair for pair in connected if isinstance(pair, BaseException)]
    connect_s = time.perf_counter() - started
    server_before = None if server is None else await server.seconds()
    cpu_before, wait_before = process_cpu_seconds(), run_queue_seconds()
    released = time.perf_counter()
    for buyer in buyers:
        buyer.send()
    sent = time.perf_counter()
    if buyers:
        await asyncio.wait([b.answered for b in buyers], timeout=ANSWER_TIMEOUT_S)
    cpu = process_cpu_seconds() - cpu_before
    wait_after = run_queue_seconds()
    server_after = None if server is None else await server.seconds()
    answers = [b.answered_at - released for b in buyers if b.answered_at is not None and b.error is None]
    failed = [b for b in buyers if b.answered_at is None or b.error is not None]
    for b in failed:
        b.give_up(f"no answer within {ANSWER_TIMEOUT_S:g} s")
    errors = [f"could not connect: {exc}" for exc in refused] + [str(b.error) for b in failed]
    return Burst(
        buyers=len(requests),
        connect_s=connect_s,
        send_s=sent - released,
        answers=tuple(answers),
        outcomes=Counter(b.outcome for b in buyers if b.answered_at is not None and b.error is None),
        unanswered=len(errors),
        first_error=errors[0] if errors else None,
        cpu_s=cpu,
        wait_s=None if wait_before is None or wait_after is None else wait_after - wait_before,
        server_cpu_s=None if server_before is None or server_after is None else server_after - server_before,
    )


async def _burst_at(server: Served, tokens: Sequence[str], ids: str) -> Burst:
    host = f"127.0.0.1:{server.port}"
    requests = [order_request(host, token, f"{ids}-{i}") for i, token in enumerate(tokens)]
    return await burst("127.0.0.1", server.port, requests, PidTreeCpu(server.pid))


async def measure_burst(servers: Servers, settings: BenchSettings) -> list[Figure]:
    """Both figures, median of ``settings.rounds`` alternating rounds; the service's ratio
    is its time until the last answer over the trivial endpoint's, per round."""
    n = settings.burst_buyers
    service = OrderService.for_run(servers, "burst")
    workdir = Path(tempfile.mkdtemp(prefix="flashsale-burst-bench-"))
    bursts: dict[str, list[Burst]] = {CEILING: [], SERVICE: []}
    try:
        async with hello_app(workdir) as hello, order_service(service, workdir) as served:
            await service.open_sale(served.url)
            # Fresh buyers for every burst (one order each): none is near its rate limit.
            tokens = await service.buyer_tokens(served.url, "burst", n * (settings.rounds + 1))
            warm = tokens[:n]
            await _burst_at(hello, warm, "warm")
            await _burst_at(served, warm, "warm")
            for r in range(settings.rounds):
                mine = tokens[n * (r + 1) : n * (r + 2)]
                bursts[CEILING].append(await _burst_at(hello, mine, f"h{r}"))
                bursts[SERVICE].append(await _burst_at(served, mine, f"s{r}"))
    finally:
        await forget_prefix(servers, service.prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    ceiling = [b.figure(CEILING) for b in bursts[CEILING]]
    orders = [
        replace(
            b.figure(SERVICE),
            ratio=b.last_s / c.last_s if c.last_s > 0 and b.last_s > 0 else None,
            ratio_to="trivial, time to last answer",
        )
        for b, c in zip(bursts[SERVICE], bursts[CEILING], strict=True)
    ]
    return [
        combine(ceiling, notes=_summary(bursts[CEILING])),
        combine(orders, notes=_summary(bursts[SERVICE])),
    ]


def _summary(bursts: Sequence[Burst]) -> list[str]:
    """What every round's answers were, and how long connecting and sending took."""
    outcomes = sum((b.outcomes for b in bursts), Counter[str]())
    answered = ", ".join(f"{n:,} x {outcome}" for outcome, n in sorted(outcomes.items()))
    connect = statistics.median(b.connect_s for b in bursts) * 1000
    send = statistics.median(b.send_s for b in bursts) * 1000
    return [
        f"answers: {answered or 'none'}",
        f"connect phase {connect:.0f} ms, all sent in {send:.1f} ms (medians)",
    ]


if __name__ == "__main__":
    from .runner import main

    raise SystemExit(main(["--only", SECTION, *sys.argv[1:]]))
