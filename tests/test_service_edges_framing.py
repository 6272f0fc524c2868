"""The connection's edges, with raw sockets against a real service process: how long a
client may hold a connection without sending a whole request. A request head must arrive
within ``FLASHSALE_READ_TIMEOUT`` of its first byte (as its body must), else 408 JSON and the
connection is closed; a connection that sends nothing is closed after
``FLASHSALE_IDLE_TIMEOUT``; after a 408 the connection is closed at once, not lingered on.

aiohttp alone has no deadline for a head: a connection trickling one header byte at a
time was held until the keep-alive timer (an hour with aiohttp's defaults), each one a
file descriptor of the process's few thousand. Each test here gives aiohttp's own timers
an hour, so only the service's deadline can be what closed the connection; every wait is
on the answer or the end of the stream, bounded generously, never a timing assertion."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    TOKEN_SECRET,
    Service,
    ServiceFactory,
    changed_keys,
    dump_redis,
    read_response,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.tokens import mint

#: aiohttp's own timers (keep-alive, lingering close) in these tests: far past any bound below.
AN_HOUR = 3600.0
#: A bound on waiting for what the service must do within its (sub-second) deadlines.
BOUND_S = 60.0


def patient(start_service: ServiceFactory, **settings: Any) -> Awaitable[Service]:
    """A service whose aiohttp keep-alive and lingering timers are an hour, unless the
    service itself sets them."""
    return start_service(runner_options={"keepalive_timeout": AN_HOUR, "lingering_time": AN_HOUR}, **settings)


def order_request(token: str, body: bytes, *, length: int | None = None) -> bytes:
    head = (
        "POST /api/orders HTTP/1.1\r\nHost: flashsale\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body) if length is None else length}\r\n"
        + "\r\n"
    )
    return head.encode() + body


async def closed_by_service(reader: asyncio.StreamReader) -> bytes:
    """What is left to read until the service closes the connection (bounded)."""
    return await asyncio.wait_for(reader.read(), BOUND_S)


async def test_a_head_trickled_byte_by_byte_gets_408_json_and_the_connection_closes(
    start_service: ServiceFactory, redis_client: Redis
) -> None:
    service = await patient(start_service, read_timeout_s=0.3)
    sku = "phone"
    await service.create_sale({sku: 5})
    before = await dump_redis(redis_client)
    body = json.dumps({"request_id": "r-slowloris", "sku": sku}).encode()
    request = order_request(mint(TOKEN_SECRET, "slowloris"), body)
    reader, writer = await service.open_raw()
    answer = asyncio.ensure_future(read_response(reader))
    try:
        sent = 0
        # One byte at a time, each after a short pause: the head is never complete before
        # the deadline from its first byte passes (it would take ~150 pauses).
        while not answer.done() and sent < len(request) - len(body):
            writer.write(request[sent : sent + 1])
            await writer.drain()
            sent += 1
            await asyncio.wait([answer], timeout=0.05)
        assert answer.done(), "the whole head went out: the service never cut the slow head off"
        status, headers, payload = answer.result()
        assert (status, headers["content-type"].split(";")[0]) == (408, "application/json")
        refusal = json.loads(payload)
        assert refusal["error"] == "request_timeout" and "head" in refusal["message"], refusal
        assert headers.get("connection", "").lower() == "close"
        assert await closed_by_service(reader) == b""
    finally:
        answer.cancel()
        writer.close()
    assert changed_keys(before, await dump_redis(redis_client)) == []
    assert service.state.buyers.in_progress("slowloris") == 0


async def test_half_a_head_then_silence_gets_408_and_is_closed(start_service: ServiceFactory) -> None:
    service = await patient(start_service, read_timeout_s=0.3)
    await refused_as_too_slow(service, b"POST /api/orders HTTP/1.1\r\nHost: flashsale\r\nAuthoriz")


async def refused_as_too_slow(service: Service, data: bytes) -> None:
    """Send ``data`` and nothing more: the answer is 408 JSON and then the end of the stream."""
    reader, writer = await service.open_raw()
    try:
        writer.write(data)
        await writer.drain()
        status, _, payload = await asyncio.wait_for(read_response(reader), BOUND_S)
        assert (status, json.loads(payload)["error"]) == (408, "request_timeout")
        assert await closed_by_service(reader) == b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    "first", [b"", b"GET /healthz HTTP/1.1\r\nHost: flashsale\r\n\r\n"], ids=["new", "kept alive"]
)
async def test_a_connection_that_sends_no_request_is_closed_after_the_idle_time(
    start_service: ServiceFactory, first: bytes
) -> None:
    service = await patient(start_service, idle_timeout_s=0.3)
    reader, writer = await service.open_raw()
    try:
        if first:
            writer.write(first)
            await writer.drain()
            assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 200
        assert await closed_by_service(reader) == b"", "an idle connection is closed without an answer"
    finally:
        writer.close()


async def test_after_a_408_for_a_body_the_connection_is_closed_at_once(
    start_service: ServiceFactory,
) -> None:
    """The client that ran out its read deadline is not given aiohttp's lingering time (an
    hour here, 10 s by default) to send the rest: RFC 9110 closes after a 408."""
    service = await patient(start_service, read_timeout_s=0.3)
    sku = "phone"
    await service.create_sale({sku: 5})
    body = json.dumps({"request_id": "r-sloth", "sku": sku}).encode()
    await refused_as_too_slow(
        service, order_request(mint(TOKEN_SECRET, "sloth"), body[:10], length=len(body))
    )
    assert service.state.buyers.in_progress("sloth") == 0


async def test_heads_in_pieces_and_pipelined_requests_are_served(start_service: ServiceFactory) -> None:
    """The head deadline does not touch a well-behaved client: a head split over several
    packets, and requests pipelined on one kept-alive connection, are answered."""
    service = await patient(start_service, read_timeout_s=30.0)
    sku = "phone"
    sale = (await service.create_sale({sku: 5}))["sale"]
    token = mint(TOKEN_SECRET, "tidy")
    first = order_request(token, json.dumps({"request_id": "r-1", "sku": sku}).encode())
    second = order_request(token, json.dumps({"request_id": "r-2", "sku": sku}).encode())
    reader, writer = await service.open_raw()
    try:
        for piece in (first[:20], first[20:60], first[60:]):
            writer.write(piece)
            await writer.drain()
        assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 201
        # A refusal other than a 408 keeps the connection too: only a 408 closes it.
        refused = order_request(token, b'{"sku": "phone"}')
        writer.write(second + refused + b"GET /healthz HTTP/1.1\r\nHost: flashsale\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 201
        assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 422
        assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 200
    finally:
        writer.close()
    assert (await service.sku_counters(sale, sku))["held"] == 2


def test_the_idle_time_is_a_documented_setting() -> None:
    from flashsale.settings import ENV_DOC, Settings

    assert ("FLASHSALE_IDLE_TIMEOUT", "idle_timeout_s") in [(var, name) for var, name, _ in ENV_DOC]
    assert Settings.from_env({"FLASHSALE_IDLE_TIMEOUT": "12.5"}).idle_timeout_s == 12.5
    # Longer than a load balancer's usual 60 s idle time: a balancer must never send a
    # request on a connection the service has just closed.
    assert Settings().idle_timeout_s > 60


async def test_a_client_that_never_reads_its_answers_is_cut_off_after_the_idle_time(
    start_service: ServiceFactory,
) -> None:
    """The slow-read attack: requests pipelined and answers never read. Once the answers
    fill the socket, the service waits for the client to take them - for at most
    ``FLASHSALE_IDLE_TIMEOUT``, then the connection is dropped (a close would wait to send
    what the client does not take). Before, the connection was held for ever."""
    service = await patient(start_service, idle_timeout_s=0.3)
    server = service.client.server.runner.server if service.client.server.runner else None
    assert server is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (service.client.host, service.client.port))
    _, writer = await asyncio.open_connection(sock=sock, limit=16)  # reads (almost) nothing
    requests = b"GET /openapi.json HTTP/1.1\r\nHost: flashsale\r\n\r\n" * 10
    try:
        for _ in range(2000):
            if any(protocol.writing_paused for protocol in server.connections):
                break  # the service's answers are stuck: the client does not take them
            writer.write(requests)
            await asyncio.wait([asyncio.ensure_future(writer.drain())], timeout=0.05)
        assert any(protocol.writing_paused for protocol in server.connections), "answers never backed up"
        await until(lambda: not server.connections, "the service dropped the connection")
    finally:
        writer.transport.abort()


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + BOUND_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


async def test_at_its_connection_cap_the_service_reclaims_a_waiting_connection_first(
    start_service: ServiceFactory,
) -> None:
    """File descriptors are the bound under every connection: past them the process can
    open no connection to Redis either. At ``FLASHSALE_MAX_CONNECTIONS`` a new connection
    takes the place of the oldest one waiting for a request (idle, or a head still coming);
    with none waiting, the new one is closed at once - the requests in progress go on."""
    service = await patient(start_service, max_connections=3, read_timeout_s=BOUND_S)
    waiting = [await service.open_raw() for _ in range(3)]
    try:
        waiting[1][1].write(b"GET /healthz HTTP/1.1\r\nHost: flashsale\r\nX-Hal")  # a head still coming
        await waiting[1][1].drain()
        reader, writer = await service.open_raw()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: flashsale\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 200
        writer.close()
        assert await closed_by_service(waiting[0][0]) == b"", "the oldest waiting connection made room"
    finally:
        for _, w in waiting:
            w.close()


async def test_at_its_connection_cap_with_every_connection_busy_a_new_one_is_closed(
    start_service: ServiceFactory,
) -> None:
    service = await patient(start_service, max_connections=2, read_timeout_s=BOUND_S)
    server = service.client.server.runner.server if service.client.server.runner else None
    assert server is not None
    body = b'{"request_id": "r-1", "sku": "phone"}'
    busy = []
    for user in ("slow1", "slow2"):  # two orders whose bodies are still coming
        reader, writer = await service.open_raw()
        writer.write(order_request(mint(TOKEN_SECRET, user), body[:5], length=len(body)))
        await writer.drain()
        busy.append((reader, writer))
    try:
        await until(lambda: service.state.buyers.in_progress("slow2") == 1, "both orders in progress")
        reader, writer = await service.open_raw()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: flashsale\r\n\r\n")
        try:
            rest = await closed_by_service(reader)
        except ConnectionResetError:  # closed with the request unread: the kernel says reset
            rest = b""
        assert rest == b"", "no room: the new connection is closed without an answer"
        writer.close()
        for reader, writer in busy:  # the orders in progress go on
            writer.write(body[5:])
            await writer.drain()
            assert (await asyncio.wait_for(read_response(reader), BOUND_S))[0] == 422  # no such SKU
    finally:
        for _, w in busy:
            w.close()
    counted = lambda: getattr(server, "open_connections", None) == len(server.connections)  # noqa: E731
    await until(counted, "the service's count of its connections is right once they closed")


def test_the_connection_cap_is_below_the_open_file_limit_by_default() -> None:
    import resource

    from flashsale.service.transport import connection_cap
    from flashsale.settings import Settings

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = connection_cap(Settings())
    assert 0 < cap < soft and soft - cap >= min(1024, soft // 4)
    assert connection_cap(Settings(max_connections=10)) == 10
