"""A visit's calls over real HTTP: what the backend receives (JSON body, its headers, the
cookies it set for that visit) and what the persona reads back (status, body, text), whatever
the status; one call is one request, seen once by Locust's statistics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_BACKEND = """
import json, sys
from aiohttp import web

async def echo(request):
    raw = await request.read()
    answer = {
        "content_type": request.headers.get("Content-Type"),
        "accept": request.headers.get("Accept"),
        "cookie": request.headers.get("Cookie"),
        "body": json.loads(raw) if raw else None,
        "error": "sold_out",
    }
    status = int(request.query.get("status", "200"))
    response = web.json_response(answer, status=status)
    if "cookie" in request.query:
        response.set_cookie("visit", request.query["cookie"])
    return response

async def slow(request):
    import asyncio
    await asyncio.Event().wait()  # never answers: only the caller's own timeout ends the call

async def plain(request):
    return web.Response(text="not json", status=503)

app = web.Application()
app.router.add_route("*", "/echo", echo)
app.router.add_get("/plain", plain)
app.router.add_post("/slow", slow)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[str]:
    script = tmp_path / "backend.py"
    script.write_text(_BACKEND)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the test backend did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()  # a throwaway backend; its /slow handler never ends, so no graceful stop
        proc.wait(10)


# Locust patches the standard library for gevent on import: the visits run in a process of their own.
_CLIENT = """
import json, random, sys, time
from pathlib import Path
import locust  # noqa: F401  (patches first, as a locustfile's process does)
from loadtests.arrivals import Arrival
from loadtests.recording import ProcessRecorder
from loadtests.visits import Visit, _ProcessVisits, _Sessions

class Seen:
    def __init__(self):
        self.fired = []
    def fire(self, **meta):
        self.fired.append({"name": meta["name"], "exception": repr(meta["exception"]) if meta["exception"] else None})

def visit(seen):
    shared = _ProcessVisits(
        sessions=_Sessions(sys.argv[1], seen, connections=4, timeout_s=5.0),
        recorder=ProcessRecorder("local", time.time(), request_log=Path(sys.argv[2]) / "local.requests.jsonl"),
        proc_id="local", run_id="r", rng=random.Random(1), state=None, options=None,
        order_operations=frozenset({"order"}),
    )
    return Visit(Arrival(7, time.time(), 0.0, "open", "open"), "buyer", shared)

out = {}
seen = Seen()
v = visit(seen)
order = {"request_id": "r-7", "sku": "mug", "qty": 1, "note": "caf\u00e9"}
call = v.post("/echo", name="order", key="r-7", json=order, headers={"Authorization": "Bearer t"})
out["json"] = {"status": call.status, "body": call.body, "text": call.text}
call = v.put("/echo", json=[1], headers={"content-type": "application/json; charset=utf-8"})
out["own_type"] = call.body["content_type"]
with v.post("/echo?status=409", name="order", key="k", json={"qty": 1}) as call:
    out["refused"] = {"status": call.status, "code": call.code}
    call.refused(call.code)
answer = v.get("/plain", name="browse", history=False)
out["plain"] = {"status": answer.status, "body": answer.body, "text": answer.text}
out["cookies"] = [v.get("/echo").body["cookie"], v.get("/echo?cookie=v1").status, v.get("/echo").body["cookie"]]
late = v.post("/slow", name="order", key="s", json={}, timeout=0.2)
out["timeout"] = {"status": late.status, "error": late.error, "body": late.body}
late.unknown("impatient_timeout", expected=True)
out["after_timeout"] = v.get("/echo").status
v._finish()
other = visit(Seen())
out["other_visit_cookie"] = other.get("/echo").body["cookie"]
other._finish()
out["fired"] = seen.fired
print(json.dumps(out))
"""


@pytest.fixture
def calls(backend: str, tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, backend, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_json_call_sends_json_and_reads_json_back(calls: dict[str, Any]) -> None:
    sent = calls["json"]
    assert sent["status"] == 200
    assert sent["body"]["body"] == {"request_id": "r-7", "sku": "mug", "qty": 1, "note": "café"}
    assert sent["body"]["content_type"] == "application/json" and sent["body"]["accept"] == "application/json"
    assert sent["text"].startswith("{") and '"sold_out"' in sent["text"]
    # A content type the persona gives is kept (and not sent twice).
    assert calls["own_type"] == "application/json; charset=utf-8"


def test_any_status_is_an_answer_read_once(calls: dict[str, Any]) -> None:
    assert calls["refused"] == {"status": 409, "code": "sold_out"}
    assert calls["plain"] == {"status": 503, "body": None, "text": "not json"}
    # One request each (no retry behind the persona's back), as Locust's statistics see them;
    # the refusal was reported expected, the 503 left to the default (an error).
    fired = calls["fired"]
    assert [m["name"] for m in fired] == [
        "order",
        "/echo",
        "order",
        "browse",
        "/echo",
        "/echo?cookie=v1",
        "/echo",
        "order",
        "/echo",
    ]
    assert fired[2]["exception"] is None and fired[3]["exception"] is not None


def test_no_answer_in_time_is_status_0_and_the_next_call_goes_through(calls: dict[str, Any]) -> None:
    assert calls["timeout"]["status"] == 0 and calls["timeout"]["body"] is None
    assert calls["timeout"]["error"]  # the transport's reason, for the history
    assert calls["after_timeout"] == 200


def test_cookies_the_backend_sets_are_sent_back_by_that_visit_only(calls: dict[str, Any]) -> None:
    assert calls["cookies"] == [None, 200, "visit=v1"]
    assert calls["other_visit_cookie"] is None  # another visitor: another browser
