"""HdrHistogram recording: merging across processes is exact; logs round-trip; corrected
latency is measured from the intended send time."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from loadtests.latency import (
    HIGHEST_US,
    PERCENTILES,
    LatencyBook,
    new_histogram,
    read_log,
    summarize,
    to_us,
    write_log,
)


def _samples(n: int, seed: int = 1) -> list[tuple[float, float, float]]:
    """(intended, sent, done) triples over ~60 s with a long tail, like a surge."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        intended = 1000.0 + i * 60.0 / n
        sent = intended + (rng.expovariate(1 / 0.05) if rng.random() < 0.05 else rng.uniform(0, 0.002))
        done = sent + rng.lognormvariate(-5, 1.2)
        out.append((intended, sent, done))
    return out


def test_merging_process_histograms_equals_one_histogram_of_all_samples() -> None:
    samples = _samples(40_000)
    # Four "Locust processes" each record a share and ship it (encoded, as over the wire) in
    # several reports; the collector adds them up.
    processes = [LatencyBook(1000.0) for _ in range(4)]
    collector = LatencyBook(1000.0)
    for i, (intended, sent, done) in enumerate(samples):
        processes[i % 4].record("order", intended=intended, sent=sent, done=done)
        if i % 7_000 == 0:
            for p in processes:
                collector.absorb(json.loads(json.dumps(p.export())))
        elif i % 5_000 == 0:  # a local run hands its histograms over unencoded
            for p in processes:
                collector.absorb(p.export(encoded=False))
    for p in processes:
        collector.absorb(p.export(encoded=False))

    raw_all, corrected_all = new_histogram(), new_histogram()
    for intended, sent, done in samples:
        raw_all.record_value(to_us(done - sent))
        corrected_all.record_value(to_us(done - intended))
    for key, reference in (("order.raw", raw_all), ("order.corrected", corrected_all), ("all.raw", raw_all)):
        merged = collector.total(key)
        assert merged.get_total_count() == reference.get_total_count() == 40_000
        for p in (*PERCENTILES, 99.99, 100.0):
            assert merged.get_value_at_percentile(p) == reference.get_value_at_percentile(p), (key, p)
        assert merged.get_max_value() == reference.get_max_value()
        assert merged.get_min_value() == reference.get_min_value()
    # Per-second intervals add up to the whole run too.
    assert sum(collector.interval(s)[0].get_total_count() for s in collector.seconds()) == 40_000


def test_a_request_counts_in_every_histogram_exactly_as_record_value_would() -> None:
    # The book finds each value's bucket once and counts it in all its histograms: the
    # counts, min, max and total must be what HdrHistogram's own record_value makes of it,
    # over the whole range (clamped ends included) and both precisions.
    rng = random.Random(7)
    values_us = [1, 2, 3, 1023, 1024, 2047, 2048, 4095, 4096, 99_999, HIGHEST_US - 1, HIGHEST_US]
    values_us += [int(rng.lognormvariate(8, 3)) + 1 for _ in range(5_000)]
    book = LatencyBook(0.0)
    reference: dict[str, HdrHistogram] = {}
    for i, value in enumerate(values_us):
        done = 5.0 + i * 0.001
        value = min(value, HIGHEST_US)
        book.record("order", intended=done - value / 1e6 - 0.5, sent=done - value / 1e6, done=done)
        raw, corrected = to_us(value / 1e6), to_us(value / 1e6 + 0.5)
        second = int(done)
        for key, v, figures in (
            ("order.raw", raw, 3),
            ("order.corrected", corrected, 3),
            ("all.raw", raw, 3),
            ("all.corrected", corrected, 3),
            (f"{second}.raw", raw, 2),
            (f"{second}.corrected", corrected, 2),
        ):
            reference.setdefault(key, new_histogram(figures)).record_value(v)
    seconds = {int(5.0 + i * 0.001) for i in range(len(values_us))}
    books = {key: book.total(key) for key in ("order.raw", "order.corrected", "all.raw", "all.corrected")}
    for s in seconds:
        for name in ("order", "all"):
            raw_h, corrected_h = book.interval(s, name)
            books[f"{s}.raw"], books[f"{s}.corrected"] = raw_h, corrected_h
            assert list(raw_h.counts) == list(reference[f"{s}.raw"].counts)
    for key, expected in reference.items():
        got = books[key]
        assert list(got.counts) == list(expected.counts), key
        assert (got.get_total_count(), got.min_value, got.max_value) == (
            expected.get_total_count(),
            expected.min_value,
            expected.max_value,
        ), key
        assert got.encode() == expected.encode(), key


