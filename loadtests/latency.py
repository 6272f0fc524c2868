"""Latency truth: HdrHistogram recording, shipping between Locust processes, merging, and
HdrHistogram log files.

Every request is recorded twice, in microseconds:

- **raw**: from the moment the request was handed to the HTTP client to the response;
- **corrected** for coordinated omission: from the instant the open-model schedule meant
  the request to be sent. A load generator that falls behind (slots all busy, greenlets
  starved) sends late, and raw latency quietly leaves that waiting out; corrected does not.

Histograms are kept per request name (``order``, ``pay``, ``browse`` …, plus ``all``) for
the whole run and per second of the run (by completion time), for the timeline, the report's
latency-over-time charts (all requests, and each kind) and the log files. Locust processes ship what they recorded since their last report as encoded
histograms; the collector adds them up. HdrHistogram addition is exact, so the merged
percentiles equal those of one histogram holding every sample.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader, HistogramLogWriter

__all__ = [
    "HIGHEST_US",
    "PERCENTILES",
    "LatencyBook",
    "decode",
    "encode",
    "mean_us",
    "merge",
    "percentiles_us",
    "new_histogram",
    "read_log",
    "summarize",
    "to_us",
    "write_log",
]

LOWEST_US = 1
#: Ten minutes: nothing a drill waits for takes longer; larger values are clamped (and counted).
HIGHEST_US = 600_000_000
SIGNIFICANT_FIGURES = 3
#: Per-second histograms only feed plots and logs: two digits keep a long soak in memory.
INTERVAL_SIGNIFICANT_FIGURES = 2
#: The summary's percentiles: k6's p(90)/p(95) beside HdrHistogram's usual p50/p99/p99.9.
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)
#: Seconds older than this (behind the newest recorded second) are kept compressed.
SEAL_AFTER_S = 30


def new_histogram(significant_figures: int = SIGNIFICANT_FIGURES) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, significant_figures)


def to_us(seconds: float) -> int:
    """Seconds to whole microseconds, clamped into the histogram's range."""
    return min(max(int(round(seconds * 1_000_000)), LOWEST_US), HIGHEST_US)


def encode(histogram: HdrHistogram) -> str:
    blob: bytes = histogram.encode()
    return blob.decode("ascii")


def decode(blob: str) -> HdrHistogram:
    return HdrHistogram.decode(blob.encode("ascii"))


def merge(histograms: Iterable[HdrHistogram], significant_figures: int = SIGNIFICANT_FIGURES) -> HdrHistogram:
    """One histogram holding every sample of ``histograms``."""
    total = new_histogram(significant_figures)
    for h in histograms:
        if h.get_total_count():
            total.add(h)
    return total


def percentiles_us(histogram: HdrHistogram, percentiles: Iterable[float]) -> dict[float, int]:
    """The value at each percentile, in µs: what ``get_value_at_percentile`` answers, in one
    pass over the counts rather than one each (the timeline asks a dozen per second of the run)."""
    if not histogram.get_total_count():
        return dict.fromkeys(percentiles, 0)
    cumulative = list(accumulate(histogram.counts[: histogram.counts_len]))
    out = {}
    for p in percentiles:
        index = bisect_left(cumulative, histogram.get_target_count_at_percentile(p))
        out[p] = histogram.get_highest_equivalent_value(histogram.get_value_from_index(index))
    return out


def mean_us(histogram: HdrHistogram) -> float:
    """The mean, in µs, as ``get_mean_value`` computes it (each bucket at its middle value),
    without its iterator: that one takes ~25 ms for a one-second histogram."""
    total = histogram.get_total_count()
    if not total:
        return 0.0
    weighted: int = 0
    for index, count in enumerate(histogram.counts[: histogram.counts_len]):
        if count:
            value = histogram.get_value_from_index(index)
            lowest = histogram.get_lowest_equivalent_value(value)
            middle = lowest + ((histogram.get_highest_equivalent_value(value) - lowest + 1) >> 1)
            weighted += count * middle
    return float(weighted) / int(total)


def summarize(histogram: HdrHistogram) -> dict[str, float | int]:
    """count, p50/p90/p95/p99/p99.9, max and mean, in milliseconds."""
    count = histogram.get_total_count()
    out: dict[str, float | int] = {"count": count}
    values = percentiles_us(histogram, PERCENTILES)
    for p in PERCENTILES:
        out[f"p{p:g}_ms"] = values[p] / 1000.0
    out["max_ms"] = histogram.get_max_value() / 1000.0 if count else 0.0
    out["mean_ms"] = round(mean_us(histogram) / 1000.0, 3)
    return out


