"""The business verdict: your backend's own truth judged against what the clients were told.

No load tool checks the outcome of a run; this does. After the run, your oracle (any code:
an HTTP call, a SQL query, a Redis read) returns a ``Truth`` — what the backend stocked,
sold and recorded — and ``judge`` compares it with the history (``HistorySummary``):

- **oversold**: per item, units sold ≤ units stocked (``Truth.sold`` / ``Truth.stocked``);
- **lost**: every order acknowledged to a client is recorded (``Truth.recorded``);
- **duplicate**: no acknowledged order is recorded twice, no idempotency key was recorded with
  two orders, and no key was answered to the clients with two different order ids (that one
  needs no oracle: the history shows it);
- your own **named checks** (``Truth.checks``), as they are. A check of yours named like one
  of the three above is merged into it (it fails if either fails).

A check whose inputs the oracle did not give (no stock figures, no records) is *not judged*
and says so; it never passes by default. A backend that had not finished recording when the
oracle looked (``Truth.drained`` false: a queue still draining into the database) cannot tell a
lost order from a backlog: checks that need a complete record (``Check.needs_drain``; *lost*
among the three) are then not judged, and the run is invalid ("not drained") rather than
"invariant violated: lost N".
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from loadtests.history import HistorySummary

__all__ = ["CORE_CHECKS", "Check", "Recorded", "Truth", "Verdict", "format_verdict", "judge"]

#: The checks the kit makes itself from a Truth and the history.
CORE_CHECKS = ("oversold", "lost", "duplicate")


@dataclass(frozen=True)
class Check:
    """One named check: passed or not, what was observed, and the evidence in words.

    ``observed`` None means the check could not be judged (it is reported as such, never as
    passed). ``needs_drain``: the check is only meaningful once the backend has recorded
    everything.
    """

    name: str
    passed: bool
    observed: Any = 0
    detail: str = ""
    needs_drain: bool = False


@dataclass(frozen=True)
class Recorded:
    """An order as the backend recorded it: its id and, if the backend keeps one, the
    idempotency key it was created with."""

    order: str
    key: str | None = None


@dataclass(frozen=True)
class Truth:
    """What your backend says happened, read by your oracle after the run.

    - ``stocked``: units stocked per item (include restocks);
    - ``sold``: units given away per item — sold, or held for a buyer who may still pay;
    - ``recorded``: every order the backend recorded (order ids, or ``Recorded`` with its
      idempotency key); ``None`` if it cannot list them (then *lost* is judged only by a check
      of yours of that name);
    - ``checks``: your own named checks;
    - ``drained``: False if the backend was still recording when you read it (``drain_detail``
      says what was outstanding);
    - ``figures``: extra numbers shown with the client side's counts in the report;
    - ``evidence``: anything else worth keeping in ``summary.json`` (e.g. the raw audit).
    """

    stocked: Mapping[str, int] = field(default_factory=dict)
    sold: Mapping[str, int] = field(default_factory=dict)
    recorded: Iterable[str | Recorded] | None = None
    checks: Sequence[Check] = ()
    drained: bool = True
    drain_detail: str = ""
    figures: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The judged checks, the ones that could not be judged, and what the clients saw."""

    checks: tuple[Check, ...]
    not_judged: tuple[Check, ...] = ()
    drained: bool = True
    drain_detail: str = ""
    history: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def invariants_held(self) -> bool:
        """No judged check failed (see ``judged`` for whether anything was judged at all)."""
        return all(c.passed for c in self.checks)

    @property
    def judged(self) -> bool:
        return bool(self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariants_held": self.invariants_held,
            "drained": self.drained,
            "drain_detail": self.drain_detail,
            "checks": [asdict(c) for c in self.checks],
            "not_judged": [asdict(c) for c in self.not_judged],
            "log": dict(self.history),
            "evidence": dict(self.evidence),
        }


def _examples(items: Sequence[Any], n: int = 5) -> str:
    return json.dumps(list(items[:n]), default=str) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _oversold(truth: Truth) -> Check:
    if not truth.stocked and not truth.sold:
        return Check("oversold", False, None, "not judged: the oracle returned no stocked/sold figures")
    over = []
    total = 0
    for item in sorted({*truth.stocked, *truth.sold}):
        stocked, sold = int(truth.stocked.get(item, 0)), int(truth.sold.get(item, 0))
        if sold > stocked:
            over.append(f"{item}: {sold} sold of {stocked} stocked")
            total += sold - stocked
    return Check("oversold", not over, total, "; ".join(over))


