"""A worker given a Redis that refuses it (a wrong password, or none where one is needed)
stops at once with exit 64 and one line saying so, its password redacted: that is a setting
to fix, not an outage to wait out. Before, the worker took the refusal for an outage and
waited for ever, logging ``redis_unavailable`` once, while no order was written.

Runs the real ``flashsale worker`` against an embedded Redis started with ``requirepass``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from cli_support import flashsale, started

from flashsale import exit_codes
from flashsale.runtime.embedded import RedisServer

PASSWORD = "the-right-one"


@pytest.fixture(scope="module")
def guarded_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:  # (it checks it is up without a password: set one after)
        redis.Redis(port=server.port).config_set("requirepass", PASSWORD)
        yield server


@pytest.mark.parametrize("credentials", [":not-the-password@", ""], ids=["wrong password", "no password"])
def test_the_worker_refused_by_redis_stops_with_a_setting_to_fix(
    guarded_redis: RedisServer, credentials: str
) -> None:
    url = f"redis://{credentials}127.0.0.1:{guarded_redis.port}/0"
    # --sweeper-only: no PostgreSQL needed; the writer waits on Redis the same way first.
    done = flashsale("worker", "--sweeper-only", env={"FLASHSALE_REDIS_URL": url}, timeout=60)
    assert done.returncode == exit_codes.USAGE, (done.returncode, done.stderr[-2000:])
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("flashsale: Redis at ") and "refused this command" in message, message
    assert "not-the-password" not in done.stderr


def test_the_worker_with_the_right_password_gets_past_redis(guarded_redis: RedisServer) -> None:
    """The same worker with the right password is not refused: it connects (seen in the
    server's CLIENT LIST) and, asked to stop, exits 0."""
    admin = redis.Redis(port=guarded_redis.port, password=PASSWORD)
    before = {c["id"] for c in admin.client_list()}
    url = f"redis://:{PASSWORD}@127.0.0.1:{guarded_redis.port}/0"
    worker = started("worker", "--sweeper-only", env={"FLASHSALE_REDIS_URL": url})
    try:
        give_up = time.monotonic() + 60  # a bound on failure, not a wait for success
        while not {c["id"] for c in admin.client_list()} - before:
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < give_up, "the worker never connected"
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
