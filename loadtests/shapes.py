"""Arrival-rate shapes: pure functions ``rate(t)`` (arrivals per second, ``t`` seconds from
the start of the drill) with exact integrals and their exact inverse.

A shape is a run of segments — constant, linear or exponentially decaying rate — plus
impulses (a number of arrivals at one instant: the T0 rendezvous, where buyers who sat on
the page all fire at once). Because every segment integrates in closed form, the number of
arrivals expected in any window is exact, and the arrival scheduler can place the n-th
arrival by inverting the integral instead of ticking once a second like Locust does.

An *arrival* is one visit starting: a browser loading the product page, a buyer placing an
order (and maybe paying later), a bot's burst. ``--peak-rps`` is the peak arrival rate.

The shapes (``SHAPES``), each scaled by a peak rate and a time scale (``time_scale=2``
makes every phase twice as long):

- ``midnight_surge``: the opening, after the published 2012 Double 11 figures (SURGE.md):
  a countdown in which clients refresh the product page, a rendezvous at T0, a plateau at
  peak standing for the opening minute ("10 million users in the first minute"), then the
  first wave compressed into ``wave_s`` with levels proportional to the 2012 average sales
  rates per stretch (minutes 0-10: 25 M RMB/min, 10-37: ~28 M/min, 37-137: ~17.5 M/min)
  and a decay to ~02:30 when the wave was over. How high the wave sits against the
  opening peak (``wave_level``) is a modelling choice, not a published figure.
- ``double11_day``: the day's five windows carrying 25/20/20/20/15 % of the arrivals (a
  seller's planning guide, unverified as a platform-wide curve), front-loaded after
  midnight and peaking at 10:00 and 21:00, compressed into ``day_s``.
- ``capacity_step``: stairs of rising rate, to find where the SLO breaks.
- ``soak``: a short ramp, then steady load.

Your own curve: ``rate_table`` (a table of ``(t, rate)`` points, linear between them or held
as steps, exact) or ``rate_function`` (any ``rate(t)``, sampled into linear pieces), either
with rendezvous impulses of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "SHAPES",
    "Impulse",
    "Segment",
    "Shape",
    "Window",
    "build_shape",
    "capacity_step",
    "double11_day",
    "midnight_surge",
    "rate_function",
    "rate_table",
    "soak",
]

SegmentKind = Literal["constant", "linear", "exp"]
#: How the personas mix in a window: before T0 only the product page makes sense; at the
#: rendezvous everyone who waited fires an order; after it the configured mix applies.
WindowKind = Literal["countdown", "rendezvous", "open", "idle"]


@dataclass(frozen=True)
class Segment:
    """Rate over ``[start, end)``: constant ``r0``; linear ``r0``→``r1``; or ``r0·exp(-x/tau)``."""

    start: float
    end: float
    kind: SegmentKind
    r0: float
    r1: float = 0.0
    tau: float = 1.0

    @property
    def length(self) -> float:
        return self.end - self.start

    def rate(self, t: float) -> float:
        """Arrivals per second at ``t`` (inside the segment)."""
        x = t - self.start
        if self.kind == "constant":
            return self.r0
        if self.kind == "linear":
            return self.r0 + (self.r1 - self.r0) * x / self.length
        return self.r0 * math.exp(-x / self.tau)

    def area(self, t: float) -> float:
        """Arrivals expected over ``[start, t]`` (``t`` clamped into the segment)."""
        x = min(max(t, self.start), self.end) - self.start
        if self.kind == "constant":
            return self.r0 * x
        if self.kind == "linear":
            return self.r0 * x + (self.r1 - self.r0) * x * x / (2.0 * self.length)
        return self.r0 * self.tau * (1.0 - math.exp(-x / self.tau))

    def time_at_area(self, a: float) -> float:
        """The instant in the segment at which ``area`` reaches ``a`` (0 <= a <= area(end))."""
        if a <= 0.0:
            return self.start
        if self.kind == "constant":
            x = a / self.r0
        elif self.kind == "linear":
            k = (self.r1 - self.r0) / self.length
            # The stable root of k/2·x² + r0·x − a = 0 (no cancellation when k is tiny).
            disc = max(self.r0 * self.r0 + 2.0 * k * a, 0.0)
            x = 2.0 * a / (self.r0 + math.sqrt(disc))
        else:
            frac = min(a / (self.r0 * self.tau), 1.0 - 1e-15)
            x = -self.tau * math.log1p(-frac)
        return min(self.start + x, self.end)


@dataclass(frozen=True)
class Impulse:
    """``count`` arrivals intended for the same instant ``at`` (a rendezvous)."""

    at: float
    count: float


@dataclass(frozen=True)
class Window:
    """A named stretch of the drill, ``[start, end)``; totals and verdicts are reported per window."""

    name: str
    start: float
    end: float
    kind: WindowKind = "open"


@dataclass(frozen=True)
class Shape:
    """A complete arrival curve. ``t0_s`` is when the sale opens (seconds from the start)."""

    name: str
    segments: tuple[Segment, ...]
    impulses: tuple[Impulse, ...] = ()
    windows: tuple[Window, ...] = ()
    t0_s: float = 0.0
    peak_rps: float = 0.0
    params: dict[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        prev_end = 0.0
        for seg in self.segments:
            if abs(seg.start - prev_end) > 1e-9 or seg.end <= seg.start:
                raise ValueError(f"shape {self.name}: segments must be contiguous from 0 and non-empty")
            if seg.r0 < 0 or seg.r1 < 0 or seg.tau <= 0:
                raise ValueError(f"shape {self.name}: rates must be >= 0 and tau > 0")
            prev_end = seg.end

    @property
    def duration_s(self) -> float:
        return self.segments[-1].end if self.segments else 0.0

    def rate(self, t: float) -> float:
        """Arrivals per second at ``t`` (impulses excluded: they are instants, see ``cumulative``)."""
        for seg in self.segments:
            if seg.start <= t < seg.end:
                return seg.rate(t)
        return 0.0

    def cumulative(self, t: float) -> float:
        """Exact number of arrivals expected in ``[0, t)``, impulses at instants before ``t`` included."""
        total = sum(seg.area(t) for seg in self.segments if seg.start < t)
        total += sum(imp.count for imp in self.impulses if imp.at < t)
        return total

    def expected(self, start: float, end: float) -> float:
        """Arrivals expected in ``[start, end)``."""
        return self.cumulative(end) - self.cumulative(start)

    @property
    def total(self) -> float:
        return self.cumulative(math.inf)

    def locate(self, a: float) -> tuple[float, bool]:
        """Inverse of the integral: the instant at which ``a`` arrivals have been intended.

        Returns ``(t, in_impulse)``; ``in_impulse`` marks arrivals that belong to a rendezvous.
        ``a`` beyond the total returns ``(inf, False)``.
        """
        return next(self.locate_each((a,)))

    def locate_each(self, areas: Iterable[float]) -> Iterator[tuple[float, bool]]:
        """``locate`` of each of ``areas``, which must not decrease: the pieces of the curve are
        walked once for all of them (an arrival plan locates every arrival of the drill), with
        the same arithmetic, so each answer is exactly ``locate``'s."""
        # An impulse comes before the segment starting at its instant.
        events: list[tuple[float, int, Segment | Impulse]] = [(s.start, 1, s) for s in self.segments]
        events += [(i.at, 0, i) for i in self.impulses]
        pieces = [
            (ev, ev.count if isinstance(ev, Impulse) else ev.area(ev.end))
            for _, _, ev in sorted(events, key=lambda e: (e[0], e[1]))
        ]
        index, acc, last = 0, 0.0, -math.inf
        for a in areas:
            if a < last:
                raise ValueError(f"locate_each: {a} after {last}: the areas must not decrease")
            last = a
            while index < len(pieces):
                piece, area = pieces[index]
                if isinstance(piece, Impulse):
                    if a < acc + area:
                        yield piece.at, True
                        break
                elif area > 0.0 and a < acc + area:
                    yield piece.time_at_area(a - acc), False
                    break
                acc += area
                index += 1
            else:
                yield math.inf, False

    def window_at(self, t: float) -> Window | None:
        """The named window ``t`` falls in, if any."""
        for w in self.windows:
            if w.start <= t < w.end:
                return w
        return None


