"""What a command prints besides its own output: the one-line error, JSON reports
(``-`` means stdout), and the event loop a command runs on (uvloop when installed,
chosen here and nowhere else — entry points only, never on import)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import exit_codes

__all__ = ["fail", "install_uvloop", "run", "write_json"]


def fail(message: str, code: int = exit_codes.USAGE) -> int:
    """Print ``flashsale: <message>`` on stderr and return ``code`` (a usage error by default)."""
    print(f"flashsale: {message}", file=sys.stderr)
    return code


def write_json(target: Path | str | None, body: Any) -> None:
    """Write ``body`` as indented JSON to ``target``; ``-`` is stdout, None writes nothing."""
    if target is None:
        return
    text = json.dumps(body, indent=2, default=str)
    if str(target) == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when it is installed; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine on uvloop when installed; its result is the exit code."""
    install_uvloop()
    return asyncio.run(coro)