def _bucket_index(significant_figures: int) -> Callable[[int], int]:
    """The counts index ``record_value`` finds for a value, for histograms of this module's
    range at this precision: the same arithmetic, without its method calls."""
    h = new_histogram(significant_figures)
    mask: int = h.sub_bucket_mask
    unit: int = h.unit_magnitude
    half_magnitude: int = h.sub_bucket_half_count_magnitude
    half: int = h.sub_bucket_half_count

    def index(value: int) -> int:
        bucket = (value | mask).bit_length() - unit - half_magnitude - 1
        return ((bucket + 1) << half_magnitude) + (value >> (bucket + unit)) - half

    return index


_RUN_INDEX = _bucket_index(SIGNIFICANT_FIGURES)
_SECOND_INDEX = _bucket_index(INTERVAL_SIGNIFICANT_FIGURES)


def _count(h: HdrHistogram, index: int, value: int) -> None:
    """``h.record_value(value)`` for a value in range whose index is known."""
    h.counts[index] += 1
    h.total_count += 1
    if value < h.min_value:
        h.min_value = value
    if value > h.max_value:
        h.max_value = value


#: Per request name, its whole-run keys (built once, not per request).
_KEYS: dict[str, tuple[str, str]] = {}


def _keys(name: str) -> tuple[str, str]:
    keys = _KEYS[name] = (f"{name}.raw", f"{name}.corrected")
    return keys


def _as_is(histogram: HdrHistogram) -> HdrHistogram:
    return histogram


def _clear(h: HdrHistogram) -> HdrHistogram:
    """``h.reset()`` in one memset (hdrh's loops over every count: ~20,000 at 3 digits)."""
    ctypes.memset(ctypes.addressof(h.counts), 0, ctypes.sizeof(h.counts))
    h.total_count, h.min_value, h.max_value = 0, sys.maxsize, 0
    h.start_time_stamp_msec, h.end_time_stamp_msec = sys.maxsize, 0
    return h


def _unpack(blob: str | HdrHistogram) -> HdrHistogram:
    return decode(blob) if isinstance(blob, str) else blob


def _add_total(into: dict[str, HdrHistogram], key: str, blob: str | HdrHistogram) -> None:
    """Add an export's whole-run histogram. A decoded one is adopted (nobody else has it); one
    handed over as it is stays its book's (``LatencyBook.export``): its counts are added."""
    h = into.get(key)
    if isinstance(blob, str):
        if h is None:
            into[key] = decode(blob)
        else:
            h.add(decode(blob))
        return
    if h is None:
        h = into[key] = HdrHistogram(LOWEST_US, HIGHEST_US, blob.significant_figures)
    h.add(blob)


@dataclass
class _Interval:
    raw: HdrHistogram
    corrected: HdrHistogram


def _new_interval() -> _Interval:
    return _Interval(new_histogram(INTERVAL_SIGNIFICANT_FIGURES), new_histogram(INTERVAL_SIGNIFICANT_FIGURES))