def midnight_surge(
    peak_rps: float,
    time_scale: float = 1.0,
    *,
    countdown_s: float = 10.0,
    plateau_s: float = 15.0,
    wave_s: float = 50.0,
    rendezvous_s: float = 1.0,
    countdown_from: float = 0.05,
    countdown_to: float = 0.3,
    wave_level: float = 0.5,
) -> Shape:
    """The opening: countdown refreshes, a T0 rendezvous of ``rendezvous_s × peak`` arrivals,
    ``plateau_s`` at peak, then the 2012 first wave compressed into ``wave_s``.

    Defaults give ~75 s of arrivals at ``time_scale=1``.
    """
    if peak_rps <= 0 or time_scale <= 0:
        raise ValueError("peak_rps and time_scale must be > 0")
    p = peak_rps
    c, pl, w = countdown_s * time_scale, plateau_s * time_scale, wave_s * time_scale
    # The 2012 first wave by minute after 00:00, its stretches and their average sales rates
    # relative to minutes 10-37 (~28 M RMB/min): 0-10 → 25/28, 37-137 → 17.5/28; over by ~02:30.
    minutes = (1.0, 10.0, 37.0, 137.0, 150.0)
    levels = (25.0 / 28.0, 1.0, 17.5 / 28.0)

    def at(minute: float) -> float:
        return c + pl + w * (minute - minutes[0]) / (minutes[-1] - minutes[0])

    segments = [
        Segment(0.0, c, "linear", countdown_from * p, countdown_to * p),
        Segment(c, c + pl, "constant", p),
    ]
    for i, level in enumerate(levels):
        segments.append(Segment(at(minutes[i]), at(minutes[i + 1]), "constant", wave_level * level * p))
    last = wave_level * levels[-1] * p
    decay = at(minutes[-1]) - at(minutes[-2])
    # Falls to ~5 % of the last level by the end of the wave (three time constants).
    segments.append(Segment(at(minutes[-2]), at(minutes[-1]), "exp", last, tau=decay / 3.0))
    windows = (
        Window("countdown", 0.0, c, "countdown"),
        Window("opening", c, c + pl, "open"),
        Window("wave", c + pl, at(minutes[-1]), "open"),
    )
    return Shape(
        "midnight_surge",
        tuple(segments),
        impulses=(Impulse(c, rendezvous_s * p),),
        windows=windows,
        t0_s=c,
        peak_rps=p,
        params={"time_scale": time_scale, "countdown_s": c, "plateau_s": pl, "wave_s": w},
    )


