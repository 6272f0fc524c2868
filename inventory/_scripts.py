"""Loading the Lua scripts: ``lua/<name>.lua`` with ``-- @include <snippet>`` lines
replaced by ``lua/includes/<snippet>.lua``. Scripts are registered with redis-py's
Script objects, which run EVALSHA and reload the script on NOSCRIPT (after a Redis
restart or failover the script cache is empty)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["ROOM_SCRIPT_NAMES", "SCRIPT_NAMES", "register_all", "register_room", "script_source"]

SCRIPT_NAMES = (
    "reserve",
    "confirm",
    "release",
    "expire",
    "stock",
    "adjust",
    "release_reserve",
    "transfer_begin",
    "transfer_out",
    "transfer_in",
    "transfer_due",
)
#: The waiting room's scripts (``_room.py``): registered by a WaitingRoom, not an Inventory.
ROOM_SCRIPT_NAMES = ("room_configure", "room_join", "room_poll", "room_use")
_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)


def _read(path: str) -> str:
    return resources.files("inventory").joinpath("lua", path).read_text(encoding="utf-8")


@cache
def script_source(name: str) -> str:
    """The full text of a script, includes inlined."""
    if name not in SCRIPT_NAMES and name not in ROOM_SCRIPT_NAMES:
        raise KeyError(name)
    return _INCLUDE.sub(lambda m: _read(f"includes/{m.group(1)}.lua"), _read(f"{name}.lua"))


def register_all(redis: Any) -> dict[str, Any]:
    """Register every script on a client; returns name -> callable Script object."""
    return {name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES}


def register_room(redis: Any) -> dict[str, Any]:
    """Register the waiting room's scripts on a client."""
    return {name: redis.register_script(script_source(name)) for name in ROOM_SCRIPT_NAMES}
