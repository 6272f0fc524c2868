"""Shapes are exact: their integrals, their inverse, and the arrivals scheduled from them."""

from __future__ import annotations

import math
import random

import pytest

from loadtests.arrivals import ArrivalPlan
from loadtests.shapes import SHAPES, Impulse, Segment, Shape, build_shape, double11_day, midnight_surge


def _count_in(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_windows_partition_the_total(name: str) -> None:
    shape = build_shape(name, 150.0)
    assert shape.windows[0].start == 0.0
    assert math.isclose(sum(shape.expected(w.start, w.end) for w in shape.windows), shape.total, rel_tol=1e-9)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_peak_rate_is_the_requested_peak(name: str) -> None:
    shape = build_shape(name, 150.0)
    grid = [i * shape.duration_s / 20000 for i in range(20000)]
    assert max(shape.rate(t) for t in grid) == pytest.approx(150.0, rel=1e-3)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_integral_matches_numeric_integration(name: str) -> None:
    shape = build_shape(name, 100.0)
    steps = 200_000
    dt = shape.duration_s / steps
    numeric = sum(shape.rate((i + 0.5) * dt) for i in range(steps)) * dt
    impulses = sum(i.count for i in shape.impulses)
    assert shape.total == pytest.approx(numeric + impulses, rel=1e-4)


def test_double11_day_windows_carry_the_published_shares() -> None:
    shape = double11_day(300.0)
    shares = [shape.expected(w.start, w.end) / shape.total for w in shape.windows]
    assert shares == pytest.approx([0.25, 0.20, 0.20, 0.20, 0.15], abs=1e-12)
    # Peaks at 10:00 and 21:00 inside their windows, nothing between windows.
    hour = shape.duration_s / 24
    assert shape.rate(10 * hour - 1e-6) > shape.rate(9.5 * hour) > shape.rate(9 * hour + 1e-6)
    assert shape.rate(21 * hour - 1e-6) > shape.rate(20.5 * hour)
    assert shape.rate(5 * hour) == 0.0


def test_midnight_surge_follows_the_2012_first_wave() -> None:
    shape = midnight_surge(200.0)
    t0 = shape.t0_s
    assert shape.expected(t0, t0 + 1e-9) == pytest.approx(200.0)  # the rendezvous: one second of peak at T0
    assert shape.rate(t0 + 1) == 200.0  # the opening plateau
    wave = next(w for w in shape.windows if w.name == "wave")
    span = wave.end - wave.start
    at = lambda minute: wave.start + span * (minute - 1) / 149  # noqa: E731 - the shape's own mapping
    # Minutes 10-37 vs 37-137: ~28 vs ~17.5 M RMB/min; 0-10 vs 10-37: 25 vs 28.
    assert shape.rate(at(20)) / shape.rate(at(80)) == pytest.approx(28 / 17.5)
    assert shape.rate(at(5)) / shape.rate(at(20)) == pytest.approx(25 / 28)
    assert shape.rate(wave.end - 1e-9) < 0.06 * shape.rate(at(80))  # the wave is over by ~02:30
    # The countdown is a rising herd of refreshes.
    assert shape.rate(0.0) < shape.rate(t0 - 1e-6) < 200.0


def test_time_scale_stretches_phases_and_totals() -> None:
    one, two = midnight_surge(100.0, 1.0), midnight_surge(100.0, 2.0)
    assert two.duration_s == pytest.approx(2 * one.duration_s)
    impulses = sum(i.count for i in one.impulses)
    assert two.total - impulses == pytest.approx(2 * (one.total - impulses))


def test_locate_inverts_the_integral() -> None:
    rng = random.Random(7)
    for name in SHAPES:
        shape = build_shape(name, 80.0)
        for _ in range(200):
            a = rng.uniform(0, shape.total)
            t, in_impulse = shape.locate(a)
            if in_impulse:
                assert shape.cumulative(t) <= a <= shape.cumulative(t + 1e-9)
            else:
                assert shape.cumulative(t) == pytest.approx(a, rel=1e-7, abs=1e-6)


def test_segments_must_be_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        Shape("gap", (Segment(0, 1, "constant", 1), Segment(2, 3, "constant", 1)))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_scheduled_arrivals_integrate_to_the_window_totals(name: str) -> None:
    shape = build_shape(name, 60.0, 0.5)
    times = [a.offset for a in ArrivalPlan(shape, start_epoch=1000.0)]
    assert abs(len(times) - shape.total) <= 1
    for w in shape.windows:
        assert abs(_count_in(times, w.start, w.end) - shape.expected(w.start, w.end)) <= 1, w.name
    # And per second, which is what the timeline compares.
    for s in range(int(shape.duration_s)):
        assert abs(_count_in(times, s, s + 1) - shape.expected(s, s + 1)) <= 1


def test_shares_of_n_processes_add_up_to_the_one_process_schedule() -> None:
    shape = midnight_surge(90.0, 0.3)
    whole = [(a.seq, a.intended) for a in ArrivalPlan(shape, start_epoch=5000.0)]
    parts = [list(ArrivalPlan(shape, start_epoch=5000.0, share_index=k, share_count=3)) for k in range(3)]
    union = sorted((a.seq, a.intended) for part in parts for a in part)
    assert union == whole
    for part in parts:
        assert abs(len(part) - shape.total / 3) <= 1
        rendezvous = [a for a in part if a.kind == "rendezvous"]
        assert abs(len(rendezvous) - sum(i.count for i in shape.impulses) / 3) <= 1
        assert {a.intended for a in rendezvous} == {5000.0 + shape.t0_s}


def test_rendezvous_arrivals_fire_at_t0_and_countdown_ones_before() -> None:
    shape = Shape(
        "tiny",
        (Segment(0, 1, "constant", 10), Segment(1, 2, "constant", 10)),
        impulses=(Impulse(1.0, 25),),
        t0_s=1.0,
    )
    arrivals = list(ArrivalPlan(shape, start_epoch=0.0))
    assert len(arrivals) == 45
    assert sum(1 for a in arrivals if a.kind == "rendezvous" and a.offset == 1.0) == 25


def test_poisson_arrivals_have_the_expected_total() -> None:
    shape = build_shape("soak", 200.0, 0.1)  # ~11,900 arrivals
    n = sum(1 for _ in ArrivalPlan(shape, 0.0, process="poisson", seed=3))
    assert abs(n - shape.total) < 5 * math.sqrt(shape.total)
    shared = sum(sum(1 for _ in ArrivalPlan(shape, 0.0, k, 2, "poisson", 3)) for k in range(2))
    assert abs(shared - shape.total) < 5 * math.sqrt(shape.total)


def test_a_rate_table_is_exact_linear_or_stepped() -> None:
    from loadtests import Window, rate_table

    linear = rate_table([(0, 0), (10, 100), (30, 20)], impulses=[(10, 50)], t0_s=10)
    assert linear.total == pytest.approx(500 + 1200 + 50)
    assert linear.rate(5) == pytest.approx(50) and linear.rate(20) == pytest.approx(60)
    assert linear.expected(0, 10) == pytest.approx(500) and linear.expected(10, 10.001) >= 50
    assert linear.peak_rps == 100 and linear.duration_s == 30
    stepped = rate_table([(0, 4), (2, 10), (5, 0)], step=True, windows=[Window("a", 0, 2, "countdown")])
    assert stepped.total == pytest.approx(8 + 30) and stepped.rate(4.9) == 10
    assert stepped.window_at(1).kind == "countdown"  # type: ignore[union-attr]
    # Arrivals land where the integral says, n + 1/2 at a time.
    times = [a.offset for a in ArrivalPlan(stepped, 0.0)]
    assert len(times) == 38 and times[0] == pytest.approx(0.125) and times[-1] == pytest.approx(2 + 29.5 / 10)
    with pytest.raises(ValueError, match="increase"):
        rate_table([(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="two"):
        rate_table([(1, 1), (2, 2)])


def test_a_rate_function_is_followed_to_its_resolution() -> None:
    import math

    from loadtests import rate_function

    shape = rate_function(lambda t: 50 + 50 * math.sin(t), 2 * math.pi, resolution_s=0.05)
    assert shape.total == pytest.approx(100 * math.pi, rel=1e-3)
    assert shape.rate(math.pi / 2) == pytest.approx(100, rel=1e-3)
    assert rate_function(lambda t: -5, 1.0).total == 0  # a negative rate is no arrivals


def _locate_afresh(shape: Shape, a: float) -> tuple[float, bool]:
    """The inverse as ``locate`` once computed it: a fresh walk over the pieces for every ``a``."""
    acc = 0.0
    events: list[tuple[float, int, Segment | Impulse]] = [(s.start, 1, s) for s in shape.segments]
    events += [(i.at, 0, i) for i in shape.impulses]
    for _, _, ev in sorted(events, key=lambda e: (e[0], e[1])):
        if isinstance(ev, Impulse):
            if a < acc + ev.count:
                return ev.at, True
            acc += ev.count
            continue
        seg_area = ev.area(ev.end)
        if seg_area > 0.0 and a < acc + seg_area:
            return ev.time_at_area(a - acc), False
        acc += seg_area
    return math.inf, False


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_locating_a_plan_at_once_is_locating_each_arrival_afresh(name: str) -> None:
    # An arrival plan walks the curve once (locate_each); every instant must be the one a fresh
    # search gives, to the bit, rendezvous flags included, through the end of the curve.
    shape = build_shape(name, 137.0, 0.3)
    rng = random.Random(11)
    areas = sorted(
        [i + 0.5 for i in range(int(shape.total) + 3)] + [rng.uniform(0, shape.total) for _ in range(500)]
    )
    assert list(shape.locate_each(areas)) == [_locate_afresh(shape, a) for a in areas]
    assert [shape.locate(a) for a in areas[::7]] == [_locate_afresh(shape, a) for a in areas[::7]]
    with pytest.raises(ValueError, match="must not decrease"):
        list(shape.locate_each([5.0, 4.0]))
