"""The edges of an order's bytes that the bad-input table (test_service_bad_input) and the
transport fuzzer do not name: what the service accepts on purpose, pinned so it stays a
decision (a BOM, UTF-16, duplicate keys, any Content-Type, compressed and chunked bodies),
and what it refuses with a 4xx that changes nothing (two Authorization headers, a body
compressed twice, a compression bomb, a Content-Length shorter than the body).

Every request is written byte for byte on a raw socket, as an attacker would."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Callable

import pytest
from redis.asyncio import Redis
from service_support import (
    Service,
    ServiceFactory,
    changed_keys,
    dump_redis,
    new_id,
    read_response,
    start_service,  # noqa: F401  (fixture)
)
from service_support import (
    buyer as buyer_headers,
)

BOUND_S = 60.0


def token_of(user: str) -> str:
    return buyer_headers(user)["Authorization"].removeprefix("Bearer ")


@pytest.fixture
async def shop(start_service: ServiceFactory) -> tuple[Service, str]:
    service = await start_service()
    sku = new_id("sku")
    await service.create_sale({sku: 50})
    return service, sku


def order_head(token: str, length: int, *headers: bytes) -> bytes:
    lines = [
        b"POST /api/orders HTTP/1.1",
        b"Host: flashsale",
        b"Authorization: Bearer " + token.encode(),
        *headers,
        b"Content-Length: %d" % length,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(service: Service, data: bytes, answers: int = 1) -> list[tuple[int, dict[str, object]]]:
    """Write ``data`` on one connection; the next ``answers`` answers (status, JSON body)."""
    reader, writer = await service.open_raw()
    try:
        writer.write(data)
        await writer.drain()
        out = []
        for _ in range(answers):
            status, headers, payload = await asyncio.wait_for(read_response(reader), BOUND_S)
            assert headers["content-type"].startswith("application/json"), (status, payload)
            out.append((status, json.loads(payload)))
        return out
    finally:
        writer.close()


def order_body(sku: str, request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "sku": sku}).encode()


# (case, body from (sku, request_id), extra headers): each one is a good order.
ACCEPTED: list[tuple[str, Callable[[str, str], bytes], list[bytes]]] = [
    ("UTF-8 BOM", lambda sku, rid: b"\xef\xbb\xbf" + order_body(sku, rid), []),
    ("UTF-16 with its BOM", lambda sku, rid: order_body(sku, rid).decode().encode("utf-16"), []),
    ("no Content-Type", order_body, []),
    ("Content-Type text/plain", order_body, [b"Content-Type: text/plain"]),
    ("Content-Type a form", order_body, [b"Content-Type: application/x-www-form-urlencoded"]),
    ("Content-Type multipart", order_body, [b"Content-Type: multipart/form-data; boundary=x"]),
    ("Content-Type not UTF-8", order_body, [b"Content-Type: \xff\xfe"]),
    ("gzip", lambda sku, rid: gzip.compress(order_body(sku, rid)), [b"Content-Encoding: gzip"]),
    ("GZIP in capitals", lambda sku, rid: gzip.compress(order_body(sku, rid)), [b"Content-Encoding: GZIP"]),
    ("deflate", lambda sku, rid: zlib.compress(order_body(sku, rid)), [b"Content-Encoding: deflate"]),
    ("identity", order_body, [b"Content-Encoding: identity"]),
]


@pytest.mark.parametrize(("case", "body_of", "headers"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
async def test_edges_the_service_accepts_on_purpose(
    shop: tuple[Service, str], case: str, body_of: Callable[[str, str], bytes], headers: list[bytes]
) -> None:
    """The body is JSON whatever the Content-Type says (the bearer token, which no
    cross-site form can send, is what keeps a browser from ordering for someone); the
    stdlib's reading of a BOM or UTF-16 is kept; gzip and deflate are decoded."""
    service, sku = shop
    body = body_of(sku, new_id("r"))
    [(status, answer)] = await exchange(service, order_head(token_of("alice"), len(body), *headers) + body)
    assert status == 201, (case, answer)


async def test_a_chunked_order_is_an_order(shop: tuple[Service, str]) -> None:
    service, sku = shop
    body = order_body(sku, "r-chunked")
    head = order_head(token_of("alice"), 0, b"Transfer-Encoding: chunked")
    head = head.replace(b"Content-Length: 0\r\n", b"")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:7], body[7:])) + b"0\r\n\r\n"
    [(status, answer)] = await exchange(service, head + chunks)
    assert status == 201, answer


async def test_duplicate_keys_the_last_one_counts_and_the_answer_says_which(
    shop: tuple[Service, str], redis_client: Redis
) -> None:
    """JSON parsers keep the last of duplicate names (RFC 8259 leaves it open); the fence
    guard and the handler read one parse of the body, so they cannot disagree, and the
    answer echoes the request id and the quantity that were used."""
    service, sku = shop
    body = f'{{"request_id": 7, "sku": "nope", "qty": 5, "request_id": "r-dup", "sku": "{sku}", "qty": 1}}'
    [(status, answer)] = await exchange(service, order_head(token_of("alice"), len(body)) + body.encode())
    assert status == 201, answer
    assert (answer["request_id"], answer["lines"]) == ("r-dup", [{"sku": sku, "qty": 1}])


def order(token: str, body: bytes, *headers: bytes, length: int | None = None) -> bytes:
    return order_head(token, len(body) if length is None else length, *headers) + body


def gzipped_twice(sku: str, request_id: str) -> bytes:
    """An order body compressed twice: one ``gzip`` coding leaves it unreadable."""
    return gzip.compress(gzip.compress(order_body(sku, request_id)))


# (case, data from (token, sku), expected answers (status, code) on the connection)
REFUSED: list[tuple[str, Callable[[str, str], bytes], list[tuple[int, str]]]] = [
    (
        # RFC 9110: one Authorization field. A proxy that reads the last one and a service
        # that reads the first would disagree on who the buyer is.
        "two Authorization headers",
        lambda token, sku: order(
            token, order_body(sku, "r-two"), b"Authorization: Bearer " + token_of("bob").encode()
        ),
        [(401, "unauthorized")],
    ),
    (
        "a good Bearer, then Basic",
        lambda token, sku: order(token, order_body(sku, "r-basic"), b"Authorization: Basic YWxpY2U6eA=="),
        [(401, "unauthorized")],
    ),
    (
        "gzip twice, declared once",
        lambda token, sku: order(token, gzipped_twice(sku, "r-gzip2"), b"Content-Encoding: gzip"),
        [(422, "malformed_json")],
    ),
    (
        # Two codings in one field: one is decoded at most, so the body cannot be read as
        # declared - said as such, not as the "not JSON" it would otherwise look like.
        "gzip twice, declared as two codings",
        lambda token, sku: order(token, gzipped_twice(sku, "r-gzip3"), b"Content-Encoding: gzip, gzip"),
        [(400, "bad_content_encoding")],
    ),
    (
        "gzip twice, declared in two fields",
        lambda token, sku: order(
            token,
            gzipped_twice(sku, "r-gzip4"),
            b"Content-Encoding: gzip",
            b"Content-Encoding: gzip",
        ),
        [(400, "bad_content_encoding")],
    ),
    (
        "plain JSON declared as gzip, then deflate",
        lambda token, sku: order(token, order_body(sku, "r-stack"), b"Content-Encoding: gzip, deflate"),
        [(400, "bad_content_encoding")],
    ),
    (
        "gzip bomb: 10 kB that decode to 10 MB",
        lambda token, sku: order(
            token, gzip.compress(b" " * 10_000_000 + order_body(sku, "r-bomb")), b"Content-Encoding: gzip"
        ),
        [(413, "body_too_large")],
    ),
    (
        # The length cuts the JSON short; the rest, in the same packet, is no request: the
        # parser refuses the packet whole, the order included.
        "Content-Length shorter than the body",
        lambda token, sku: order(
            token, order_body(sku, "r-short"), length=len(order_body(sku, "r-short")) - 5
        ),
        [(400, "malformed_http")],
    ),
]


@pytest.mark.parametrize(("case", "data_of", "expected"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_edges_refused_with_a_4xx_that_changes_nothing(
    shop: tuple[Service, str],
    redis_client: Redis,
    case: str,
    data_of: Callable[[str, str], bytes],
    expected: list[tuple[int, str]],
) -> None:
    service, sku = shop
    before = await dump_redis(redis_client)
    answers = await exchange(service, data_of(token_of("alice"), sku), answers=len(expected))
    assert [(status, body["error"]) for status, body in answers] == expected, answers
    assert all(isinstance(body["message"], str) and body["message"] for _, body in answers)
    assert changed_keys(before, await dump_redis(redis_client)) == [], f"{case}: Redis changed"
