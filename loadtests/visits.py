"""One visit: a persona's HTTP calls and the outcome it reports for each.

A persona is plain code that receives a ``Visit`` and makes calls with it, as a Locust task
uses ``self.client``::

    def buyer(visit: Visit) -> None:
        with visit.post("/checkout", name="checkout", key=visit.id, json={...}) as call:
            if call.status == 201:
                call.ok(order=call.body["order"], item="mug", units=1)
            elif call.status == 409:
                call.refused("out_of_stock")      # the backend said no: a correct answer
            # anything not reported: 2xx ok, 4xx refused (an error), no answer or 5xx unknown

Each call goes through Locust's FastHttpSession (so Locust's statistics and web UI see it),
is timed into the run's HdrHistograms from the instant the schedule meant it to be sent
(the arrival's instant for the first call, the end of the previous step for the next), and
is written to the history (``loadtests.history``) with its outcome: **ok** (with the order
it acknowledged, if any), **refused** with a code (type ``fail``: it definitely did not
happen), or **unknown** (type ``info``: no answer, a timeout, a 5xx — it may have happened).

A refusal is *expected* by default (a sold-out answer is the backend doing its job: a
success for the error ratio); pass ``expected=False`` for refusals that are errors. An
unknown outcome is an error unless ``expected=True`` (a client that gave up on purpose).
"""

from __future__ import annotations

import itertools
import json as jsonlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from typing import Any

import gevent
import orjson

from loadtests.arrivals import Arrival
from loadtests.history import OutcomeType, history_line
from loadtests.recording import ProcessRecorder

__all__ = ["Call", "Visit"]


def _json_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers Locust's ``json=`` sends: the caller's, and JSON's content type and accept."""
    out = dict(headers) if headers else {}
    if "Content-Type" not in out and "content-type" not in out:
        out["Content-Type"] = "application/json"
    if "Accept" not in out and "accept" not in out:
        out["Accept"] = "application/json"
    return out


def _text(handle: Any) -> str:
    try:
        return str(handle.text or "")
    except ValueError:
        return ""


def _json_body(handle: Any) -> Any:
    """The answer's JSON body, or None if it is not JSON. orjson reads the bytes as they came
    (UTF-8, as JSON is); what it refuses (another encoding, NaN, an int beyond 64 bits) is
    read as before, from the text in the answer's declared encoding."""
    content = handle.content
    if not content:
        return None
    try:
        return orjson.loads(content)
    except ValueError:
        pass
    try:
        text = handle.text or ""
        return jsonlib.loads(text) if text else None
    except ValueError:  # not JSON: the text stays readable, the persona can still judge it
        return None


#: Every HTTP status: none makes the HTTP client raise (``_Sessions``).
_ANY_STATUS = frozenset(range(100, 1000))


class _Cookies(CookieJar):
    """Locust's cookie jar, skipped while it holds nothing to send or an answer sets none: a
    backend that sets no cookie (flashsale's API takes a bearer token) costs no cookie work."""

    def add_cookie_header(self, request: Any) -> None:
        if self._cookies:  # type: ignore[attr-defined]
            super().add_cookie_header(request)

    def extract_cookies(self, response: Any, request: Any) -> None:
        headers = getattr(response, "headers", None)  # case-insensitive, as the jar reads them
        if headers is None or "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response, request)


class _Sessions:
    """Locust FastHttpSessions of one process, one per timeout a persona asks for."""

    def __init__(self, host: str, request_event: Any, *, connections: int, timeout_s: float) -> None:
        self.host, self.request_event = host, request_event
        self.connections, self.timeout_s = connections, timeout_s
        self._by_timeout: dict[float, Any] = {}

    def get(self, timeout_s: float | None) -> Any:
        t = self.timeout_s if timeout_s is None else float(timeout_s)
        session = self._by_timeout.get(t)
        if session is None:
            from locust.contrib.fasthttp import FastHttpSession

            session = self._by_timeout[t] = FastHttpSession(
                self.host,
                request_event=self.request_event,
                user=None,
                concurrency=self.connections,
                network_timeout=t,
                connection_timeout=t,
                # One call is one request (as FastHttpUser's default): a retry is the persona's
                # to make, and to time and write to the history.
                max_retries=0,
            )
            agent: Any = session.client
            # Every status is an answer the persona judges (the call reports the outcome), not
            # an error for the HTTP client to raise, describe and catch again (a surge's
            # sold-out answers all took that path).
            agent.valid_response_codes = _ANY_STATUS
            session.cookiejar = agent.cookiejar = _Cookies()
        return session


