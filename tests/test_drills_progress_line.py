"""The live progress line of ``flashsale rehearse`` shows the worst second since its last
line: a drill's T0 second had a p99 of 432 ms while the lines read 16 and 19 ms, because
each line showed one second and lines come every 5 s (a file or pipe) or are redrawn in
place (a terminal). ``progress.json`` (written by loadtests) carries the p99 of each of the
last ten whole seconds; ``ProgressLine`` keeps the worst of the seconds a line covers."""

from __future__ import annotations

from typing import Any

import pytest

from flashsale.drills.rehearse import ProgressLine, format_progress
from loadtests.latency import LatencyBook

SPIKE = {0: (432.0, 440.0)}  # the T0 second: the rendezvous


def _p99(second: int) -> tuple[float, float]:
    return SPIKE.get(second, (16.0 + second % 4, 19.0 + second % 4))


def progress_at(now: int, spike: dict[int, tuple[float, float]] | None = None) -> dict[str, Any]:
    """progress.json as loadtests writes it ``now`` seconds after T0: the numbers of the
    whole second two seconds back, and the p99 of each of the ten seconds up to it."""
    seconds = spike or {}
    last = now - 2

    def p99(second: int) -> tuple[float, float]:
        return seconds.get(second, _p99(second))

    return {
        "phase": "surge",
        "t_from_t0_s": float(now),
        "sent_per_s": 100,
        "target_per_s": 100.0,
        "dropped_per_s": 0,
        "orders_per_s": 40,
        "p99_ms": p99(last)[0],
        "p99_corrected_ms": p99(last)[1],
        "p99_by_second": [
            {"t_from_t0_s": float(s), "p99_ms": p99(s)[0], "p99_corrected_ms": p99(s)[1]}
            for s in range(last - 9, last + 1)
        ],
        "hot_available": 120,
        "backlog": 3,
    }


def test_a_line_every_five_seconds_shows_the_spike_between_them() -> None:
    line = ProgressLine()
    printed = []
    for now in range(-3, 13):  # progress.json read once a second; a line every 5th read
        p = progress_at(now, SPIKE)
        line.observe(p)
        if now % 5 == 0:
            printed.append(line.render(p))
    # The line at T0+5 covers T0 (its own second reads 19 ms): the spike and its second.
    assert progress_at(5, SPIKE)["p99_ms"] < 30
    assert "p99 432ms@T0+0s (corr 440ms)" in printed[1], printed
    # Not repeated: the next line covers the seconds since.
    assert "432ms" not in printed[2] and "@T0+" in printed[2], printed


def test_a_terminal_redrawn_every_second_keeps_the_spike_a_few_seconds() -> None:
    line = ProgressLine(hold_s=5)
    shown = {}
    for now in range(-3, 12):
        p = progress_at(now, SPIKE)
        line.observe(p)
        shown[now] = line.render(p)
    with_spike = [now for now, text in shown.items() if "432ms@T0+0s" in text]
    assert with_spike == [2, 3, 4, 5, 6], shown  # from its first report, for five redraws


def test_a_late_report_that_makes_a_shown_second_worse_is_shown_again() -> None:
    line = ProgressLine()
    early = progress_at(3, {0: (100.0, 110.0)})  # one process had not reported T0 yet
    line.observe(early)
    assert "100ms@T0+0s" in line.render(early)
    later = progress_at(4, SPIKE)
    line.observe(later)
    assert "432ms@T0+0s" in line.render(later)


def test_without_the_seconds_the_line_reads_as_before() -> None:
    p = progress_at(5)
    del p["p99_by_second"]
    line = ProgressLine()
    line.observe(p)
    assert line.render(p) == format_progress(p)
    assert "p99 19ms (corr 22ms)" in format_progress(p)


def test_the_latency_book_gives_each_seconds_p99() -> None:
    book = LatencyBook(start_epoch=1000.0)
    book.record("order", intended=1000.05, sent=1000.1, done=1000.532)  # second 0: 432 ms raw
    for k in range(20):
        at = 1001.1 + k * 0.04
        book.record("order", intended=at, sent=at, done=at + 0.016)  # second 1: 16 ms
    got = book.p99_by_second(-1, 3)
    assert [s for s, _raw, _corr in got] == [0, 1]  # seconds without a request are left out
    (_, raw0, corr0), (_, raw1, _corr1) = got
    assert raw0 == pytest.approx(432, rel=0.02) and corr0 == pytest.approx(482, rel=0.02)
    assert raw1 == pytest.approx(16, rel=0.05)
