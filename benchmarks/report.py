"""Figures and how they are shown: the one table every benchmark prints, the JSON file,
and the verdict on each correctness claim.

A figure is one measured rate with what is needed to judge it: latency, the units it
oversold (for ways of holding stock), a ratio to a named reference measured in the same
run, and the CPU share of the process that generated the load. A strategy that oversold
while claiming it never does is a failure of the run; a strategy that is known to oversell
is shown as wrong, never as fast.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GENERATOR_BOUND",
    "STARVED",
    "Claim",
    "Figure",
    "check_claims",
    "render_table",
    "write_json",
]

#: A generator that waited for a core longer than this share of the run was starved by
#: other work on the machine: its figure reads low, and the table says so.
STARVED = 0.10

#: A generator using more than this share of one core is taken to be saturated: the figure
#: may then measure the generator rather than what it drives.
GENERATOR_BOUND = 0.90


class Claim(str, enum.Enum):
    """What a way of holding stock promises about overselling."""

    EXACT = "never oversells"
    MAY_OVERSELL = "may oversell"


@dataclass(frozen=True)
class Figure:
    """One measured rate, as measured."""

    section: str
    name: str
    rate: float
    unit: str
    #: Concurrent clients (or connections) that generated the load.
    clients: int | None = None
    #: The share of one core the load generator used (CPU time / wall time).
    generator_cpu: float | None = None
    #: The share of the run the generator waited for a core (a busy machine), when known.
    generator_wait: float | None = None
    #: The share of one core the server used, when it can be read.
    server_cpu: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: The slowest answer (the opening burst: the time until the last buyer heard back).
    max_ms: float | None = None
    claim: Claim | None = None
    stock: int | None = None
    granted: int | None = None
    #: Units granted minus stock, counted by the clients that were told "yours".
    oversold: int | None = None
    #: Units taken as the store's own counters tell it after the run: must equal ``granted``.
    store_granted: int | None = None
    errors: int = 0
    ratio: float | None = None
    ratio_to: str | None = None
    wall_s: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Rounds this figure is the median of (``rounds.combine``); 1 for a single run.
    rounds: int = 1
    #: (lowest, highest) over the rounds of each measure that has one: "rate", "ratio",
    #: "generator_us", "server_us", "max_ms", "p99_ms".
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The busiest round's generator CPU share: a figure is generator-bound when any of its
    #: rounds was, not only the median one.
    generator_cpu_max: float | None = None
    #: Medians of the per-round CPU µs per operation, when combined from rounds; a single
    #: run derives them from its CPU share and rate (``generator_us_per_op``).
    generator_us: float | None = None
    server_us: float | None = None
    #: Rounds whose own harness judged them invalid (a rehearsal whose Locust process could
    #: not keep up with its arrivals): their figures describe the generator's trouble.
    invalid_rounds: int = 0

    @property
    def generator_bound(self) -> bool:
        shares = [s for s in (self.generator_cpu, self.generator_cpu_max) if s is not None]
        return bool(shares) and max(shares) > GENERATOR_BOUND

    @property
    def generator_us_per_op(self) -> float | None:
        """CPU µs the load generator spent per operation (request, reservation, call)."""
        if self.generator_us is not None:
            return self.generator_us
        return _per_op_us(self.generator_cpu, self.rate)

    @property
    def server_us_per_op(self) -> float | None:
        """CPU µs the server (Redis, PostgreSQL, the service) spent per operation."""
        if self.server_us is not None:
            return self.server_us
        return _per_op_us(self.server_cpu, self.rate)

    @property
    def undersold(self) -> int | None:
        """Units left unsold although every client gave up (stock stranded)."""
        if self.stock is None or self.granted is None:
            return None
        return max(0, self.stock - self.granted)

    @property
    def wrong(self) -> bool:
        """Oversold, whatever it claimed: such a rate is not a throughput anyone can use."""
        return bool(self.oversold)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["claim"] = None if self.claim is None else self.claim.value
        out["notes"] = list(self.notes)
        out["generator_bound"] = self.generator_bound
        out["generator_us_per_op"] = self.generator_us_per_op
        out["server_us_per_op"] = self.server_us_per_op
        out["spread"] = {k: list(v) for k, v in self.spread.items()}
        out["undersold"] = self.undersold
        out["wrong"] = self.wrong
        return out


def _per_op_us(share: float | None, rate: float) -> float | None:
    if share is None or share != share or rate <= 0:  # NaN: the CPU could not be read
        return None
    return share / rate * 1e6


def check_claims(figures: Iterable[Figure]) -> list[str]:
    """Every way in which a figure contradicts its own claim or the harness contradicts
    itself. Empty when the run is sound; each entry says what broke."""
    problems: list[str] = []
    for f in figures:
        label = f"{f.section}/{f.name}"
        if f.store_granted is not None and f.granted is not None and f.store_granted != f.granted:
            problems.append(
                f"{label}: the clients were granted {f.granted} units but the store's counters say "
                f"{f.store_granted} were taken: a reservation was lost or counted twice"
            )
        if f.claim is Claim.EXACT:
            if f.oversold:
                problems.append(f"{label}: claims it never oversells but oversold {f.oversold} units")
            if f.undersold:
                problems.append(
                    f"{label}: every client was told 'sold out' while {f.undersold} units were still unsold"
                )
        if f.errors:
            problems.append(f"{label}: {f.errors} attempts failed with an error (see its notes)")
    return problems


def _rate(f: Figure) -> str:
    text = f"{f.rate:,.0f}"
    return f"({text})" if f.wrong else text


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _share(value: float | None, *, bound: bool = False) -> str:
    if value is None:
        return ""
    return f"{value * 100:.0f}%" + (" SATURATED" if bound else "")


def _oversold(f: Figure) -> str:
    if f.oversold is None:
        return ""
    if f.oversold == 0:
        return "0"
    return f"{f.oversold} !"


def _us(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _ratio(f: Figure) -> str:
    if f.wrong:
        return "wrong, not fast"
    if f.ratio is None:
        return ""
    text = f"{f.ratio:.2f}x {f.ratio_to}"
    low_high = f.spread.get("ratio")
    if low_high is not None and f.rounds > 1:
        text += f" [{low_high[0]:.2f}-{low_high[1]:.2f}]"
    return text


def _verdict(f: Figure) -> str:
    parts: list[str] = []
    if f.claim is Claim.MAY_OVERSELL:
        parts.append(
            f"OVERSOLD {f.oversold} units, as check-then-act does"
            if f.oversold
            else "no oversell this time (luck, not a guarantee)"
        )
    elif f.claim is Claim.EXACT and f.oversold:
        parts.append(f"CLAIM BROKEN: oversold {f.oversold}")
    parts.extend(f.notes)
    if f.generator_bound:
        busiest = max(s for s in (f.generator_cpu, f.generator_cpu_max) if s is not None)
        parts.append(
            f"generator-bound (busiest round: {busiest:.0%} of a core)" if f.rounds > 1 else "generator-bound"
        )
    if f.generator_wait is not None and f.generator_wait > STARVED:
        parts.append(f"machine busy: generator waited for a core {f.generator_wait:.0%} of the run")
    return "; ".join(parts)


_COLUMNS = (
    "section",
    "what",
    "N",
    "rate /s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "oversold",
    "ratio",
    "gen CPU",
    "gen µs/op",
    "server CPU",
    "server µs/op",
    "notes",
)


def render_table(figures: Sequence[Figure]) -> str:
    """The results as one plain-text table (also valid Markdown)."""
    rows = [
        (
            f.section,
            f.name,
            "" if f.clients is None else str(f.clients),
            _rate(f),
            _ms(f.p50_ms),
            _ms(f.p99_ms),
            _ms(f.max_ms),
            _oversold(f),
            _ratio(f),
            _share(f.generator_cpu, bound=f.generator_bound),
            _us(f.generator_us_per_op),
            _share(f.server_cpu),
            _us(f.server_us_per_op),
            _verdict(f),
        )
        for f in figures
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(_COLUMNS)]
    right = {2, 3, 4, 5, 6, 7, 9, 10, 11, 12}

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(_COLUMNS), rule, *(line(r) for r in rows)])


def write_json(
    path: Path,
    *,
    machine: dict[str, Any],
    settings: dict[str, Any],
    figures: Sequence[Figure],
    extra: dict[str, Any],
    problems: Sequence[str],
) -> None:
    document = {
        "machine": machine,
        "settings": settings,
        "figures": [f.as_json() for f in figures],
        "problems": list(problems),
        **extra,
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