@dataclass
class _ProcessVisits:
    """What every visit of one process shares: sessions, recorder, numbering."""

    sessions: _Sessions
    recorder: ProcessRecorder
    proc_id: str
    run_id: str
    rng: random.Random
    state: Any
    options: Any
    order_operations: frozenset[str]
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = gevent.sleep
    ops: Any = field(default_factory=itertools.count)


class Call:
    """One HTTP call and its answer; report its outcome with ``ok``, ``refused`` or ``unknown``
    (or use it as a context manager: an outcome not reported is classified on exit)."""

    def __init__(
        self,
        visit: Visit,
        *,
        method: str,
        name: str,
        key: str | None,
        intended: float,
        sent: float,
        done: float,
        status: int,
        body: Any,
        error: str,
        handle: Any,
        history: bool,
    ) -> None:
        self.visit = visit
        self.method, self.name, self.key = method, name, key
        self.intended, self.sent, self.done = intended, sent, done
        #: HTTP status; 0 when no answer came (timeout, connection error).
        self.status = status
        #: The parsed JSON body, or None if the answer was not JSON.
        self.body = body
        #: The transport's error text when there was no answer.
        self.error = error
        self.reported = False
        self._handle = handle
        self._history = history

    @property
    def text(self) -> str:
        """The answer's body as text (decoded when first asked for: most personas read ``body``)."""
        if not self.status or self._handle is None:
            return ""
        return _text(self._handle)

    @property
    def code(self) -> str:
        """The error code of a JSON error body (its ``error`` or ``code`` field), else ``""``."""
        if isinstance(self.body, Mapping):
            for field_name in ("error", "code"):
                value = self.body.get(field_name)
                if isinstance(value, str):
                    return value
        return ""

    # -- outcomes ----------------------------------------------------------------------------
    def ok(
        self,
        *,
        order: str | None = None,
        item: str | None = None,
        units: int | None = None,
        replayed: bool = False,
        **value: Any,
    ) -> None:
        """The backend did it. ``order``: the order id it acknowledged (the oracle checks every
        acknowledged order is recorded exactly once); ``item``/``units``: what the order holds;
        ``replayed``: an idempotent retry answered with the first outcome."""
        label = f"{self.status}" + (":replayed" if replayed else "")
        bucket = "replayed" if replayed else ("created" if order else "ok")
        self._report(
            "ok", "", True, label, bucket, order=order, item=item, units=units, replayed=replayed, value=value
        )

    def refused(self, code: str, *, expected: bool = True, **value: Any) -> None:
        """The backend definitely did not do it, and said why (``code``). ``expected``: a correct
        answer (sold out, limit reached) rather than an error."""
        code = code or "refused"
        self._report("fail", code, expected, f"{self.status}:{code}", code, value=value)

    def unknown(self, code: str = "", *, expected: bool = False, **value: Any) -> None:
        """Not known whether the backend did it (no answer, a timeout, a 5xx): the oracle treats
        it as possibly done. ``expected``: the client gave up on purpose (not an error)."""
        code = code or ("no_answer" if not self.status else str(self.status))
        self._report("info", code, expected, f"{self.status}:{code}", "unknown", value=value)

    def settle(self) -> None:
        """Report the default outcome if none was: 2xx ok, 4xx refused (an error), else unknown."""
        if self.reported:
            return
        if 200 <= self.status < 300:
            self.ok()
        elif 400 <= self.status < 500:
            self.refused(self.code or str(self.status), expected=False)
        else:
            self.unknown(self.code)

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.settle()

    def _report(
        self, kind: OutcomeType, code: str, expected: bool, label: str, bucket: str, **fields: Any
    ) -> None:
        if self.reported:
            raise RuntimeError(f"the outcome of this {self.name} call was already reported")
        self.reported = True
        self.visit._shared.recorder.request(
            self.name,
            intended=self.intended,
            sent=self.sent,
            done=self.done,
            expected=expected,
            label=label,
            bucket=bucket,
        )
        if self._handle is not None:  # Locust's statistics and web UI
            self._handle.__enter__()
            if expected:
                self._handle.success()
            else:
                self._handle.failure(label)
            self._handle.__exit__(None, None, None)
        if self._history:
            self.visit._write(
                f=self.name,
                type=kind,
                status=self.status,
                code=code,
                key=self.key,
                intended=self.intended,
                invoke=self.sent,
                complete=self.done,
                error=self.error,
                **fields,
            )