def test_a_seconds_p99_follows_late_reports() -> None:
    # The live line's p99 of a second is kept between asks, but a report that adds to that
    # second (a process ships late) must change it: it is always the second's p99 as it stands.
    collector, early, late = LatencyBook(0.0), LatencyBook(0.0), LatencyBook(0.0)
    for i in range(200):
        early.record("order", intended=5.0, sent=5.0, done=5.0 + 0.001 + i * 0.0001)
        late.record("order", intended=5.0, sent=5.0, done=5.5 + i * 0.002)
    collector.absorb(early.export())

    def expected() -> tuple[float, float]:
        raw, corrected = collector.interval(5)
        return raw.get_value_at_percentile(99) / 1000, corrected.get_value_at_percentile(99) / 1000

    first = collector.p99(5)
    assert first == expected() and collector.p99_by_second(4, 6) == [(5, *first)]
    collector.absorb(late.export())
    assert collector.p99(5) == expected() != first
    assert collector.p99(4) is None


def test_old_seconds_are_sealed_and_still_readable_and_reopenable() -> None:
    collector, p = LatencyBook(0.0), LatencyBook(0.0)
    for s in range(100):
        p.record("browse", intended=s + 0.1, sent=s + 0.1, done=s + 0.2)
    collector.absorb(p.export())
    assert len(collector.intervals) < 100  # the old ones are kept compressed
    assert all(collector.interval(s)[0].get_total_count() == 1 for s in range(100))
    p.record("browse", intended=3.1, sent=3.1, done=3.5)  # a late report for second 3
    collector.absorb(p.export())
    assert collector.interval(3)[0].get_total_count() == 2


def test_corrected_latency_starts_at_the_intended_send_time() -> None:
    book = LatencyBook(0.0)
    book.record("order", intended=10.0, sent=10.8, done=11.0)
    assert summarize(book.total("order.raw"))["max_ms"] == pytest.approx(200, rel=1e-3)
    assert summarize(book.total("order.corrected"))["max_ms"] == pytest.approx(1000, rel=1e-3)


def test_values_beyond_the_range_are_clamped_and_counted() -> None:
    book = LatencyBook(0.0)
    book.record("order", intended=0.0, sent=0.0, done=HIGHEST_US / 1e6 + 50)
    assert book.clamped == 2
    assert book.total("order.raw").get_max_value() >= HIGHEST_US * 0.999


def test_log_files_round_trip(tmp_path: Path) -> None:
    book = LatencyBook(1_700_000_000.0)
    for intended, sent, done in _samples(5_000):
        book.record(
            "order", intended=intended + 1_699_999_000, sent=sent + 1_699_999_000, done=done + 1_699_999_000
        )
    for which in ("raw", "corrected"):
        path = tmp_path / f"{which}.hlog"
        write_log(path, book, which)
        text = path.read_text()
        assert "#[StartTime: 1700000000.000" in text and "Histogram log format version 1.2" in text
        back = read_log(path)
        assert back.get_total_count() == 5_000
        ref = book.total(f"order.{which}")
        # Interval histograms keep two significant digits: within 1 % of the run's own.
        assert back.get_value_at_percentile(99) == pytest.approx(ref.get_value_at_percentile(99), rel=0.01)


def test_a_process_book_reuses_its_whole_run_histograms_after_each_export() -> None:
    # A Locust process exports every second; allocating its 3-digit histograms afresh each
    # time cost ~0.3 ms apiece. The book clears and reuses them: nothing of the last second
    # may leak into the next (counts, min, max), and a collector that was handed them as they
    # are (a local run) keeps what they held.
    book, collector = LatencyBook(1000.0), LatencyBook(1000.0)
    book.record("order", intended=1000.0, sent=1000.0, done=1000.9)
    first = book.totals["order.raw"]
    collector.absorb(book.export(encoded=False))
    book.record("order", intended=1001.0, sent=1001.0, done=1001.002)
    assert book.totals["order.raw"] is first  # reused, not allocated again
    assert first.get_total_count() == 1
    assert first.get_min_value() == first.get_max_value() == pytest.approx(2_000, rel=1e-3)
    collector.absorb(book.export(encoded=False))
    merged = collector.total("order.raw")
    assert merged.get_total_count() == 2
    assert merged.get_min_value() == pytest.approx(2_000, rel=1e-3)
    assert merged.get_max_value() == pytest.approx(900_000, rel=1e-3)