class LatencyBook:
    """Histograms of one process (recording) or of the whole run (collecting).

    ``record`` adds a request; ``export`` hands over everything recorded since the last
    export (and forgets it); ``absorb`` adds an export from any process. Each second holds
    one (raw, corrected) pair per request name and one for ``all``.
    """

    def __init__(self, start_epoch: float = 0.0) -> None:
        self.start_epoch = start_epoch
        self.totals: dict[str, HdrHistogram] = {}
        #: Whole-run histograms already exported, cleared for reuse when their key comes again:
        #: a 3-digit histogram costs ~0.3 ms to allocate, and a process exports every second.
        self._spare: dict[str, HdrHistogram] = {}
        self.intervals: dict[int, dict[str, _Interval]] = {}
        self._sealed: dict[int, dict[str, tuple[str, str]]] = {}
        self._p99: dict[int, tuple[int, tuple[float, float]]] = {}
        self.clamped = 0

    # -- recording -------------------------------------------------------------------
    def record(self, name: str, *, intended: float, sent: float, done: float) -> None:
        """One request: ``intended``/``sent``/``done`` are wall-clock epoch seconds.

        Eight histograms take each request (raw and corrected; the whole run and its second;
        its name and ``all``): each value's bucket is found once per precision and counted
        in all of them (``_count``), as ``record_value`` would count it in each."""
        raw_s, corrected_s = done - sent, done - min(intended, sent)
        raw, corrected = to_us(raw_s), to_us(corrected_s)
        self.clamped += (raw_s * 1e6 > HIGHEST_US) + (corrected_s * 1e6 > HIGHEST_US)
        totals = self.totals
        keys = _KEYS.get(name) or _keys(name)
        raw_at, corrected_at = _RUN_INDEX(raw), _RUN_INDEX(corrected)
        for key, value, at in (
            (keys[0], raw, raw_at),
            (keys[1], corrected, corrected_at),
            ("all.raw", raw, raw_at),
            ("all.corrected", corrected, corrected_at),
        ):
            h = totals.get(key) or self._total(key)
            _count(h, at, value)
        second = self.intervals.get(int(done - self.start_epoch))
        if second is None:
            second = self.intervals[int(done - self.start_epoch)] = {}
        raw_at, corrected_at = _SECOND_INDEX(raw), _SECOND_INDEX(corrected)
        for key in (name, "all") if name != "all" else ("all",):
            interval = second.get(key)
            if interval is None:
                interval = second[key] = _new_interval()
            _count(interval.raw, raw_at, raw)
            _count(interval.corrected, corrected_at, corrected)

    def record_value(self, key: str, seconds: float) -> None:
        """A value that is not a request latency (e.g. the dispatcher's own lateness)."""
        value = to_us(seconds)
        _count(self._total(key), _RUN_INDEX(value), value)

    def _total(self, key: str) -> HdrHistogram:
        h = self.totals.get(key)
        if h is None:
            spare = self._spare.pop(key, None)
            h = self.totals[key] = new_histogram() if spare is None else _clear(spare)
        return h

    # -- shipping between processes ------------------------------------------------------
    def export(self, *, encoded: bool = True) -> dict[str, Any]:
        """Everything recorded since the last export; the book starts afresh. Encoded for
        another process (a message); ``encoded=False`` hands the histograms themselves to a
        collector in this process (a local run), which saves encoding and decoding them. The
        whole-run ones (``totals``) stay this book's and are cleared for reuse once it records
        again: ``absorb`` them before that (the per-second ones are the collector's to keep)."""
        pack = encode if encoded else _as_is
        payload = {
            "totals": {k: pack(h) for k, h in self.totals.items() if h.get_total_count()},
            "intervals": {
                str(s): {name: [pack(i.raw), pack(i.corrected)] for name, i in by_name.items()}
                for s, by_name in self.intervals.items()
            },
            "clamped": self.clamped,
        }
        self._spare, self.totals = self.totals, {}
        self.intervals, self.clamped = {}, 0
        return payload

    def absorb(self, payload: Mapping[str, Any]) -> None:
        """Add an export (encoded or not) to this book."""
        for key, blob in payload.get("totals", {}).items():
            _add_total(self.totals, key, blob)
        for sec, by_name in payload.get("intervals", {}).items():
            second = self._second_for_update(int(sec))
            for name, (raw_blob, corr_blob) in by_name.items():
                interval = second.get(name)
                if interval is None:  # adopted as they come: nothing to add them to
                    second[name] = _Interval(_unpack(raw_blob), _unpack(corr_blob))
                else:
                    interval.raw.add(_unpack(raw_blob))
                    interval.corrected.add(_unpack(corr_blob))
        self.clamped += int(payload.get("clamped", 0))
        self._seal_old()

    def _second_for_update(self, second: int) -> dict[str, _Interval]:
        by_name = self.intervals.get(second)
        if by_name is not None:
            return by_name
        by_name = self.intervals[second] = {}
        for name, (raw_blob, corr_blob) in self._sealed.pop(second, {}).items():
            # A late report for an old second: reopen it.
            by_name[name] = _Interval(decode(raw_blob), decode(corr_blob))
        return by_name

    def _seal_old(self) -> None:
        if not self.intervals:
            return
        newest = max(self.intervals)
        for second in [s for s in self.intervals if s < newest - SEAL_AFTER_S]:
            by_name = self.intervals.pop(second)
            self._sealed[second] = {n: (encode(i.raw), encode(i.corrected)) for n, i in by_name.items()}

    # -- reading ----------------------------------------------------------------------------
    def total(self, key: str) -> HdrHistogram:
        """A whole-run histogram (``all.raw``, ``order.corrected`` …); empty if never recorded."""
        return self.totals.get(key) or new_histogram()

    def names(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.totals if k.endswith(".raw")})

    def seconds(self) -> list[int]:
        return sorted(set(self.intervals) | set(self._sealed))

    def p99_by_second(self, first: int, last: int) -> list[tuple[int, float, float]]:
        """(second, raw p99 ms, corrected p99 ms) of each second from ``first`` to ``last``
        in which a request completed: the live progress line shows the worst of them since
        its last line, so a one-second spike never falls between two lines."""
        out = []
        for second in range(first, last + 1):
            p99 = self.p99(second)
            if p99 is not None:
                out.append((second, *p99))
        return out

    def p99(self, second: int) -> tuple[float, float] | None:
        """(raw, corrected) p99 in ms of every request that completed in ``second``; None if
        none did. Kept until the second changes: the live line asks for the last ten seconds
        every second, and a second changes only while its requests are still being shipped."""
        live = self.intervals.get(second, {}).get("all")
        count = live.raw.get_total_count() if live is not None else None
        cached = self._p99.get(second)
        if cached is not None and (count is None or cached[0] == count):
            return cached[1]
        raw, corrected = self.interval(second)
        if not raw.get_total_count():
            return None
        p99 = (
            percentiles_us(raw, (99.0,))[99.0] / 1000,
            percentiles_us(corrected, (99.0,))[99.0] / 1000,
        )
        self._p99[second] = (raw.get_total_count(), p99)
        return p99

    def interval(self, second: int, name: str = "all") -> tuple[HdrHistogram, HdrHistogram]:
        """(raw, corrected) of one second of the run, of every request or of one request
        name; empty histograms if nothing completed then."""
        if second in self.intervals and name in self.intervals[second]:
            i = self.intervals[second][name]
            return i.raw, i.corrected
        if second in self._sealed and name in self._sealed[second]:
            raw_blob, corr_blob = self._sealed[second][name]
            return decode(raw_blob), decode(corr_blob)
        return new_histogram(INTERVAL_SIGNIFICANT_FIGURES), new_histogram(INTERVAL_SIGNIFICANT_FIGURES)


