"""flashsale's operator API as its drill uses it, over HTTP (docs/http-api.md, "Operators"):
mint buyer tokens, create and steer the drill's sale (and its waiting room), poll live stats
(``parse_stats``), ask for the audit and the waiting room's record.

Plain ``urllib`` (``http.client`` for the once-a-second stats poll, ``StatsReader``) so it
works in a Locust process (gevent-patched sockets) and in a plain Python process (the oracle
run on its own) alike.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtests.recording import ServiceSample

__all__ = [
    "AdminClient",
    "AdminError",
    "StatsReader",
    "admin_token_from_env",
    "parse_stats",
    "parse_tokens",
]


class AdminError(RuntimeError):
    """An admin call failed; the message says what to do about it."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def admin_token_from_env() -> str:
    return os.environ.get("FLASHSALE_ADMIN_TOKEN", "")


def parse_tokens(body: Any) -> dict[str, str]:
    """Buyer tokens from a ``POST /api/admin/tokens`` answer, as ``{user: token}``.

    Accepts ``{"tokens": {user: token}}``, ``{"tokens": [{"user", "token"}]}``, or a list of
    token strings (the user is the token's first dot-separated field).
    """
    tokens = body.get("tokens", body) if isinstance(body, Mapping) else body
    if isinstance(tokens, Mapping):
        return {str(u): str(t) for u, t in tokens.items()}
    out: dict[str, str] = {}
    for item in tokens or []:
        if isinstance(item, Mapping):
            out[str(item["user"])] = str(item["token"])
        else:
            out[str(item).split(".", 1)[0]] = str(item)
    return out


@dataclass(frozen=True)
class AdminClient:
    host: str
    token: str
    timeout_s: float = 30.0

    def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.host.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            exc.close()
            raise _refused(method, path, exc.code, str(exc.reason), payload) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _unreachable(method, path, self.host, exc) from None
        return json.loads(raw) if raw else {}

    def mint_tokens(self, prefix: str, count: int, ttl_s: int = 3600) -> dict[str, str]:
        """Tokens for users ``<prefix>0`` … ``<prefix><count-1>`` (one small request)."""
        body = self.call("POST", "/api/admin/tokens", {"prefix": prefix, "count": count, "ttl_s": ttl_s})
        tokens = parse_tokens(body)
        missing = [f"{prefix}{i}" for i in range(count) if f"{prefix}{i}" not in tokens]
        if missing:
            raise AdminError(
                f"POST /api/admin/tokens returned no token for {len(missing)} users, e.g. {missing[:3]}"
            )
        return tokens

    def create_sale(self, spec: Mapping[str, Any]) -> Any:
        return self.call("POST", "/api/admin/sales", spec)

    def sale(self, name: str) -> Any:
        return self.call("GET", f"/api/admin/sales/{name}")

    def release_reserve(self, sale: str, sku: str, units: int | None = None) -> Any:
        body = {} if units is None else {"units": units}
        return self.call("POST", f"/api/admin/sales/{sale}/skus/{sku}/release-reserve", body)

    def switch_room(self, sale: str, on: bool = True, **settings: Any) -> Any:
        """Put the sale behind its waiting room (or take it out): ``rate_per_s``, ``oversubscribe``…"""
        return self.call("POST", f"/api/admin/sales/{sale}/room", {"on": on, **settings})

    def room_record(self, sale: str) -> Any:
        """The waiting room's record (seed, pre-queue, every buyer's place and times)."""
        return self.call("GET", f"/api/admin/sales/{sale}/room")

    def close_sale(self, sale: str) -> Any:
        return self.call("POST", f"/api/admin/sales/{sale}/close", {})

    def register_target(
        self, scenario: str, sale: str, origin_ms: int, points: Sequence[Sequence[float]]
    ) -> Any:
        """Tell the war room what this drill intends (cumulative orders over time)."""
        return self.call(
            "PUT",
            "/api/admin/warroom/target",
            {"scenario": scenario, "sale": sale, "origin_ms": origin_ms, "points": [list(p) for p in points]},
        )

    def stats(self) -> Any:
        return self.call("GET", "/api/admin/stats", timeout_s=5.0)

    def audit(self, acknowledged: Sequence[str], wait_s: float) -> Any:
        return self.call(
            "POST",
            "/api/admin/audit",
            {"acknowledged": list(acknowledged), "wait_s": wait_s},
            timeout_s=wait_s + self.timeout_s,
        )


