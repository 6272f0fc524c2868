"""HTTP errors: what turns every failure into ``{"error": "<stable_code>", "message": "…"}``
with the right status (:func:`error_answer`, called by the app's one middleware).

Inventory exceptions carry their own stable codes; this module maps each to a status.
Anything a client can send ends in a 4xx; a 5xx means the server could not decide
(Redis or PostgreSQL unreachable, outcome unknown) and says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

import inventory

__all__ = [
    "ApiError",
    "error_answer",
    "error_response",
    "http_exception_response",
    "status_for",
]

log = logging.getLogger("flashsale.errors")


class ApiError(Exception):
    """An answer other than success, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


# Most specific first: the first isinstance match wins.
_STATUS: tuple[tuple[type[inventory.InventoryError], int], ...] = (
    (inventory.SoldOut, 409),
    (inventory.LimitExceeded, 429),
    (inventory.HoldClosed, 409),
    (inventory.InvalidRequest, 422),
    (inventory.HoldNotFound, 404),
    (inventory.SkuExists, 409),
    (inventory.InsufficientStock, 409),
    (inventory.OutcomeUnknown, 504),
    (inventory.TicketRefused, 403),
)


def status_for(exc: inventory.InventoryError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **details: Any
) -> web.Response:
    body = {"error": code, "message": message}
    body.update({k: v for k, v in details.items() if v is not None})
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusal (404, 405, 417…) as the JSON error."""
    code = {404: "not_found", 405: "method_not_allowed", 417: "expectation_failed"}.get(
        exc.status, "http_error"
    )
    # Only Allow is worth keeping (405); copying all of exc.headers brought its
    # Content-Type along, which web.Response refuses beside content_type (a 500).
    allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return error_response(exc.status, code, exc.reason, allow)


def _from_inventory(exc: inventory.InventoryError) -> web.Response:
    code = "order_not_found" if isinstance(exc, inventory.HoldNotFound) else exc.code
    details = {k: v for k, v in exc.details.items() if k != "hold_id"}
    return error_response(status_for(exc), code, exc.message, **details)


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON answer to what a handler raised (a redirect is raised again: not an error)."""
    if isinstance(exc, ApiError):
        response = error_response(exc.status, exc.code, exc.message, exc.headers, **exc.details)
        if exc.status == 408:
            response.force_close()  # RFC 9110: after a 408 the connection is closed, not waited on
        return response
    if isinstance(exc, inventory.InventoryError):
        return _from_inventory(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        # aiohttp raises this while reading a body sent without Content-Length (chunked);
        # the exception does not keep the limit, the request does.
        return error_response(
            413, "body_too_large", f"request body is larger than {request.client_max_size} bytes"
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return http_exception_response(exc)
    if isinstance(exc, RedisError):
        log.warning("redis error on %s: %s", request.path, exc)
        return error_response(
            503,
            "redis_unavailable",
            "the stock store is not answering; try again shortly",
            {"Retry-After": "1"},
        )
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal_error", "unexpected server error; it has been logged")
