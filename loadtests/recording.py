"""What each Locust process records during a run, and how the collector merges it.

A ``ProcessRecorder`` lives in every process that sends load. Per second of the run it
counts arrivals (intended, started, dropped — by intended second), request outcomes (by
completion second) and its own CPU use; it records latency into a ``LatencyBook`` and
appends every operation to its history (``loadtests.history``: JSON lines, one file per
process). ``export()`` hands everything since the last export to the collector as one
JSON-able payload: in distributed Locust runs it travels as a message to the master. The
first payload also says what machine the process runs on (``describe_machine``): a
generator's CPU figures mean little without its core count.

The ``RunCollector`` (the master, or the only process) adds the payloads up, appends the
history lines to the merged ``requests.jsonl``, keeps the backend's own numbers
(``ServiceSample``, from your sampler, once a second) and answers "how is the run going" for
the live progress line.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from loadtests.latency import LatencyBook

__all__ = ["ProcessRecorder", "RunCollector", "ServiceSample", "describe_machine", "encode_line"]


def encode_line(line: Mapping[str, Any]) -> str:
    """One JSON line, compact. orjson: a load process encodes one per request, and the
    standard library's encoder costs several times more (kept for what orjson refuses, e.g.
    an integer beyond 64 bits or a non-string key in a persona's ``value``)."""
    try:
        return orjson.dumps(line).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(line, separators=(",", ":"))


