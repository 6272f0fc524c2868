"""The sampler's stats poll over real HTTP: one kept-alive connection for every poll (a fresh
connection a second cost the load process more than the answer), a connection the backend
closed is opened again, and a refusal reads as the admin client's errors do."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from loadtests.admin import AdminError, StatsReader


class _Backend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.polls: list[dict[str, Any]] = []
        #: Close the connection after answering (as a backend's idle timeout would).
        self.close_after = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp serves
    server: _Backend

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.server.polls.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.headers.get("Authorization") != "Bearer good":
            status, body = 401, {"error": "unauthorized", "message": "bad admin token"}
        else:
            status, body = 200, {"sales": {}, "writer": {"orders_total": len(self.server.polls)}}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        if self.server.close_after:
            self.close_connection = True

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[_Backend]:
    server = _Backend()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _url(backend: _Backend) -> str:
    return f"http://127.0.0.1:{backend.server_address[1]}/"


def test_every_poll_goes_over_one_kept_alive_connection(backend: _Backend) -> None:
    reader = StatsReader(_url(backend), "good")
    answers = [reader.stats() for _ in range(5)]
    reader.close()
    assert [a["writer"]["orders_total"] for a in answers] == [1, 2, 3, 4, 5]
    assert {p["path"] for p in backend.polls} == {"/api/admin/stats"}
    assert {p["auth"] for p in backend.polls} == {"Bearer good"}
    assert backend.connections == 1


def test_a_connection_the_backend_closed_is_opened_again(backend: _Backend) -> None:
    backend.close_after = True
    reader = StatsReader(_url(backend), "good")
    assert [reader.stats()["writer"]["orders_total"] for _ in range(3)] == [1, 2, 3]
    reader.close()
    assert backend.connections == 3


def test_a_refusal_is_an_admin_error_with_the_services_code(backend: _Backend) -> None:
    reader = StatsReader(_url(backend), "wrong")
    with pytest.raises(AdminError) as refused:
        reader.stats()
    reader.close()
    assert refused.value.status == 401
    assert refused.value.code == "unauthorized"
    assert "FLASHSALE_ADMIN_TOKEN" in str(refused.value)


def test_no_backend_is_an_admin_error_that_names_the_host() -> None:
    reader = StatsReader("http://127.0.0.1:9/", "good", timeout_s=2)
    with pytest.raises(AdminError, match="cannot reach the service at http://127.0.0.1:9/"):
        reader.stats()
