"""Transport-level input — request lines, headers, framing, Content-Encoding, slow and cut
bodies — gets the documented JSON error with a 4xx and a stable code, never a 5xx or
aiohttp's plain text, and changes nothing. First the cases once seen failing (a table),
then a seeded raw-socket fuzzer against a real service process: schemathesis only covers
what the OpenAPI document describes; this writes bytes no HTTP client library would.

``FLASHSALE_FUZZ_SEED`` and ``FLASHSALE_FUZZ_CASES`` replay or widen a run; a failure
prints the seed and each offending request."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from redis.asyncio import Redis
from service_support import (
    ADMIN_TOKEN,
    TOKEN_SECRET,
    Service,
    ServiceFactory,
    changed_keys,
    dump_redis,
    expect_json,
    new_id,
    read_response,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.tokens import mint

SEED = int(os.environ.get("FLASHSALE_FUZZ_SEED", "1111"))
CASES = int(os.environ.get("FLASHSALE_FUZZ_CASES", "400"))
#: A bound on waiting for one answer (the service answers within its read deadline).
ANSWER_BOUND_S = 60.0


@dataclass
class Shop:
    """A service with state a bad request could damage, and requests that change nothing
    even when they are accepted: an order for a sold-out SKU, someone else's order, the
    switches set to what they are."""

    service: Service
    sold_out: str
    others_order: str
    buyer_token: str = field(default_factory=lambda: mint(TOKEN_SECRET, "fuzzer"))


@pytest.fixture
async def shop(start_service: ServiceFactory) -> Shop:
    service = await start_service(read_timeout_s=0.5)
    sku = new_id("sku")
    await service.create_sale({sku: 1})
    held = await expect_json(await service.order("alice", sku), 201)
    await expect_json(await service.order("bob", sku), 409, "sold_out")
    switches = {"browse": True, "order_lookup": True}
    await expect_json(
        await service.client.post(
            "/api/admin/switches", json=switches, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ),
        200,
    )
    return Shop(service, sku, held["order_id"])


# ------------------------------------------------------------------- a raw request


@dataclass
class Draft:
    """One request as bytes will carry it; mutations change it before it is written."""

    method: bytes
    target: bytes
    headers: list[bytes]  # whole header lines ("Name: value")
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    framing: str = "length"  # length | chunked | raw (a mutation wrote its own framing)
    chunk_sizes: list[int] = field(default_factory=list)
    chunk_flaw: str = ""
    eol: bytes = b"\r\n"
    extra: bytes = b""  # bytes after the request: a pipelined one, or junk
    cut: float | None = None  # send only this share of the bytes, then close the write side
    pieces: int = 1  # written in this many parts (a slow client)
    notes: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        headers = list(self.headers)
        body = self.body
        if self.framing == "length":
            headers.append(b"Content-Length: %d" % len(body))
        elif self.framing == "chunked":
            headers.append(b"Transfer-Encoding: chunked")
            body = _chunked(body, self.chunk_sizes, self.chunk_flaw)
        head = self.eol.join([self.method + b" " + self.target + b" " + self.version, *headers])
        data = head + self.eol + self.eol + body + self.extra
        if self.cut is not None:
            data = data[: max(1, int(len(data) * self.cut))]
        return data


def _chunked(body: bytes, sizes: list[int], flaw: str) -> bytes:
    out, at = [], 0
    for size in sizes or [len(body)]:
        part = body[at : at + size]
        at += size
        if part:
            ext = b";ext=1" if flaw == "extension" else b""
            size_text = b"zz" if flaw == "size" else b"%x" % len(part)
            out.append(size_text + ext + b"\r\n" + part + (b"" if flaw == "crlf" else b"\r\n"))
    if at < len(body):
        out.append(b"%x\r\n" % (len(body) - at) + body[at:] + b"\r\n")
    if flaw != "no_end":
        out.append(b"0\r\n\r\n")
    if flaw == "extra":
        out.append(b"garbage after the last chunk")
    return b"".join(out)


def bases(shop: Shop) -> list[Draft]:
    """Requests that change nothing even when they are accepted."""
    buyer = b"Authorization: Bearer " + shop.buyer_token.encode()
    admin = b"Authorization: Bearer " + ADMIN_TOKEN.encode()
    common = [b"Host: flashsale", b"Connection: close"]
    json_type = b"Content-Type: application/json"
    order = json.dumps({"request_id": "r-fuzz", "sku": shop.sold_out}).encode()
    return [
        Draft(b"POST", b"/api/orders", [*common, buyer, json_type], order),
        Draft(b"POST", f"/api/orders/{shop.others_order}/pay".encode(), [*common, buyer]),
        Draft(b"POST", f"/api/orders/{shop.others_order}/cancel".encode(), [*common, buyer], b"{}"),
        Draft(b"GET", f"/api/orders/{shop.others_order}".encode(), [*common, buyer], framing="raw"),
        Draft(b"GET", f"/api/skus/{shop.sold_out}".encode(), common, framing="raw"),
        Draft(
            b"POST",
            b"/api/admin/switches",
            [*common, admin, json_type],
            b'{"browse": true, "order_lookup": true}',
        ),
        Draft(
            b"POST", b"/api/admin/audit", [*common, admin], b'{"acknowledged": ["a\\u0000b"], "wait_s": 0}'
        ),
        Draft(b"GET", b"/api/admin/stats", [*common, admin], framing="raw"),
        Draft(b"GET", b"/warroom", [*common, b"Authorization: Bearer \xff\xfe"], framing="raw"),
        Draft(b"GET", b"/healthz", common, framing="raw"),
    ]


# ------------------------------------------------------------------- mutations

Rng = random.Random


def enc_declared_not_applied(rng: Rng, d: Draft) -> None:
    value = rng.choice([b"gzip", b"deflate", b"br", b"zstd", b"identity", b"x-custom", b"gzip, deflate"])
    d.headers.append(b"Content-Encoding: " + value)


def enc_applied(rng: Rng, d: Draft) -> None:
    kind = rng.choice([b"gzip", b"deflate"])
    d.body = gzip.compress(d.body) if kind == b"gzip" else zlib.compress(d.body)
    d.headers.append(b"Content-Encoding: " + kind)
    if rng.random() < 0.5 and d.body:  # corrupt it
        at = rng.randrange(len(d.body))
        d.body = d.body[:at] + bytes([d.body[at] ^ 0xFF]) + d.body[at + 1 :]


def length_wrong(rng: Rng, d: Draft) -> None:
    d.framing = "raw"
    n = max(0, len(d.body) + rng.choice([-7, -1, 1, 9, 10**6]))
    d.headers.append(b"Content-Length: %d" % n)


def length_garbage(rng: Rng, d: Draft) -> None:
    d.framing = "raw"
    value = rng.choice([b"abc", b"-1", b"0x10", b" 5 5", b"1e3", b"9" * 30, b"", b"+3"])
    d.headers.append(b"Content-Length: " + value)
    if rng.random() < 0.3:
        d.headers.append(b"Content-Length: %d" % len(d.body))


def chunks(rng: Rng, d: Draft) -> None:
    d.framing = "chunked"
    d.chunk_sizes = [rng.randint(1, 8) for _ in range(rng.randint(1, 6))]
    d.chunk_flaw = rng.choice(["", "", "extension", "size", "crlf", "no_end", "extra"])


def transfer_odd(rng: Rng, d: Draft) -> None:
    d.framing = "raw"
    d.headers.append(
        b"Transfer-Encoding: " + rng.choice([b"gzip, chunked", b"chunked, chunked", b"identity", b"x"])
    )
    if rng.random() < 0.5:
        d.headers.append(b"Content-Length: %d" % len(d.body))
    d.body = _chunked(d.body, [], "") if rng.random() < 0.5 else d.body


def header_bytes(rng: Rng, d: Draft) -> None:
    at = rng.randrange(len(d.headers))
    junk = bytes(
        rng.choice([0x00, 0x01, 0x7F, 0x80, 0xC3, 0xFE, 0xFF, 0x0D]) for _ in range(rng.randint(1, 4))
    )
    line = d.headers[at]
    cut = rng.randrange(len(line) + 1)
    d.headers[at] = line[:cut] + junk + line[cut:]


def header_long(rng: Rng, d: Draft) -> None:
    d.headers.append(b"X-Long: " + b"a" * rng.choice([100, 8200, 70_000]))


def header_many(rng: Rng, d: Draft) -> None:
    d.headers += [b"X-H%d: v" % i for i in range(rng.choice([50, 150, 400]))]


def header_broken(rng: Rng, d: Draft) -> None:
    line = rng.choice(
        [b"NoColon", b" Leading: space", b"Bad Name: v", b"X-A : v", b"\tfolded", b": empty-name"]
    )
    d.headers.insert(rng.randrange(len(d.headers) + 1), line)


def authorization(rng: Rng, d: Draft) -> None:
    d.headers = [h for h in d.headers if not h.lower().startswith(b"authorization:")]
    value = rng.choice(
        [
            b"",
            b"Bearer",
            b"Bearer \xff\xfe",
            b"Basic Zm9v",
            b"Bearer " + b"a" * 5000,
            b"Bearer a.b.c.d",
            b"bearer \x00",
        ]
    )
    d.headers.append(b"Authorization: " + value)


def request_line(rng: Rng, d: Draft) -> None:
    part = rng.choice(["method", "version", "target"])
    if part == "method":
        d.method = rng.choice(
            [b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"get", b"P\xffST", b"X" * 100]
        )
    elif part == "version":
        d.version = rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/0.9", b"http/1.1", b""])
    else:
        d.target = rng.choice(
            [
                d.target + b"\xff",
                d.target + b"%00",
                d.target + b"?token=%ff%fe&x",
                b"http://elsewhere" + d.target,
                b"/" + b"a" * rng.choice([300, 9000]),
                b"/../../etc/passwd",
                b"*",
                d.target.replace(b"/", b"//"),
            ]
        )


def body_bytes(rng: Rng, d: Draft) -> None:
    d.body = rng.choice(
        [
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
            b"[" * 3000 + b"]" * 3000,
            b'{"request_id": "r\\u0000", "sku": "\xff"}',
            b"x" * 20_000,
            b"",
        ]
    )


def cut(rng: Rng, d: Draft) -> None:
    d.cut = rng.uniform(0.05, 0.99)


def slow(rng: Rng, d: Draft) -> None:
    d.pieces = rng.randint(2, 12)


def bare_lf(rng: Rng, d: Draft) -> None:
    d.eol = b"\n"


def expect_continue(rng: Rng, d: Draft) -> None:
    d.headers.append(b"Expect: " + rng.choice([b"100-continue", b"200-ok", b"\xff"]))


MUTATIONS: list[Callable[[Rng, Draft], None]] = [
    enc_declared_not_applied,
    enc_applied,
    length_wrong,
    length_garbage,
    chunks,
    transfer_odd,
    header_bytes,
    header_long,
    header_many,
    header_broken,
    authorization,
    request_line,
    body_bytes,
    cut,
    slow,
    bare_lf,
    expect_continue,
]


def fuzzed(rng: Rng, shop: Shop) -> Draft:
    templates = bases(shop)
    draft = replace(rng.choice(templates))
    draft.headers = list(draft.headers)
    for mutate in rng.sample(MUTATIONS, rng.randint(1, 3)):
        mutate(rng, draft)
        draft.notes.append(mutate.__name__)
    if rng.random() < 0.1:
        draft.extra = rng.choice(templates).to_bytes()
        draft.notes.append("pipelined")
    return draft


# ------------------------------------------------------------------- the exchange


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


RESET = Answer(0, "", b"")  # the connection was reset before an answer could be read


async def exchange(service: Service, data: bytes, *, pieces: int = 1, hang_up: bool = False) -> Answer | None:
    """Write ``data`` (in ``pieces``) while reading the final answer; None when the service
    closed the connection without one."""
    reader, writer = await service.open_raw()

    async def final_answer() -> Answer | None:
        while True:
            try:
                status, headers, body = await read_response(reader)
            except asyncio.IncompleteReadError:
                return None
            except ConnectionResetError:
                # The service refused early and closed while bytes were still coming: the
                # reset can overtake its answer. Its side is checked in its log.
                return RESET
            if status != 100:  # "100 Continue" comes before the answer
                return Answer(status, headers.get("content-type", "").split(";")[0], body)

    # Read while writing: a service that refuses early closes the connection, and bytes
    # still being sent then reset it, which can drop an answer not yet read.
    answer = asyncio.ensure_future(final_answer())
    try:
        step = max(1, -(-len(data) // pieces))
        try:
            for at in range(0, len(data), step):
                writer.write(data[at : at + step])
                await writer.drain()
                await asyncio.sleep(0)  # let the service see each part on its own
            if hang_up:
                writer.write_eof()
        except OSError:  # ConnectionResetError, or ENOTCONN on write_eof
            pass  # the service answered and closed before taking it all
        return await asyncio.wait_for(answer, ANSWER_BOUND_S)
    finally:
        answer.cancel()
        writer.close()


def problems(draft_bytes: bytes, target: bytes, answer: Answer | None, may_hang_up: bool) -> list[str]:
    """What is wrong with the answer to one request (nothing: [])."""
    if answer is None:
        return [] if may_hang_up else ["no answer"]
    if answer is RESET:
        return []
    if answer.status >= 500:
        return [f"{answer.status}: {answer.body[:200]!r}"]
    if answer.status < 400:
        return []
    if b"/warroom" in target and answer.status == 401 and answer.content_type == "text/html":
        return []  # the page's token form, for a browser (documented)
    try:
        body = json.loads(answer.body)
    except ValueError:
        return [f"{answer.status} is not JSON: {answer.content_type} {answer.body[:200]!r}"]
    ok = (
        answer.content_type == "application/json"
        and isinstance(body.get("error"), str)
        and isinstance(body.get("message"), str)
        and body["message"]
    )
    return [] if ok else [f"{answer.status} is not the JSON error: {answer.body[:200]!r}"]


# ------------------------------------------------------------------- the cases once seen


def _raw(method: str, path: str, headers: list[bytes], body: bytes = b"", *, length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: flashsale", b"Connection: close", *headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _known_cases() -> list[tuple[str, Callable[[Shop], bytes], int, str]]:
    buyer = lambda s: b"Authorization: Bearer " + s.buyer_token.encode()  # noqa: E731
    admin = b"Authorization: Bearer " + ADMIN_TOKEN.encode()
    order = lambda s: json.dumps({"request_id": "r-known", "sku": s.sold_out}).encode()  # noqa: E731
    switches = b'{"browse": true}'
    return [
        *[
            (
                f"order, {enc} declared on plain JSON",
                lambda s, e=enc: _raw("POST", "/api/orders", [buyer(s), b"Content-Encoding: " + e], order(s)),
                400,
                "bad_content_encoding",
            )
            for enc in (b"gzip", b"deflate", b"br", b"zstd")
        ],
        *[
            (
                f"admin call, {enc} declared on plain JSON",
                lambda s, e=enc: _raw(
                    "POST", "/api/admin/switches", [admin, b"Content-Encoding: " + e], switches
                ),
                400,
                "bad_content_encoding",
            )
            for enc in (b"gzip", b"deflate")
        ],
        (
            "Content-Length not a number",
            lambda s: _raw("POST", "/api/orders", [buyer(s), b"Content-Length: abc"], length=False),
            400,
            "malformed_http",
        ),
        (
            "two Content-Lengths",
            lambda s: _raw(
                "POST",
                "/api/orders",
                [buyer(s), b"Content-Length: 3", b"Content-Length: 4"],
                b"abcd",
                length=False,
            ),
            400,
            "malformed_http",
        ),
        (
            "header too long",
            lambda s: _raw("GET", "/healthz", [b"X-Long: " + b"a" * 20_000]),
            400,
            "malformed_http",
        ),
        ("URL too long", lambda s: _raw("GET", "/" + "a" * 20_000, []), 400, "malformed_http"),
        *[
            (
                f"chunks: {label}",
                lambda s, c=chunks: _raw(
                    "POST", "/api/orders", [buyer(s), b"Transfer-Encoding: chunked"], c, length=False
                ),
                400,
                "malformed_http",
            )
            for label, chunks in [
                ("size not hex", b"zz\r\nabc\r\n0\r\n\r\n"),
                ("longer than its size", b"2\r\nabc\r\n0\r\n\r\n"),
            ]
        ],
        (
            "TLS on the HTTP port",
            lambda s: b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            400,
            "malformed_http",
        ),
        ("HTTP/9.9", lambda s: b"GET /healthz HTTP/9.9\r\n\r\n", 400, "malformed_http"),
        (
            "path not UTF-8",
            lambda s: b"GET /api/skus/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "malformed_http",
        ),
        (
            "body over the limit",
            lambda s: _raw("POST", "/api/orders", [buyer(s)], b"x" * 40_000),
            413,
            "body_too_large",
        ),
        (
            "admin token not UTF-8",
            lambda s: _raw("GET", "/api/admin/stats", [b"Authorization: Bearer \xff\xfe"]),
            401,
            "unauthorized",
        ),
        (
            "NUL in an audited order id",
            lambda s: _raw("POST", "/api/admin/audit", [admin], b'{"acknowledged": ["a\\u0000b"]}'),
            422,
            "invalid_request",
        ),
    ]


KNOWN = _known_cases()


@pytest.mark.parametrize(("case", "request_of", "status", "code"), KNOWN, ids=[c[0] for c in KNOWN])
async def test_transport_refusals_are_the_json_error_and_change_nothing(
    shop: Shop, redis_client: Redis, case: str, request_of: Callable[[Shop], bytes], status: int, code: str
) -> None:
    before = await dump_redis(redis_client)
    answer = await exchange(shop.service, request_of(shop))
    assert answer is not None, f"{case}: no answer"
    assert (answer.status, answer.content_type) == (status, "application/json"), f"{case}: {answer}"
    body = json.loads(answer.body)
    assert body["error"] == code and body["message"], f"{case}: {body}"
    assert changed_keys(before, await dump_redis(redis_client)) == [], f"{case}: Redis changed"


async def test_war_room_page_with_a_token_that_is_not_utf8_shows_the_token_form(shop: Shop) -> None:
    """The page (for browsers) answers its documented 401 token form, not a 500."""
    for headers in ([b"Authorization: Bearer \xff\xfe"], [b"Authorization: \xc3"]):
        answer = await exchange(shop.service, _raw("GET", "/warroom", headers, length=False))
        assert answer is not None and (answer.status, answer.content_type) == (401, "text/html"), answer


async def test_a_body_cut_short_is_answered_or_dropped_never_a_server_error(
    shop: Shop, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends half an order and hangs up: the handler (which carries on, as in
    production) meets the end of the stream while reading and answers a 4xx nobody reads."""
    before = await dump_redis(redis_client)
    order = json.dumps({"request_id": "r-cut", "sku": shop.sold_out}).encode()
    request = _raw("POST", "/api/orders", [b"Authorization: Bearer " + shop.buyer_token.encode()], order)
    requests_before = shop.service.requests_seen
    with caplog.at_level(logging.WARNING):
        assert await exchange(shop.service, request[:-10], hang_up=True) is None
        await _settled(shop.service, requests_before + 1)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def _settled(service: Service, requests: int) -> None:
    """Wait until the service has started ``requests`` requests and has none in progress."""
    deadline = asyncio.get_running_loop().time() + ANSWER_BOUND_S
    while service.requests_seen < requests or service.state.buyers.in_progress("fuzzer"):
        assert asyncio.get_running_loop().time() < deadline, "the service never finished the request"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------- the fuzzer


