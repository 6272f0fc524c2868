"""What the command-line tests share: ``flashsale(*args)`` runs ``python -m flashsale`` as a
user would, with no ``FLASHSALE_*`` variable from the test's own environment (only ``env``)."""

from __future__ import annotations

import os
import subprocess
import sys


def flashsale(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
