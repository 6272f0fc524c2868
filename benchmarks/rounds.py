"""Rounds of one measurement: a figure is the median of several runs, with its spread.

One run of a few seconds on a shared 2-core machine says more about the neighbours than
about the code (issue 15 saw a 0.19x ratio in one round where quiet runs read 0.33x).
Each benchmark that judges a change repeats its measurement, interleaving the contenders
round by round so a neighbour's burst hits them alike, and reports the median of every
measure with its lowest and highest value. A ratio is the median of the per-round ratios
(each taken between runs made seconds apart), not the ratio of two medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace

from .report import Figure

__all__ = ["combine", "median_spread"]

#: The measures whose spread a combined figure reports, and how each is read from a round.
_SPREAD: dict[str, Callable[[Figure], float | None]] = {
    "rate": lambda f: f.rate,
    "ratio": lambda f: f.ratio,
    "generator_us": lambda f: f.generator_us_per_op,
    "server_us": lambda f: f.server_us_per_op,
    "max_ms": lambda f: f.max_ms,
    "p99_ms": lambda f: f.p99_ms,
}


def median_spread(values: Sequence[float | None]) -> tuple[float, tuple[float, float]] | None:
    """(median, (lowest, highest)) of the values that were measured; None when none was."""
    known = [v for v in values if v is not None and v == v]  # NaN: could not be read
    if not known:
        return None
    return statistics.median(known), (min(known), max(known))


def _median(values: Sequence[float | None]) -> float | None:
    found = median_spread(values)
    return None if found is None else found[0]


def _sum(values: Sequence[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def combine(rounds: Sequence[Figure], *, notes: Sequence[str] = ()) -> Figure:
    """One figure from the rounds of one contender: the median of each measure, its
    spread, the busiest round's generator CPU, errors and counts added up.

    Notes that every round carries are kept once; ``notes`` adds the bench's own (totals
    over the rounds). A round-specific note (a mismatch in one round) is kept too.
    """
    if not rounds:
        raise ValueError("no rounds to combine")
    first = rounds[0]
    if any((f.section, f.name) != (first.section, first.name) for f in rounds):
        raise ValueError("rounds of different figures cannot be combined")
    seen: list[str] = []
    for f in rounds:
        seen += [n for n in f.notes if n not in seen]
    # Totals are added up below, so a lost and a doubled reservation in two rounds could
    # cancel out: each round is checked on its own here.
    miscounted = [
        i
        for i, f in enumerate(rounds, 1)
        if f.store_granted is not None and f.granted is not None and f.store_granted != f.granted
    ]
    seen += [
        f"round {i}: clients were granted {rounds[i - 1].granted}, the store says {rounds[i - 1].store_granted}"
        for i in miscounted
    ]
    spread = {}
    for measure, read in _SPREAD.items():
        found = median_spread([read(f) for f in rounds])
        if found is not None:
            spread[measure] = found[1]
    if len(rounds) > 1:
        low, high = spread["rate"]
        text = f"median of {len(rounds)} rounds ({low:,.0f}..{high:,.0f} {first.unit}"
        if "max_ms" in spread:
            text += f"; last answer {spread['max_ms'][0]:,.0f}..{spread['max_ms'][1]:,.0f} ms"
        seen.append(text + ")")
    shares = [s for f in rounds for s in (f.generator_cpu, f.generator_cpu_max) if s is not None]
    return replace(
        first,
        rate=statistics.median(f.rate for f in rounds),
        p50_ms=_median([f.p50_ms for f in rounds]),
        p99_ms=_median([f.p99_ms for f in rounds]),
        max_ms=_median([f.max_ms for f in rounds]),
        generator_cpu=_median([f.generator_cpu for f in rounds]),
        generator_wait=_median([f.generator_wait for f in rounds]),
        server_cpu=_median([f.server_cpu for f in rounds]),
        ratio=_median([f.ratio for f in rounds]),
        wall_s=_median([f.wall_s for f in rounds]),
        granted=_sum([f.granted for f in rounds]),
        store_granted=_sum([f.store_granted for f in rounds]),
        errors=sum(f.errors for f in rounds) + len(miscounted),
        invalid_rounds=sum(f.invalid_rounds for f in rounds),
        notes=(*seen, *notes),
        rounds=len(rounds),
        spread=spread,
        generator_cpu_max=max(shares) if shares else None,
        generator_us=_median([f.generator_us_per_op for f in rounds]),
        server_us=_median([f.server_us_per_op for f in rounds]),
    )