#: double11_day's five windows: (name, start hour, end hour, share of the day, form).
DAY_WINDOWS: tuple[tuple[str, float, float, float, str], ...] = (
    ("00:00-01:30", 0.0, 1.5, 0.25, "front"),
    ("09:00-11:00", 9.0, 11.0, 0.20, "peak"),
    ("15:00-17:00", 15.0, 17.0, 0.20, "flat"),
    ("20:00-22:00", 20.0, 22.0, 0.20, "peak"),
    ("23:00-24:00", 23.0, 24.0, 0.15, "flat"),
)


def double11_day(peak_rps: float, time_scale: float = 1.0, *, day_s: float = 240.0) -> Shape:
    """The whole day compressed into ``day_s × time_scale`` seconds; nothing between windows.

    "front" decays from the opening (time constant a third of the window), "peak" rises to
    the middle of its window (10:00, 21:00) and falls back, "flat" is constant.
    """
    if peak_rps <= 0 or time_scale <= 0:
        raise ValueError("peak_rps and time_scale must be > 0")
    hour = day_s * time_scale / 24.0

    # First per unit of total arrivals, then scaled so the highest rate equals peak_rps.
    unit: list[Segment] = []
    windows: list[Window] = []
    t = 0.0
    for name, h0, h1, share, form in DAY_WINDOWS:
        s, e = h0 * hour, h1 * hour
        if s > t:
            unit.append(Segment(t, s, "constant", 0.0))
        length = e - s
        if form == "front":
            tau = length / 3.0
            unit.append(Segment(s, e, "exp", share / (tau * (1.0 - math.exp(-3.0))), tau=tau))
        elif form == "peak":
            top = 2.0 * share / length
            unit.append(Segment(s, s + length / 2, "linear", 0.0, top))
            unit.append(Segment(s + length / 2, e, "linear", top, 0.0))
        else:
            unit.append(Segment(s, e, "constant", share / length))
        windows.append(Window(name, s, e, "open"))
        t = e
    top_rate = max(max(seg.r0, seg.r1) for seg in unit)
    total = peak_rps / top_rate
    segments = tuple(Segment(s.start, s.end, s.kind, s.r0 * total, s.r1 * total, s.tau) for s in unit)
    return Shape(
        "double11_day",
        segments,
        windows=tuple(windows),
        peak_rps=peak_rps,
        params={"time_scale": time_scale, "day_s": day_s * time_scale, "total": total},
    )