def write_log(path: str | os.PathLike[str], book: LatencyBook, which: str, *, comment: str = "") -> None:
    """An HdrHistogram interval log (format 1.2, one line per second, values in µs, max in ms).

    ``which`` is ``"raw"`` or ``"corrected"``. Readable by HdrHistogram's log tools
    (HistogramLogProcessor, the online plotter) and by ``read_log``.
    """
    if which not in ("raw", "corrected"):
        raise ValueError("which must be 'raw' or 'corrected'")
    buf = io.StringIO()
    writer = HistogramLogWriter(buf)
    if comment:
        writer.output_comment(comment)
    writer.output_comment(f"flashsale latency, {which}, microseconds; timestamps are seconds since StartTime")
    writer.output_log_format_version()
    # hdrh's output_start_time is broken in 0.10 (calls a non-existent iso_format): write it here.
    buf.write(f"#[StartTime: {book.start_epoch:.3f} (seconds since epoch)]\n")
    writer.output_base_time(int(book.start_epoch * 1000))
    writer.output_legend()
    for second in book.seconds():
        raw, corrected = book.interval(second)
        h = raw if which == "raw" else corrected
        if not h.get_total_count():
            continue
        # hdrh treats a 0 timestamp as "use the histogram's own": stamp it, in ms.
        h.set_start_time_stamp(second * 1000)
        h.set_end_time_stamp((second + 1) * 1000)
        writer.output_interval_histogram(h, max_value_unit_ratio=1000.0)
    with open(path, "w", encoding="ascii") as f:
        f.write(buf.getvalue())


def read_log(path: str | os.PathLike[str]) -> HdrHistogram:
    """All interval histograms of a log added up (as written by ``write_log``)."""
    reference = new_histogram(INTERVAL_SIGNIFICANT_FIGURES)
    reader = HistogramLogReader(str(path), reference)
    total = new_histogram(INTERVAL_SIGNIFICANT_FIGURES)
    try:
        while True:
            h = reader.get_next_interval_histogram()
            if h is None:
                break
            total.add(h)
    finally:
        reader.close()
    return total
