"""What a drill's exit status means (shared by the locustfile, the oracle and `flashsale rehearse`).

Precedence when several apply: an invariant violation wins (a correctness bug is news
whatever else happened), then an invalid run (its latency figures describe the load
generator, or the backend had not finished recording, so a verdict on them would mislead),
then a missed SLO. ``USAGE`` (64, BSD's EX_USAGE) is a bad option: nothing ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

OK: Final = 0
SLO_MISSED: Final = 1
INVARIANT_VIOLATED: Final = 2
RUN_INVALID: Final = 3
USAGE: Final = 64

MEANING: Final[dict[int, str]] = {
    OK: "all good: invariants held and every SLO threshold passed",
    SLO_MISSED: "SLO missed: invariants held but a threshold failed",
    INVARIANT_VIOLATED: "invariant violated: something was oversold, lost, duplicated or leaked",
    RUN_INVALID: "run invalid: the load generator could not keep up, the figures describe it, not the service",
    USAGE: "usage error: a bad option or value; nothing ran",
}


def decide(*, invariants_held: bool, run_valid: bool, slo_passed: bool) -> int:
    """The drill's exit code, with the precedence explained in the module docstring."""
    if not invariants_held:
        return INVARIANT_VIOLATED
    if not run_valid:
        return RUN_INVALID
    if not slo_passed:
        return SLO_MISSED
    return OK


def meaning(
    code: int, *, unjudged: str = "", failed: Sequence[str] = (), invalid_because: Sequence[str] = ()
) -> str:
    """The verdict in one line, as specific as the run allows: the checks that failed, the
    first reason a run is invalid, and — when nothing judged the invariants — why not
    (``unjudged``, e.g. "no oracle") instead of "invariants held"."""
    if code == INVARIANT_VIOLATED and failed:
        return "invariant violated: " + ", ".join(failed)
    if code == RUN_INVALID and invalid_because:
        more = f" (and {len(invalid_because) - 1} more)" if len(invalid_because) > 1 else ""
        return f"run invalid: {invalid_because[0]}{more}"
    unchecked = f"{unjudged}: nothing checked for oversold, lost or duplicate orders"
    if unjudged and code == OK:
        return f"every SLO threshold passed; {unchecked}"
    if unjudged and code == SLO_MISSED:
        return f"SLO missed: a threshold failed; {unchecked}"
    return MEANING.get(code, f"exit {code}")