@pytest.mark.timeout(900)
async def test_fuzzed_transport_never_gets_a_5xx_and_changes_nothing(
    shop: Shop, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    drafts = [fuzzed(rng, shop) for _ in range(CASES)]
    before = await dump_redis(redis_client)
    turns = asyncio.Semaphore(8)  # one buyer's requests: within its cap of 8 in progress

    async def run(draft: Draft) -> tuple[Draft, Answer | None]:
        async with turns:
            data = draft.to_bytes()
            return draft, await exchange(
                shop.service, data, pieces=draft.pieces, hang_up=draft.cut is not None
            )

    with caplog.at_level(logging.WARNING):
        results = await asyncio.gather(*(run(d) for d in drafts))
        await _settled(shop.service, 0)
    found = []
    for draft, answer in results:
        for problem in problems(draft.to_bytes(), draft.target, answer, may_hang_up=draft.cut is not None):
            found.append(f"{problem}\n    after {draft.notes}: {draft.to_bytes()[:300]!r}")
    errors = [f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not found and not errors, f"seed {SEED}: " + "\n".join(found[:20] + errors[:20])
    assert changed_keys(before, await dump_redis(redis_client)) == [], f"seed {SEED}: Redis changed"
    # The run reached what it is for (a seed that did not would prove little).
    codes = Counter(
        json.loads(a.body).get("error")
        for _, a in results
        if a and a.status >= 400 and a.content_type == "application/json"
    )
    assert {"malformed_http", "bad_content_encoding", "request_timeout", "unauthorized"} <= set(codes), codes
