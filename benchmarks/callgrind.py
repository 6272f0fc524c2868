"""Counting a server's instructions with callgrind (Debian package ``valgrind``): the
measure the instruction benchmarks judge a change by on a busy machine, where time cannot
see a few percent.

A server is started under :func:`wrapper` with instrumentation off; :class:`Counter`
switches it on once the server has warmed up, and each :meth:`Counter.window` is the count
since the window before it (callgrind's ``--dump``, which also zeroes its counters).
"""

from __future__ import annotations

import asyncio
import glob
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["TOOLS", "Counter", "missing", "run_counted", "totals", "wrapper"]

TOOLS = ("valgrind", "callgrind_control")


def missing() -> list[str]:
    """The tools of :data:`TOOLS` not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def wrapper(out: Path) -> list[str]:
    """The command to run a server under: callgrind, instrumentation off until switched
    on, dumps written to ``<out>.<pid>.<n>``."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]


def totals(dump: Path) -> int:
    """The instruction count of one callgrind dump (its ``totals:`` line)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals line (not a callgrind dump?)")


class Counter:
    """The counts of the process ``pid`` runs under :func:`wrapper` with this ``out``.
    Blocking calls (each runs ``callgrind_control``): from a loop, use ``asyncio.to_thread``."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self._out = out

    def _control(self, *args: str) -> None:
        done = subprocess.run(["callgrind_control", *args, str(self.pid)], capture_output=True, text=True)
        # callgrind_control exits 0 even when it found no such task: its message says so.
        if done.returncode or "not detected" in done.stdout + done.stderr:
            raise subprocess.CalledProcessError(done.returncode or 1, done.args, done.stdout, done.stderr)

    def start(self) -> None:
        """Switch counting on; what switching on itself cost is dumped and not counted."""
        self._control("--instr=on")
        self._control("--dump")

    def window(self) -> int:
        """Instructions since the last window (or :meth:`start`)."""
        self._control("--dump")
        dumps = glob.glob(f"{self._out}.{self.pid}.*")
        return totals(Path(max(dumps, key=lambda d: int(d.rsplit(".", 1)[1]))))


def run_counted(name: str, measure: Callable[[], Awaitable[dict[str, Any]]], json_path: Path | None) -> int:
    """A counting program's main: ``measure()`` (it prints its table) and its report written
    to ``json_path``; without valgrind, a note saying what to install, and exit 0."""
    absent = missing()
    if absent:
        print(f"{name}: skipped, {' and '.join(absent)} not on PATH (Debian: apt-get install valgrind)")
        return 0
    report = asyncio.run(measure())
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    return 0