def describe_machine() -> dict[str, Any]:
    """The machine this process runs on: host, OS, CPU model and count, memory, Python."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu": platform.processor(),
        "cpus": os.cpu_count(),
        # What this process may use: a container or taskset may allow fewer than the machine has.
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux names the CPU model here only
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        info["cpu"] = model or info["cpu"]
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:  # psutil comes with the loadtest extra; without it, no memory figure
        pass
    return info


class ProcessRecorder:
    """Counters, histograms and the request log of one load-generating process."""

    def __init__(self, proc_id: str, start_epoch: float, *, request_log: Path | None = None) -> None:
        self.proc_id = proc_id
        self.start_epoch = start_epoch
        self.book = LatencyBook(start_epoch)
        self.seconds: dict[int, Counter[str]] = defaultdict(Counter)
        self.cpu: dict[int, float] = {}
        self._counted: dict[tuple[str, str, str, bool], tuple[str, ...]] = {}
        self._lines: list[str] = []
        self._lock = threading.Lock()  # CPU sampling may come from a thread in some hosts
        self._file: TextIO | None = None
        if request_log is not None:
            request_log.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(request_log, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.done = False
        self.dispatch: dict[str, Any] = {}
        #: Why this process could not send its share (the run is then invalid).
        self.failure = ""
        self.rendezvous_first: float | None = None
        self._machine: dict[str, Any] | None = describe_machine()  # sent once, with the first export

    def second(self, epoch: float) -> int:
        return (
            int(epoch - self.start_epoch) if epoch >= self.start_epoch else -1 - int(self.start_epoch - epoch)
        )

    def arrival(self, intended: float, started: bool, lag_s: float, *, rendezvous: bool = False) -> None:
        c = self.seconds[self.second(intended)]
        c["arrivals.started" if started else "arrivals.dropped"] += 1
        self.book.record_value("dispatch_lag", lag_s)
        if rendezvous and started:
            # When this process actually fired its T0 share: compared across processes.
            at = intended + lag_s
            self.rendezvous_first = at if self.rendezvous_first is None else min(self.rendezvous_first, at)

    def request(
        self,
        name: str,
        *,
        intended: float,
        sent: float,
        done: float,
        expected: bool,
        label: str,
        bucket: str = "",
    ) -> None:
        """One request finished; ``label`` is its answer (``201``, ``409:sold_out``, ``0:no_answer`` …),
        ``bucket`` its outcome for the timeline (``created``, ``replayed``, a refusal's code, ``unknown``)."""
        c = self.seconds[self.second(done)]
        keys = self._counted.get((name, label, bucket, expected))
        if keys is None:  # the counters one kind of answer adds to, named once
            keys = (f"req.{name}", f"out.{name}.{label}")
            keys += (f"res.{name}.{bucket}",) if bucket else ()
            keys += () if expected else (f"err.{name}",)
            self._counted[(name, label, bucket, expected)] = keys
        for key in keys:
            c[key] += 1
        self.book.record(name, intended=intended, sent=sent, done=done)

    def log(self, line: Mapping[str, Any]) -> None:
        """One history line: encoded once, written to this process's file and shipped as that text."""
        # A visit's line names this process already: encoded as it is, not copied to say so.
        text = encode_line(line if line.get("proc") == self.proc_id else {**line, "proc": self.proc_id})
        with self._lock:
            self._lines.append(text)
            if self._file is not None:
                self._file.write(text + "\n")

    def sample_cpu(self, epoch: float, percent: float) -> None:
        s = self.second(epoch)
        self.cpu[s] = max(self.cpu.get(s, 0.0), percent)

    def export(self, *, encoded: bool = True) -> dict[str, Any]:
        """Everything since the last export, JSON-able for a message to the master; with
        ``encoded=False``, for a collector in this process (``LatencyBook.export``)."""
        with self._lock:
            lines, self._lines = self._lines, []
            if self._file is not None:
                self._file.flush()
        payload = {
            "proc": self.proc_id,
            "seconds": {str(s): dict(c) for s, c in self.seconds.items()},
            "cpu": {str(s): v for s, v in self.cpu.items()},
            "latency": self.book.export(encoded=encoded),
            "requests": lines,
            "done": self.done,
            "dispatch": dict(self.dispatch),
            "failure": self.failure,
            "rendezvous_first": self.rendezvous_first,
        }
        if self._machine is not None:
            payload["machine"], self._machine = self._machine, None
        self.seconds = defaultdict(Counter)
        self.cpu = {}
        return payload

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class ServiceSample:
    """The backend's own view at one instant, as far as it says: per-item counters
    (``available``, ``sold``, ``held``, ``total`` …), a queue's backlog, and how many orders its
    writer has recorded so far. Your sampler returns one a second; the report draws the
    stock and queue plots from them (and leaves those plots out when nothing was sampled)."""

    t: float
    skus: dict[str, dict[str, int]] = field(default_factory=dict)
    backlog: int | None = None
    written: int | None = None


class RunCollector:
    """The whole run, merged from every process's exports."""

    def __init__(self, start_epoch: float, report_dir: Path | None = None) -> None:
        self.start_epoch = start_epoch
        self.book = LatencyBook(start_epoch)
        self.seconds: dict[int, Counter[str]] = defaultdict(Counter)
        self.cpu: dict[str, dict[int, float]] = defaultdict(dict)
        self.done: dict[str, bool] = {}
        self.dispatch: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}
        self.rendezvous_first: dict[str, float] = {}
        self.machines: dict[str, dict[str, Any]] = {}
        self.service: list[ServiceSample] = []
        self.request_lines = 0
        self._requests: TextIO | None = None
        self.requests_path: Path | None = None
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            self.requests_path = report_dir / "requests.jsonl"
            self._requests = open(self.requests_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def expect(self, procs: Iterable[str]) -> None:
        """Processes whose final export the run waits for."""
        for p in procs:
            self.done.setdefault(p, False)

    def absorb(self, payload: Mapping[str, Any]) -> None:
        proc = str(payload["proc"])
        for sec, counts in payload.get("seconds", {}).items():
            self.seconds[int(sec)].update(counts)
        for sec, value in payload.get("cpu", {}).items():
            mine = self.cpu[proc]
            mine[int(sec)] = max(mine.get(int(sec), 0.0), float(value))
        self.book.absorb(payload.get("latency", {}))
        # Lines come encoded (``ProcessRecorder.log``); a dict is encoded here.
        lines = [x if isinstance(x, str) else encode_line(x) for x in payload.get("requests", [])]
        if self._requests is not None and lines:
            self._requests.write("\n".join(lines) + "\n")
            self._requests.flush()
        self.request_lines += len(lines)
        if payload.get("dispatch"):
            self.dispatch[proc] = dict(payload["dispatch"])
        self.done[proc] = bool(payload.get("done")) or self.done.get(proc, False)
        if payload.get("rendezvous_first") is not None:
            self.rendezvous_first[proc] = float(payload["rendezvous_first"])
        if payload.get("failure"):
            self.failures[proc] = str(payload["failure"])
        if payload.get("machine"):
            self.machines[proc] = dict(payload["machine"])

    def add_service_sample(self, sample: ServiceSample) -> None:
        self.service.append(sample)

    @property
    def all_done(self) -> bool:
        return bool(self.done) and all(self.done.values())

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.seconds.values():
            total.update(c)
        return total

    def close(self) -> None:
        if self._requests is not None:
            self._requests.close()
            self._requests = None
