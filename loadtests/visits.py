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

Each call goes over geventhttpclient (the client beneath Locust's FastHttpSession) and fires
Locust's request event once (so Locust's statistics and web UI see it), is timed into the run's HdrHistograms from the instant the schedule meant it to be sent
(the arrival's instant for the first call, the end of the previous step for the next), and
is written to the history (``loadtests.history``) with its outcome: **ok** (with the order
it acknowledged, if any), **refused** with a code (type ``fail``: it definitely did not
happen), or **unknown** (type ``info``: no answer, a timeout, a 5xx — it may have happened).

A visit keeps the cookies its answers set (``name=value``; their attributes are not read)
and sends them with its later calls; visits share none. Redirects are not followed: a 3xx
is an answer like any other.

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
from typing import Any

import gevent
import orjson

from loadtests.arrivals import Arrival
from loadtests.history import OutcomeType, history_line, to_micros
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


def _decode(content: bytes, content_type: str) -> str:
    """An answer's body as text, in the charset its content type names (else UTF-8)."""
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        return content.decode(charset, errors="replace")
    except LookupError:
        return content.decode("utf-8", errors="replace")


def _json_body(content: bytes, content_type: str) -> Any:
    """The answer's JSON body, or None if it is not JSON. orjson reads the bytes as they came
    (UTF-8, as JSON is); what it refuses (another encoding, NaN, an int beyond 64 bits) is
    read from the text in the answer's declared charset."""
    if not content:
        return None
    try:
        return orjson.loads(content)
    except ValueError:
        pass
    try:
        return jsonlib.loads(_decode(content, content_type))
    except ValueError:  # not JSON: the text stays readable, the persona can still judge it
        return None


class _Answer:
    """What one request brought back: status (0: none), body, content type, cookies set."""

    __slots__ = ("content", "content_type", "cookies", "error", "status")

    def __init__(
        self,
        status: int,
        content: bytes,
        content_type: str = "",
        cookies: tuple[str, ...] = (),
        error: str = "",
    ) -> None:
        self.status, self.content, self.content_type = status, content, content_type
        self.cookies, self.error = cookies, error


class _Sessions:
    """The HTTP connections of one process, a pool per timeout a persona asks for.

    Requests go straight to geventhttpclient's ``HTTPClient`` (what Locust's FastHttpSession
    sends through) and every call fires Locust's request event once (``Call._report``), so
    Locust's statistics and web UI see it. Locust's user agent layer (URL objects, header
    merging, cookie jar, response wrappers, an exception for each 4xx/5xx) cost more than the
    request itself; none of it is needed here: a status is an answer the persona judges, a
    call is one request (never retried behind the persona), cookies belong to one visit
    (``Visit``), redirects are answers like any other."""

    def __init__(self, host: str, request_event: Any, *, connections: int, timeout_s: float) -> None:
        from geventhttpclient.url import URL
        from locust.exception import CatchResponseError

        self.host, self.request_event = host, request_event
        self.connections, self.timeout_s = connections, timeout_s
        #: The exception Locust's statistics count a failed call by (``ResponseContextManager.failure``).
        self.failure: type[Exception] = CatchResponseError
        self._prefix = URL(host).path.rstrip("/") if host else ""
        self._clients: dict[tuple[str, float], Any] = {}

    def client(self, origin: str, timeout_s: float | None) -> Any:
        """The pool for ``origin`` (the host's, or an absolute URL's) at this timeout."""
        t = self.timeout_s if timeout_s is None else float(timeout_s)
        client = self._clients.get((origin, t))
        if client is None:
            from geventhttpclient import HTTPClient

            client = self._clients[(origin, t)] = HTTPClient.from_url(
                origin,
                concurrency=self.connections,
                connection_timeout=t,
                network_timeout=t,
                insecure=True,  # as Locust's sessions: a drill is not where certificates are checked
                ssl_context_factory=_unverified_ssl_context,
            )
        return client

    def send(
        self,
        method: str,
        path: str,
        body: bytes | str | None,
        headers: Mapping[str, str],
        timeout_s: float | None,
    ) -> _Answer:
        """One request; the answer, or status 0 and why there was none (timeout, refused …).
        A stop (GreenletExit) goes through to the caller."""
        if "://" in path:
            from geventhttpclient.url import URL

            url = URL(path)
            origin, uri = f"{url.scheme}://{url.netloc}", url.quoted_uri
        else:
            origin, uri = self.host, self._prefix + path
        try:
            response = self.client(origin, timeout_s).request(method, uri, body=body or b"", headers=headers)
            try:
                content = response.read()
            finally:
                response.release()  # back to the pool (closed if the answer was cut short)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # no answer: the backend may have acted; the call says "unknown"
            return _Answer(0, b"", error=str(exc) or type(exc).__name__)
        cookies = response.get("set-cookie") if "set-cookie" in response else None
        return _Answer(
            int(response.status_code),
            bytes(content),
            str(response.get("content-type") or ""),
            tuple(cookies) if isinstance(cookies, list) else ((cookies,) if cookies else ()),
        )


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


#: A call's body not parsed yet (None is a parsed answer: not JSON).
_UNPARSED: Any = object()


class Call:
    """One HTTP call and its answer; report its outcome with ``ok``, ``refused`` or ``unknown``
    (or use it as a context manager: an outcome not reported is classified on exit)."""

    def __init__(
        self,
        visit: Visit,
        *,
        method: str,
        path: str,
        name: str,
        key: str | None,
        intended: float,
        sent: float,
        done: float,
        status: int,
        error: str,
        answer: _Answer,
        history: bool,
    ) -> None:
        self.visit = visit
        self.method, self.name, self.key, self._path = method, name, key, path
        self.intended, self.sent, self.done = intended, sent, done
        #: HTTP status; 0 when no answer came (timeout, connection error).
        self.status = status
        #: The transport's error text when there was no answer.
        self.error = error
        self.reported = False
        self._answer = answer
        self._body: Any = _UNPARSED
        self._history = history

    @property
    def body(self) -> Any:
        """The parsed JSON body, or None if the answer was not JSON (or there was none).
        Parsed when first asked for: a page view judged by its status never pays for it."""
        if self._body is _UNPARSED:
            answer = self._answer
            self._body = _json_body(answer.content, answer.content_type) if self.status else None
        return self._body

    @property
    def text(self) -> str:
        """The answer's body as text (decoded when first asked for: most personas read ``body``)."""
        return _decode(self._answer.content, self._answer.content_type)

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
        sessions = self.visit._shared.sessions
        sessions.request_event.fire(  # Locust's statistics and web UI, as a with-block call reports
            request_type=self.method,
            name=self.name,
            response_time=(self.done - self.sent) * 1000,
            response_length=len(self._answer.content),
            response=None,
            context={},
            exception=None if expected else sessions.failure(label),
            start_time=self.sent,
            url=self._path,
        )
        if self._history:
            fields.update(
                f=self.name,
                type=kind,
                status=self.status,
                code=code,
                key=self.key,
                intended=self.intended,
                invoke=self.sent,
                complete=self.done,
                error=self.error,
            )
            self.visit._write(fields)


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
        self._cookies: dict[str, str] = {}

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
        if json is not None and not data:
            # What Locust's own json= does, with orjson (several times cheaper than its json.dumps).
            data = orjson.dumps(json)
            headers = _json_headers(headers)
        if self._cookies:
            headers = {**(headers or {}), "Cookie": "; ".join(f"{k}={v}" for k, v in self._cookies.items())}
        try:
            answer = shared.sessions.send(method, path, data, headers or {}, timeout)
        except gevent.GreenletExit:
            # Stopped in flight: the backend may have acted; the history must say "unknown".
            if history:
                self._write(
                    {
                        "f": name,
                        "type": "info",
                        "status": 0,
                        "code": "stopped",
                        "key": key,
                        "intended": intended,
                        "invoke": sent,
                        "complete": shared.clock(),
                    }
                )
            raise
        done = shared.clock()
        self._intended = done
        for cookie in answer.cookies:  # this visit's from now on (name=value; attributes ignored)
            pair = cookie.split(";", 1)[0]
            if "=" in pair:
                cookie_name, _, cookie_value = pair.partition("=")
                self._cookies[cookie_name.strip()] = cookie_value.strip()
        status = answer.status
        call = Call(
            self,
            method=method,
            path=path,
            name=name,
            key=key,
            intended=intended,
            sent=sent,
            done=done,
            status=status,
            error="" if status else (answer.error or "no answer"),
            answer=answer,
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

    def _write(self, fields: dict[str, Any]) -> None:
        """One history line (``loadtests.history``) from ``fields`` (this call's, changed in
        place): this visit's, numbered in its process, its instants to the microsecond."""
        shared = self._shared
        fields["intended"] = to_micros(fields["intended"])
        fields["invoke"] = to_micros(fields["invoke"])
        fields["complete"] = to_micros(fields["complete"])
        fields.update(op=next(shared.ops), proc=shared.proc_id, visit=self.id, persona=self.persona)
        shared.recorder.log(history_line(fields))


def _unverified_ssl_context(cafile: str | None = None) -> Any:
    """An SSL context that checks no certificate, for ``insecure=True`` (a drill against a
    test endpoint with a self-signed certificate, as Locust's own sessions allow)."""
    import gevent.ssl

    context = gevent.ssl.create_default_context(cafile=cafile)
    context.check_hostname = False
    context.verify_mode = gevent.ssl.CERT_NONE
    return context