def _records(truth: Truth) -> list[Recorded] | None:
    if truth.recorded is None:
        return None
    return [r if isinstance(r, Recorded) else Recorded(str(r)) for r in truth.recorded]


def _lost(records: list[Recorded] | None, told: HistorySummary) -> Check:
    if records is None:
        return Check(
            "lost", False, None, "not judged: the oracle listed no recorded orders", needs_drain=True
        )
    known = {r.order for r in records}
    lost = [o for o in told.acknowledged if o not in known]
    detail = f"acknowledged to a client, not recorded: {_examples(lost)}" if lost else ""
    return Check("lost", not lost, len(lost), detail, needs_drain=True)


def _duplicate(records: list[Recorded] | None, told: HistorySummary) -> Check:
    found: list[dict[str, Any]] = [
        {"key": key, "orders": ids, "seen_by": "clients"} for key, ids in told.key_conflicts.items()
    ]
    if records is not None:
        acked = set(told.acknowledged)
        twice = [o for o, n in Counter(r.order for r in records).items() if n > 1 and o in acked]
        found += [{"order": o, "seen_by": "backend", "recorded": "more than once"} for o in twice]
        by_key: dict[str, set[str]] = defaultdict(set)
        for r in records:
            if r.key is not None and r.key in told.keys:
                by_key[r.key].add(r.order)
        found += [
            {"key": k, "orders": sorted(v), "seen_by": "backend"}
            for k, v in by_key.items()
            if len(v) > 1 and k not in told.key_conflicts
        ]
    return Check("duplicate", not found, len(found), _examples(found) if found else "")


def _merge(core: Check, mine: Check) -> Check:
    """A check of the user's named like a core one: fails if either fails."""
    if core.observed is None:  # the kit could not judge it: the user's check stands alone
        return mine
    observed: Any = (
        core.observed + mine.observed
        if isinstance(core.observed, int | float) and isinstance(mine.observed, int | float)
        else [core.observed, mine.observed]
    )
    detail = "; ".join(d for d in (core.detail, mine.detail) if d)
    return Check(
        core.name, core.passed and mine.passed, observed, detail, core.needs_drain or mine.needs_drain
    )


def judge(truth: Truth, told: HistorySummary) -> Verdict:
    """Judge ``truth`` (from your oracle) against ``told`` (from the history)."""
    records = _records(truth)
    core = {c.name: c for c in (_oversold(truth), _lost(records, told), _duplicate(records, told))}
    mine = list(truth.checks)
    names = [c.name for c in mine]
    if len(set(names)) != len(names):
        raise ValueError(
            f"the oracle returned two checks of one name: {sorted(n for n in names if names.count(n) > 1)}"
        )
    for check in mine:
        if check.name in core:
            core[check.name] = _merge(core[check.name], check)
    candidates = [*core.values(), *(c for c in mine if c.name not in core)]
    judged: list[Check] = []
    not_judged: list[Check] = []
    for c in candidates:
        if c.observed is None:
            not_judged.append(c)
        elif c.needs_drain and not truth.drained:
            not_judged.append(
                replace(
                    c, detail=f"not judged: the backend had not drained ({truth.drain_detail or 'backlog'})"
                )
            )
        else:
            judged.append(c)
    return Verdict(
        checks=tuple(judged),
        not_judged=tuple(not_judged),
        drained=truth.drained,
        drain_detail=truth.drain_detail,
        history={**told.as_dict(), **dict(truth.figures)},
        evidence=dict(truth.evidence),
    )


def format_verdict(verdict: Verdict) -> str:
    """The checks as a plain table (one row each, the not-judged ones last)."""
    rows = [f"{'check':<16} {'result':<10} observed", "-" * 52]
    for c in verdict.checks:
        rows.append(
            f"{c.name:<16} {'ok' if c.passed else 'FAIL':<10} {c.observed}"
            + (f"  {c.detail}" if c.detail else "")
        )
    for c in verdict.not_judged:
        rows.append(f"{c.name:<16} {'not judged':<10} -  {c.detail}")
    if not verdict.drained:
        rows.append(f"not drained: {verdict.drain_detail or 'the backend was still recording'}")
    return "\n".join(rows)
