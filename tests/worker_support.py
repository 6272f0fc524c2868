"""What the worker-process tests share: ``python -m flashsale worker`` started as an
operator would, its log in a file (a pipe could fill and block it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def worker_environment(redis_url: str, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker on the test's servers that takes over idle entries, joins
    new sales and reports progress quickly; ``settings`` adds ``FLASHSALE_*`` variables."""
    return {
        **os.environ,
        "FLASHSALE_REDIS_URL": redis_url,
        "FLASHSALE_DATABASE_URL": database_url,
        "FLASHSALE_WORKER_CLAIM_IDLE_MS": "300",
        "FLASHSALE_WORKER_CLAIM_INTERVAL_S": "0.2",
        "FLASHSALE_WORKER_SALES_REFRESH_S": "0.1",
        "FLASHSALE_WORKER_BLOCK_MS": "20",
        "FLASHSALE_WORKER_PROGRESS_INTERVAL_S": "1",
        **settings,
    }


class WorkerProcess:
    """``python -m flashsale worker`` with its log in a file (a pipe could fill and block it)."""

    def __init__(self, env: dict[str, str], log: Path, consumer: str, *, batch: int = 2000) -> None:
        self.log = log
        with log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flashsale", "worker", "--consumer", consumer, "--batch", str(batch)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def events(self) -> str:
        return self.log.read_text()