def capacity_step(peak_rps: float, time_scale: float = 1.0, *, steps: int = 5, step_s: float = 20.0) -> Shape:
    """``steps`` stairs from ``peak/steps`` up to ``peak``, each ``step_s × time_scale`` long."""
    if peak_rps <= 0 or time_scale <= 0 or steps < 1:
        raise ValueError("peak_rps and time_scale must be > 0 and steps >= 1")
    length = step_s * time_scale
    segments = tuple(
        Segment(k * length, (k + 1) * length, "constant", peak_rps * (k + 1) / steps) for k in range(steps)
    )
    windows = tuple(
        Window(f"step-{k + 1}@{peak_rps * (k + 1) / steps:g}rps", k * length, (k + 1) * length, "open")
        for k in range(steps)
    )
    return Shape(
        "capacity_step",
        segments,
        windows=windows,
        peak_rps=peak_rps,
        params={"time_scale": time_scale, "steps": steps, "step_s": length},
    )


def soak(
    peak_rps: float, time_scale: float = 1.0, *, duration_s: float = 600.0, ramp_s: float = 10.0
) -> Shape:
    """A linear ramp over ``ramp_s``, then ``peak_rps`` until ``duration_s`` (both × time_scale)."""
    if peak_rps <= 0 or time_scale <= 0 or duration_s <= ramp_s:
        raise ValueError("peak_rps and time_scale must be > 0 and duration_s > ramp_s")
    r, d = ramp_s * time_scale, duration_s * time_scale
    segments = (Segment(0.0, r, "linear", 0.0, peak_rps), Segment(r, d, "constant", peak_rps))
    return Shape(
        "soak",
        segments,
        windows=(Window("ramp", 0.0, r), Window("steady", r, d)),
        peak_rps=peak_rps,
        params={"time_scale": time_scale, "duration_s": d},
    )


SHAPES: dict[str, Callable[..., Shape]] = {
    "midnight_surge": midnight_surge,
    "double11_day": double11_day,
    "capacity_step": capacity_step,
    "soak": soak,
}


def build_shape(name: str, peak_rps: float, time_scale: float = 1.0, **params: float) -> Shape:
    """A shape by name; unknown names raise with the list of known ones."""
    try:
        factory = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}") from None
    return factory(peak_rps, time_scale, **params)


def rate_table(
    points: Sequence[tuple[float, float]],
    *,
    name: str = "table",
    step: bool = False,
    impulses: Sequence[tuple[float, float]] = (),
    t0_s: float = 0.0,
    windows: Sequence[Window] = (),
) -> Shape:
    """A shape from ``(t, rate)`` points, ``t`` in seconds from the start (the first point at
    0, increasing): the rate changes linearly from one point to the next, or (``step``) holds
    each point's rate until the next. The last point ends the shape. ``impulses`` are
    ``(t, arrivals)`` fired at one instant (a rendezvous); ``t0_s`` marks the opening.
    """
    if len(points) < 2 or points[0][0] != 0:
        raise ValueError("a rate table needs at least two (t, rate) points, the first at t=0")
    segments = []
    for (t_a, r_a), (t_b, r_b) in zip(points, points[1:]):
        if t_b <= t_a:
            raise ValueError(f"rate table times must increase: {t_a} then {t_b}")
        if step or r_a == r_b:
            segments.append(Segment(float(t_a), float(t_b), "constant", float(r_a)))
        else:
            segments.append(Segment(float(t_a), float(t_b), "linear", float(r_a), float(r_b)))
    peak = max([r for _, r in points])
    return Shape(
        name,
        tuple(segments),
        impulses=tuple(Impulse(float(t), float(n)) for t, n in impulses),
        windows=tuple(windows) or (Window(name, 0.0, float(points[-1][0])),),
        t0_s=t0_s,
        peak_rps=peak,
        params={"points": float(len(points))},
    )


def rate_function(
    rate: Callable[[float], float],
    duration_s: float,
    *,
    name: str = "function",
    resolution_s: float = 0.25,
    impulses: Sequence[tuple[float, float]] = (),
    t0_s: float = 0.0,
    windows: Sequence[Window] = (),
) -> Shape:
    """A shape from any ``rate(t)`` (arrivals per second, ``t`` seconds from the start) over
    ``duration_s``: sampled every ``resolution_s`` and joined linearly, so its integral — and
    the arrivals — follow the function to that resolution."""
    if duration_s <= 0 or resolution_s <= 0:
        raise ValueError("duration_s and resolution_s must be > 0")
    n = max(1, math.ceil(duration_s / resolution_s))
    times = [min(k * resolution_s, duration_s) for k in range(n + 1)]
    points = [(t, max(float(rate(t)), 0.0)) for t in times]
    return rate_table(points, name=name, impulses=impulses, t0_s=t0_s, windows=windows)
