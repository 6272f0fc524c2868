"""What every handler reads off a request the same way: the bearer token and the JSON
body (with its size limit and a 4xx for anything that is not one JSON object)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from flashsale.service.errors import ApiError

__all__ = ["bearer", "read_json"]


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "unauthorized",
            "send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx saying what is wrong with it."""
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise ApiError(413, "body_too_large", f"request body is larger than {request.client_max_size} bytes")
    raw = await request.read()
    if not raw:
        raise ApiError(422, "malformed_json", "the request needs a JSON object body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…]]]] nested deep
        raise ApiError(422, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "malformed_json", "the body must be a JSON object")
    return body
