"""What every handler reads off a request the same way: the bearer token and the JSON
body — read under the read deadline (``FLASHSALE_READ_TIMEOUT``, 408 when it passes), within
the size limit, and a 4xx for anything that is not one JSON object: a body that is not in
its declared ``Content-Encoding``, broken chunked framing, a body cut short — and the JSON
answer of the buyer endpoints.

JSON is parsed and written by orjson; a body orjson refuses is judged by the stdlib's
parser, as before orjson: it also reads NaN, Infinity, lone surrogates and UTF-16/32, and
what it makes of them (a NaN quantity: 422 ``invalid_quantity``) stays the answer."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, DecompressSizeError, HttpProcessingError

from flashsale.service.errors import ApiError
from flashsale.service.state import STATE

__all__ = ["bearer", "json_answer", "payload_refusal", "read_body", "read_json"]


def bearer(request: web.Request) -> str:
    """The bearer token of the request's one Authorization header. Two are refused (RFC
    9110 allows one): a proxy that reads the last and this service, the first, would
    disagree on who is asking."""
    headers = request.headers
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(headers.getall("Authorization")) > 1:
        raise ApiError(
            401,
            "unauthorized",
            "send one 'Authorization: Bearer <token>' header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def payload_refusal(exc: BaseException | None, client_max_size: int) -> ApiError:
    """The answer to a body aiohttp could not take apart (``exc`` is aiohttp's parser error,
    or what ``request.read()`` raised with it as its cause)."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) and exc.__cause__ else exc
    if isinstance(cause, DecompressSizeError):
        return ApiError(413, "body_too_large", f"request body is larger than {client_max_size} bytes")
    if isinstance(cause, ContentEncodingError):
        return ApiError(
            400,
            "bad_content_encoding",
            "the body is not in its Content-Encoding (gzip, deflate and br are understood; "
            "send plain JSON without the header)",
        )
    return ApiError(400, "malformed_body", "the body's framing is broken (chunks or length)")


async def read_body(request: web.Request) -> bytes:
    """The raw body, read within the read deadline (aiohttp keeps it: a second call returns
    it at once)."""
    length = request.content_length
    if length is not None and length > request.client_max_size:
        raise ApiError(413, "body_too_large", f"request body is larger than {request.client_max_size} bytes")
    if "Content-Encoding" in request.headers:
        _one_coding(request)
    try:
        if request.content.is_eof():  # it all came with the headers (nearly every order): no wait
            return await request.read()
        with request.app[STATE].read_deadline():
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {request.app[STATE].read_deadline.seconds:g} s",
        ) from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        raise payload_refusal(exc, request.client_max_size) from None
    except ConnectionError:  # the client went away mid-body: nobody reads this answer
        raise ApiError(400, "malformed_body", "the connection closed before the body ended") from None


def _one_coding(request: web.Request) -> None:
    """Refuse a body declared in more than one coding (``gzip, gzip``, or two fields):
    aiohttp decodes one coding at most (the first field's, and only a name it knows), so
    such a body cannot be read as declared; "not JSON" would hide why."""
    codings = [
        c for field in request.headers.getall("Content-Encoding") for c in field.split(",") if c.strip()
    ]
    if len(codings) > 1:
        raise ApiError(
            400,
            "bad_content_encoding",
            "the body is declared in more than one Content-Encoding; send it in one "
            "(gzip, deflate or br), or plain JSON without the header",
        )


#: The body of a request as read_json parsed it: the fence guard reads an order's body to
#: tell its sale, the handler reads it again, and it is parsed once for both.
_PARSED_BODY = web.RequestKey("flashsale_parsed_body", dict)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx saying what is wrong with it. Every reader of
    one request gets the same object: treat it as read-only."""
    # Looked up only when the request holds anything at all: a key it does not hold costs
    # aiohttp's mapping a KeyError raised and caught (~1 us), and an order's body is read
    # by its handler alone unless the fence is refusing something.
    parsed: dict[str, Any] | None = request.get(_PARSED_BODY) if len(request) else None
    if parsed is not None:
        return parsed
    body = _json_object(await read_body(request))
    request[_PARSED_BODY] = body
    return body


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(422, "malformed_json", "the request needs a JSON object body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…]]]] nested deep
            raise ApiError(422, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "malformed_json", "the body must be a JSON object")
    return body


def json_answer(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """``body`` as a JSON answer (as ``web.json_response`` would write it, only faster)."""
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )
