"""The HTTP transport under the app: aiohttp's runner and protocol, made to answer what
never reaches the app's middlewares with the same JSON error every other answer uses.

aiohttp answers on its own, in plain text, whatever its parser refuses (a request line,
header, chunk, Content-Length or Content-Encoding it cannot read: 400), an ``Expect``
header it does not know (417, and a 500 when the header is not UTF-8: it writes the
value into its message), and anything that escaped the app. :class:`ServiceRunner`
serves the app with :class:`ServiceRequestHandler` protocols and a first look at each
request, so these answers are ``{"error": "<stable_code>", "message": "…"}`` too:
400 ``malformed_http``, ``malformed_body`` or ``bad_content_encoding``, 413
``body_too_large``, 417 ``expectation_failed``. ``flashsale serve`` and the tests use it.

It also bounds how long a connection is held without a whole request. aiohttp has no
deadline for a request head: a client trickling one byte at a time held its connection (a
file descriptor) until the keep-alive timer. Here a head must be complete within
``FLASHSALE_READ_TIMEOUT`` of its first byte (408 ``request_timeout``, then closed), a
connection that sends nothing is closed after ``FLASHSALE_IDLE_TIMEOUT`` (aiohttp's
keep-alive timer, which also runs from the connection's start), as is one whose client
takes none of its answers for that long (the slow-read attack: pipelined requests, answers
never read, which held a connection for ever), and after a 408 the connection is closed
at once instead of lingering to read the rest of a body. Under all of them lies the
process's open-file limit, which its own connections to Redis need too: at
``FLASHSALE_MAX_CONNECTIONS`` (:func:`connection_cap`) a new connection takes the place of
the oldest one waiting for a request, or, with none waiting, is closed at once.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError

from flashsale.service.errors import ApiError, error_response, http_exception_response
from flashsale.service.http import payload_refusal
from flashsale.service.state import STATE
from flashsale.settings import Settings

__all__ = ["ServiceRequestHandler", "ServiceRunner", "connection_cap", "first_look"]

AppHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ServiceRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1 protocol, answering requests its parser refused (and anything that
    escaped the app, which the app's middleware makes a should-not-happen) with the JSON
    error. The connection is closed after it, as aiohttp does. ``head_timeout_s``: see the
    module docstring (0: no head deadline)."""

    __slots__ = ("head_timeout_s", "_head_timer", "_taken_timer")

    def __init__(self, *args: Any, head_timeout_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._taken_timer: asyncio.TimerHandle | None = None

    def waiting_for_request(self) -> bool:
        """Idle between requests, or a head still coming: no request is being served."""
        return self._waiter is not None and not self._waiter.done()

    def pause_writing(self) -> None:
        # The answers fill the socket: the client is not taking them. It has the idle time
        # to take some (a timer only now, so an answer that is taken at once costs none).
        super().pause_writing()
        if self._taken_timer is None and self.keepalive_timeout > 0:
            self._taken_timer = self._loop.call_later(self.keepalive_timeout, self._answers_not_taken)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._taken_timer is not None:
            self._taken_timer.cancel()
            self._taken_timer = None

    def _answers_not_taken(self) -> None:
        self._taken_timer = None
        self.log_debug("dropped a connection whose client took no answer for %g s", self.keepalive_timeout)
        if self.transport is not None:
            self.transport.abort()  # close() would wait to send what the client does not take
        self.force_close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        if waiter is None or waiter.done():  # a whole head came (or a request is running)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and self.head_timeout_s > 0 and data.strip(b"\r\n"):
            # Part of a head, and the protocol waits for the rest (blank lines between
            # requests are no head: RFC 9112 lets a server ignore them).
            self._head_timer = self._loop.call_later(self.head_timeout_s, self._head_overdue, waiter)

    def _head_overdue(self, waiter: asyncio.Future[None]) -> None:
        self._head_timer = None
        if waiter is not self._waiter or waiter.done() or self.transport is None:
            return  # the head came after all
        body = json.dumps(
            {
                "error": "request_timeout",
                "message": f"the request head did not arrive within {self.head_timeout_s:g} s",
            }
        ).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.force_close()  # closes once the answer is written

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._taken_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._taken_timer = None
        super().connection_lost(exc)

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # aiohttp's own coroutine, handed back as it is (aiohttp awaits it): every other
        # answer pays no coroutine layer of ours for what only a 408 needs.
        if resp.status == 408:
            return self._finish_and_close(request, resp, start_time)
        return super().finish_response(request, resp, start_time)

    async def _finish_and_close(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        # RFC 9110: closed after a 408. aiohttp would linger (10 s) reading the rest of a
        # body from the very client that ran out its deadline sending it.
        self.force_close()
        return answered

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is on its way already: nothing to add
            raise ConnectionError("response already started; cannot send an error after it")
        if status >= 500:
            self.log_exception("error handling request from %s", request.remote, exc_info=exc)
            refusal = ApiError(status, "internal_error", "unexpected server error; it has been logged")
        elif isinstance(exc, PayloadEncodingError):
            refusal = payload_refusal(exc, request.client_max_size)
        else:
            # A client's mistake (or a scanner's): not worth an error line per request.
            self.log_debug("refused a request the HTTP parser could not read: %s", exc)
            reason = (message or "bad request").splitlines()[0][:200]
            refusal = ApiError(status, "malformed_http", f"the request is not valid HTTP/1.1: {reason}")
        response = error_response(refusal.status, refusal.code, refusal.message)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # After answering, aiohttp reads and drops the rest of a body the app did not need;
        # a body that cannot be decoded (its Content-Encoding, its chunks) ends that with an
        # "Unhandled exception" error line. It is the client's mistake, already answered.
        if isinstance(kwargs.get("exc_info"), web.RequestPayloadError):
            self.log_debug(*args, **kwargs)
            return
        super().log_exception(*args, **kwargs)


def first_look(app_handler: AppHandler) -> AppHandler:
    """The app's request handler, behind what aiohttp would answer before the app's
    middlewares run: an ``Expect`` other than ``100-continue``, and a refusal raised
    there (both plain text from aiohttp)."""

    def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        expect = request.headers.get("Expect")
        if expect is None:  # nothing is answered before the middlewares: no layer of our own
            return app_handler(request)
        return expecting(request, expect)

    async def expecting(request: web.BaseRequest, expect: str) -> web.StreamResponse:
        if expect.lower() != "100-continue":
            return error_response(
                417, "expectation_failed", "the only expectation understood is 100-continue"
            )
        try:
            return await app_handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_exception_response(exc)

    return handle


def connection_cap(settings: Settings) -> int:
    """Client connections one process keeps: ``FLASHSALE_MAX_CONNECTIONS``, or the
    open-file limit less a quarter of it (at most 1024), kept for the process's own
    connections (Redis, PostgreSQL) and files."""
    if settings.max_connections > 0:
        return settings.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - min(1024, soft // 4))


class _ServiceServer(web.Server):
    """aiohttp's connection factory, making :class:`ServiceRequestHandler` protocols, at
    most ``max_connections`` of them at once (see the module docstring)."""

    max_connections = 0  # 0: no cap
    open_connections = 0  # counted here: aiohttp's list of them is a copy per look

    def __call__(self) -> web.RequestHandler:
        return ServiceRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1
        if not self.max_connections or self.open_connections <= self.max_connections:
            return
        for other in self.connections:  # the oldest first
            if isinstance(other, ServiceRequestHandler) and other.waiting_for_request():
                other.log_debug("closed a waiting connection to make room for a new one")
                other.force_close()
                return
        handler.log_debug("closed a new connection: every connection is serving a request")
        # Once its protocol has started (it does right after this): closed now, the protocol
        # would start on a connection already lost.
        asyncio.get_running_loop().call_soon(handler.force_close)


class ServiceRunner(web.AppRunner):
    """``web.AppRunner`` whose connections speak :class:`ServiceRequestHandler` and give
    each request :func:`first_look`. Handlers are not cancelled when a client hangs up
    (aiohttp's default for servers; its TestServer chooses otherwise). The connection's
    deadlines are the service's settings (read once the app has started), whatever
    keep-alive the runner was given."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        settings = self.app[STATE].settings
        service_server = _ServiceServer(
            first_look(server.request_handler),
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            # the protocol options the app and this runner chose, then the service's own
            **{**server._kwargs, "keepalive_timeout": settings.idle_timeout_s},
            head_timeout_s=settings.read_timeout_s,
        )
        service_server.max_connections = connection_cap(settings)
        return service_server
