"""What a ``flashsale`` command's exit status means — one table for every command.

A command that *judges* (rehearse, capacity, drill, audit, recover --check) uses the
verdict codes; every command uses the others. A usage error (a bad flag, a bad setting)
never shares a code with a verdict, so a typo in a CI script never reads like an oversell.

| code | meaning |
|---|---|
| 0  | ok: done, or judged and everything held |
| 1  | SLO missed: invariants held, a latency/error threshold failed |
| 2  | invariant violated: oversold, lost, duplicated or leaked units; data Redis lost |
| 3  | run invalid: the load generator could not keep up, or the run could not drain |
| 4  | not ready: the stores are unreachable or the schema is not migrated |
| 64 | usage: bad flags, settings or arguments (BSD ``EX_USAGE``) |

The drill kit (``loadtests.exit_codes``) uses 0–3 with the same meanings; a test keeps
the two tables in step.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
SLO_MISSED: Final = 1
INVARIANT_VIOLATED: Final = 2
RUN_INVALID: Final = 3
NOT_READY: Final = 4
USAGE: Final = 64

MEANING: Final[dict[int, str]] = {
    OK: "ok",
    SLO_MISSED: "SLO missed: invariants held but a threshold failed",
    INVARIANT_VIOLATED: "invariant violated: something was oversold, lost, duplicated or leaked",
    RUN_INVALID: "run invalid: the load generator could not keep up or the run could not drain",
    NOT_READY: "not ready: the stores are unreachable or the schema is not migrated",
    USAGE: "usage: bad flags, settings or arguments",
}