class Visit:
    """One arrival's visit: the persona's calls, its sleeps, and what it knows.

    - ``arrival``: when and in which window of the shape it arrived (``arrival.kind`` is
      ``countdown``, ``rendezvous``, ``open`` or ``idle``);
    - ``id``: unique in the run (a good idempotency key for the visit's first order);
    - ``persona``, ``run_id``, ``rng`` (this process's seeded random), ``options`` (Locust's
      parsed options, yours included), ``state`` (what your process setup returned).
    """

    def __init__(self, arrival: Arrival, persona: str, shared: _ProcessVisits) -> None:
        self.arrival = arrival
        self.persona = persona
        self._shared = shared
        self.id = f"{shared.run_id}-{arrival.seq}"
        self._intended = arrival.intended
        self._open: list[Call] = []

    @property
    def run_id(self) -> str:
        return self._shared.run_id

    @property
    def rng(self) -> random.Random:
        return self._shared.rng

    @property
    def state(self) -> Any:
        return self._shared.state

    @property
    def options(self) -> Any:
        return self._shared.options

    def clock(self) -> float:
        return self._shared.clock()

    # -- calls -------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        name: str | None = None,
        key: str | None = None,
        json: Any = None,
        data: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        history: bool = True,
    ) -> Call:
        """Send one request and return its ``Call``. ``name`` groups it in Locust's statistics
        and names the operation in the history (default: the path); ``key`` is the idempotency
        key it carries, if any; ``timeout`` overrides ``--request-timeout`` for this call;
        ``history=False`` leaves it out of the history (page views: counted and timed only)."""
        self._settle_open()
        shared = self._shared
        name = name or path
        intended, sent = self._intended, shared.clock()
        session = shared.sessions.get(timeout)
        if json is not None and not data:
            # What Locust's own json= does, with orjson (several times cheaper than its json.dumps).
            data = orjson.dumps(json)
            headers = _json_headers(headers)
        try:
            handle = session.request(
                method,
                path,
                name=name,
                data=data,
                headers=headers,  # Locust copies them
                catch_response=True,
            )
        except gevent.GreenletExit:
            # Stopped in flight: the backend may have acted; the history must say "unknown".
            if history:
                self._write(
                    f=name,
                    type="info",
                    status=0,
                    code="stopped",
                    key=key,
                    intended=intended,
                    invoke=sent,
                    complete=shared.clock(),
                )
            raise
        done = shared.clock()
        self._intended = done
        status = int(handle.status_code or 0)
        body = _json_body(handle) if status else None
        call = Call(
            self,
            method=method,
            name=name,
            key=key,
            intended=intended,
            sent=sent,
            done=done,
            status=status,
            body=body,
            error="" if status else str(getattr(handle, "error", "") or "no answer"),
            handle=handle,
            history=history,
        )
        self._open.append(call)
        return call

    def get(self, path: str, **kwargs: Any) -> Call:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Call:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Call:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Call:
        return self.request("DELETE", path, **kwargs)

    # -- time --------------------------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        """Wait (think time, a backoff); the next call is meant to go when the wait ends."""
        until = self._shared.clock() + max(seconds, 0.0)
        self._shared.sleep(max(seconds, 0.0))
        self._intended = until

    def think(self, low_s: float, high_s: float) -> None:
        """Sleep a uniformly random think time between ``low_s`` and ``high_s``."""
        self.sleep(self.rng.uniform(low_s, high_s))

    # -- internals ---------------------------------------------------------------------------
    def _settle_open(self) -> None:
        for call in self._open:
            call.settle()
        self._open = []

    def _finish(self) -> None:
        """The persona returned (or raised): every call gets an outcome."""
        self._settle_open()

    def _write(self, **fields: Any) -> None:
        """One history line (``loadtests.history``): this visit's, numbered in its process."""
        shared = self._shared
        for t in ("intended", "invoke", "complete"):
            fields[t] = round(fields[t], 6)
        fields.update(op=next(shared.ops), proc=shared.proc_id, visit=self.id, persona=self.persona)
        shared.recorder.log(history_line(fields))