def _refused(method: str, path: str, status: int, reason: str, payload: bytes) -> AdminError:
    """The error for an answer that is not a 2xx: the service's code and message, and a hint."""
    try:
        err = json.loads(payload)
    except ValueError:
        err = {}
    code = err.get("error", "") if isinstance(err, Mapping) else ""
    hint = ""
    if status == 401:
        hint = " — pass the service's admin token (FLASHSALE_ADMIN_TOKEN or --admin-token)"
    return AdminError(
        f"{method} {path} answered {status} {code or reason}: "
        f"{err.get('message', '') if isinstance(err, Mapping) else ''}{hint}",
        status=status,
        code=code,
    )


def _unreachable(method: str, path: str, host: str, exc: Exception) -> AdminError:
    return AdminError(
        f"{method} {path}: cannot reach the service at {host} ({exc}); "
        "check --host and that the service is running"
    )


class StatsReader:
    """``GET /api/admin/stats`` over one kept-alive connection, for a sampler that asks once a
    second from the load process: a fresh ``urllib`` connection each time (a name lookup on
    gevent's thread pool, a connect, urllib's opener) costs that process more than the
    answer. Used by one greenlet at a time; a connection the service closed is opened again."""

    PATH = "/api/admin/stats"

    def __init__(self, host: str, token: str, timeout_s: float = 5.0) -> None:
        url = urllib.parse.urlsplit(host)
        self.host = host
        self._https = url.scheme == "https"
        self._netloc = url.netloc
        self._path = url.path.rstrip("/") + self.PATH
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def stats(self) -> Any:
        while True:
            reused = self._conn is not None
            conn = self._conn or self._connect()
            try:
                conn.request("GET", self._path, headers=self._headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                if reused:  # the service closed it since the last poll: once more, on a new one
                    continue
                raise _unreachable("GET", self.PATH, self.host, exc) from None
            if resp.will_close:
                self.close()
            if not 200 <= resp.status < 300:
                raise _refused("GET", self.PATH, resp.status, resp.reason, raw)
            return json.loads(raw) if raw else {}

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = kind(self._netloc, timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _sku_counters(raw_skus: Any) -> dict[str, dict[str, int]]:
    items: Iterable[tuple[str, Any]]
    if isinstance(raw_skus, Mapping):
        items = raw_skus.items()
    else:
        items = ((str(s.get("sku")), s) for s in raw_skus or [] if isinstance(s, Mapping))
    out: dict[str, dict[str, int]] = {}
    for sku, counters in items:
        if isinstance(counters, Mapping):
            out[sku] = {
                k: v
                for k, v in (
                    (k, _int(counters.get(k))) for k in ("total", "available", "held", "sold", "reserve")
                )
                if v is not None
            }
    return out


def parse_stats(body: Mapping[str, Any], t: float, sale: str | None = None) -> ServiceSample:
    """Per-SKU stock, the order stream's backlog and the writer's progress from a stats body.

    The service's form is ``{"sales": {sale: {"skus": {...}, "backlog": n}}, "writer":
    {"orders_total": n, "rows_total": n, …}}``; with ``sale`` only that sale is read. A flat
    ``{"skus", "backlog"}`` is read too. Whatever is missing stays ``None`` (the report
    says "not reported").
    """
    skus: dict[str, dict[str, int]] = {}
    backlog: int | None = None
    sales = body.get("sales")
    if isinstance(sales, Mapping):
        for name, entry in sales.items():
            if (sale is not None and name != sale) or not isinstance(entry, Mapping):
                continue
            skus.update(_sku_counters(entry.get("skus")))
            if (b := _int(entry.get("backlog"))) is not None:
                backlog = (backlog or 0) + b
    else:
        skus = _sku_counters(body.get("skus"))
        backlog = _int(body.get("backlog"))
    written = None
    writer = body.get("writer")
    if isinstance(writer, Mapping):
        for key in ("orders_total", "written", "rows_total"):
            if (written := _int(writer.get(key))) is not None:
                break
    return ServiceSample(t, skus, backlog, written)
