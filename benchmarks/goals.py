"""Issue 15's goals ("Faster hot path"), each beside the figure of this run that judges it.

Every goal is a ratio or a cost measured side by side in one run, over several rounds:
the median is judged, the spread over the rounds is shown. A goal is printed as met or
not met, never asserted (speed is measured here, not in tests). A goal whose figure came
from a saturated load generator is marked so: such a figure measures the generator.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import burst_bench, generator_bench, inventory_bench, service_bench
from .report import Figure

__all__ = ["GOALS", "Goal", "judge", "render_goals"]


@dataclass(frozen=True)
class Goal:
    what: str
    section: str
    figure: str
    #: Which measure of the figure (and of its spread) is judged.
    measure: str
    target: float
    at_most: bool
    unit: str
    #: The command that measures it alone.
    only: str
    #: The figure it is a ratio to, when it is one (its generator must not saturate either).
    reference: str | None = None
    #: The goal also needs every one of the figure's orders taken (201): a burst answered
    #: fast by refusing orders was not absorbed.
    all_taken: bool = False

    @property
    def target_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.target:g}{self.unit}"

    def read(self, f: Figure) -> float | None:
        readers: dict[str, Callable[[Figure], float | None]] = {
            "ratio": lambda x: x.ratio,
            "server_us": lambda x: x.server_us_per_op,
        }
        return readers[self.measure](f)


GOALS: tuple[Goal, ...] = (
    Goal(
        "service: POST /api/orders vs the trivial endpoint, same serving, same wrk",
        service_bench.SECTION,
        service_bench.SERVICE,
        "ratio",
        0.6,
        False,
        "x",
        "service",
        reference=service_bench.CEILING,
    ),
    Goal(
        "engine: Redis CPU per reservation, library coalesced, default batch (64)",
        inventory_bench.SECTION,
        inventory_bench.COALESCED,
        "server_us",
        15.0,
        True,
        " µs",
        "inventory",
    ),
    Goal(
        "engine: library coalesced vs one raw EVALSHA per reservation",
        inventory_bench.SECTION,
        inventory_bench.COALESCED,
        "ratio",
        3.0,
        False,
        "x",
        "inventory",
        reference=inventory_bench.RAW,
    ),
    Goal(
        "opening burst: time to the last answer, service vs trivial endpoint",
        burst_bench.SECTION,
        burst_bench.SERVICE,
        "ratio",
        1.5,
        True,
        "x",
        "burst",
        reference=burst_bench.CEILING,
        all_taken=True,
    ),
    Goal(
        "generator: surge harness CPU per request vs plain FastHttpUser",
        generator_bench.SECTION,
        generator_bench.SURGE,
        "ratio",
        2.0,
        True,
        "x",
        "generator",
        reference=generator_bench.BASELINE,
    ),
)


def _number(value: float, unit: str) -> str:
    return f"{value:.2f}{unit}" if unit == "x" else f"{value:.1f}{unit}"


def judge(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    """One verdict per goal: ``met``, ``not met`` or ``not measured``, with the median, its
    spread, whether it or its reference came from a saturated generator, and how many of
    its rounds their own harness judged invalid."""
    verdicts = []
    for goal in GOALS:
        found = next((f for f in figures if f.section == goal.section and f.name == goal.figure), None)
        value = None if found is None else goal.read(found)
        row: dict[str, Any] = {
            "goal": goal.what,
            "target": goal.target_text,
            "value": value,
            "spread": None,
            "rounds": None if found is None else found.rounds,
            "generator_saturated": False,
            "invalid_rounds": 0,
            "verdict": "not measured",
            "reason": "",
            "command": f"python -m benchmarks --only {goal.only}",
        }
        if found is not None and value is not None:
            low_high = found.spread.get(goal.measure)
            row["spread"] = list(low_high) if low_high is not None else None
            row["generator_saturated"] = any(
                f.generator_bound
                for f in figures
                if f.section == goal.section and f.name in (goal.figure, goal.reference)
            )
            row["invalid_rounds"] = found.invalid_rounds
            compare = operator.le if goal.at_most else operator.ge
            row["verdict"] = "met" if compare(value, goal.target) else "not met"
            sent = (found.clients or 0) * found.rounds
            if goal.all_taken and found.granted is not None and found.granted < sent:
                row["verdict"] = "not met"
                row["reason"] = f"{sent - found.granted:,} of {sent:,} orders not taken (see its notes)"
        verdicts.append(row)
    return verdicts


def render_goals(verdicts: Sequence[dict[str, Any]]) -> str:
    """The goals as a plain-text (Markdown) table."""
    rows = []
    for v, goal in zip(verdicts, GOALS, strict=True):
        measured = ""
        if v["value"] is not None:
            measured = _number(v["value"], goal.unit)
            if v["spread"] is not None and v["rounds"] and v["rounds"] > 1:
                low, high = v["spread"]
                measured += f" [{_number(low, goal.unit)} - {_number(high, goal.unit)}, {v['rounds']} rounds]"
            elif v["rounds"] == 1:
                measured += " [1 round]"
        verdict = "NOT met" if v["verdict"] == "not met" else v["verdict"]
        if v["reason"]:
            verdict += f": {v['reason']}"
        if v["generator_saturated"]:
            verdict += " (a generator SATURATED: see the table)"
        if v["invalid_rounds"]:
            verdict += f" ({v['invalid_rounds']} of {v['rounds']} rounds judged INVALID by their own harness)"
        rows.append((v["goal"], v["target"], measured, verdict))
    header = ("issue 15 goal", "target", "this run: median [spread]", "verdict")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
