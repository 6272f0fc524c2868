"""What a drill's exit status means (shared by the locustfile, the oracle and `flashsale rehearse`).

Precedence when several apply: an invariant violation wins (a correctness bug is news
whatever else happened), then an invalid run (its latency figures describe the load
generator, so an SLO verdict on them would mislead), then a missed SLO.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
SLO_MISSED: Final = 1
INVARIANT_VIOLATED: Final = 2
RUN_INVALID: Final = 3

MEANING: Final[dict[int, str]] = {
    OK: "all good: invariants held and every SLO threshold passed",
    SLO_MISSED: "SLO missed: invariants held but a threshold failed",
    INVARIANT_VIOLATED: "invariant violated: something was oversold, lost, duplicated or leaked",
    RUN_INVALID: "run invalid: the load generator could not keep up, the figures describe it, not the service",
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
