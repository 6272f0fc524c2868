"""What the command-line tests share: ``flashsale(*args)`` runs ``python -m flashsale`` as a
user would, with no ``FLASHSALE_*`` variable from the test's own environment (only ``env``);
``started(*args)`` starts it the same way and returns at once (a worker, a server)."""

from __future__ import annotations

import os
import subprocess
import sys


def _environ(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return {**base, **(env or {})}


def flashsale(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args],
        env=_environ(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def started(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m flashsale *args`` running, its output piped (read it with communicate())."""
    return subprocess.Popen(
        [sys.executable, "-m", "flashsale", *args],
        env=_environ(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
