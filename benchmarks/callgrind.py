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
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
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
    Blocking calls (each runs ``callgrind_control``): from a loop, use ``asyncio.to_thread``.
    Each raises ``subprocess.CalledProcessError`` when callgrind_control found no such
    process, and ``subprocess.TimeoutExpired`` when it did not answer within ``timeout_s``."""

    #: callgrind_control's helper (vgdb) can wait for ever on a process that exited while a
    #: command was on its way: a dump sent as a Locust run ended hung a CI run this way.
    TIMEOUT_S = 30.0

    def __init__(
        self,
        pid: int,
        out: Path,
        *,
        command: Sequence[str] = ("callgrind_control",),
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.pid = pid
        self._out = out
        self._command = list(command)
        self._timeout_s = timeout_s

    def _control(self, *args: str) -> None:
        # A session of its own: on a timeout, vgdb (callgrind_control's child) goes too.
        proc = subprocess.Popen(
            [*self._command, *args, str(self.pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=self._timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        # callgrind_control exits 0 even when it found no such task: its message says so.
        if proc.returncode or "not detected" in out + err:
            raise subprocess.CalledProcessError(proc.returncode or 1, proc.args, out, err)

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
