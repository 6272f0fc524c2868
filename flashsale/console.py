"""What a command prints besides its own output: the one-line error, JSON reports
(``-`` means stdout), URLs with their passwords blanked out (:func:`redact`: every URL a
command prints or logs goes through it), and the event loop a command runs on (uvloop
when installed, chosen here and nowhere else — entry points only, never on import)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import exit_codes

__all__ = ["fail", "install_uvloop", "redact", "run", "store_failed", "write_json"]


def fail(message: str, code: int = exit_codes.USAGE) -> int:
    """Print ``flashsale: <message>`` on stderr (passwords in URLs redacted) and return
    ``code`` (a usage error by default)."""
    print(f"flashsale: {redact(message)}", file=sys.stderr)
    return code


def store_failed(store: str, url: str, exc: BaseException, *, transient: bool) -> int:
    """One line for a store a command could not use, and its exit code: one that does not
    answer (``transient``) is "not ready" (4: try again later); one that answered and
    refused (a password, a database name, not that kind of server) is a setting to fix (64)."""
    error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if transient:
        return fail(f"cannot reach {store} at {url}: {error}", exit_codes.NOT_READY)
    return fail(f"{store} at {url} refused this command: {error}; check the URL", exit_codes.USAGE)


#: ``scheme://user:PASSWORD@`` (the password runs to the last ``@`` before the path).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@\"]*:)[^/\s\"<>]*@")
#: ``?password=…`` / ``&password=…``: asyncpg and redis-py both take one in the query.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd)=)[^&\s#\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``
    (``postgresql://u:s3cret@db/x`` → ``postgresql://u:***@db/x``): a URL is never printed
    or logged with its password, so a pasted error or a shared log leaks nothing."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + "***@", text)
    return _QUERY_PASSWORD.sub(lambda m: m["head"] + "***", text)


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
