"""Open-model arrivals: when each visit should start, and the dispatcher that starts it then.

Locust on its own is closed-model (a user waits for a response before its next request)
and its shapes tick once a second. A surge measured that way slows down exactly when the
service does, hiding the queueing a real crowd would meet. Here arrivals follow the shape
whatever the response times:

- ``ArrivalPlan`` places the n-th arrival of the whole drill where the shape's integral
  reaches ``n + ½`` (or at Poisson-spaced points of it). Locust process ``k`` of ``N``
  takes arrivals ``n ≡ k (mod N)``, so N processes together send exactly the one-process
  schedule, and everyone computes instants from the same wall-clock ``start_epoch``: the
  T0 rendezvous fires at the same instant in every process (bounded by clock sync).
- ``ArrivalDispatcher`` sleeps until each intended instant (sub-millisecond timers, not
  one-second ticks) and hands the visit to a visitor: a greenlet that runs one visit after
  another (a new one only when every visitor is busy). At most ``max_in_flight``
  visits run at once; an arrival that finds no free slot waits up to ``max_queue_wait_s``
  (its latency, measured from the intended instant, shows that wait) and is otherwise
  **dropped** and counted, like k6's dropped_iterations. The dispatcher's own lateness is
  reported too: if it grows, the generator, not the service, is the bottleneck.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from gevent.lock import BoundedSemaphore

from loadtests.shapes import Shape, WindowKind

__all__ = ["Arrival", "ArrivalDispatcher", "ArrivalPlan", "DispatchTotals"]

ArrivalProcess = Literal["uniform", "poisson"]


@dataclass(frozen=True)
class Arrival:
    """One visit to start. ``seq`` is unique across all Locust processes of the drill."""

    seq: int
    intended: float  # wall clock, epoch seconds
    offset: float  # seconds since the plan's start
    window: str
    kind: WindowKind


@dataclass(frozen=True)
class ArrivalPlan:
    """This process's share of a shape's arrivals, anchored on a wall-clock start."""

    shape: Shape
    start_epoch: float
    share_index: int = 0
    share_count: int = 1
    process: ArrivalProcess = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.share_index < self.share_count:
            raise ValueError(f"share_index {self.share_index} outside 0..{self.share_count - 1}")

    @property
    def t0_epoch(self) -> float:
        """When the sale opens (the rendezvous), on the wall clock."""
        return self.start_epoch + self.shape.t0_s

    @property
    def end_epoch(self) -> float:
        return self.start_epoch + self.shape.duration_s

    def expected_share(self) -> float:
        """Arrivals this process is expected to send in total."""
        return self.shape.total / self.share_count

    def __iter__(self) -> Iterator[Arrival]:
        n = self.share_count
        if self.process == "uniform":
            points: Iterator[tuple[int, float]] = ((i, i + 0.5) for i in _count_from(self.share_index, n))
        else:
            points = self._poisson_points()
        # The curve's pieces are walked once for the whole plan, not searched per arrival.
        numbered, areas = itertools.tee(points)
        instants = self.shape.locate_each(a for _, a in areas)
        for (seq, _), (t, in_impulse) in zip(numbered, instants, strict=False):
            if math.isinf(t):
                return
            kind: WindowKind = "open"
            window = "-"
            if in_impulse:
                window, kind = "rendezvous", "rendezvous"
            elif (w := self.shape.window_at(t)) is not None:
                window, kind = w.name, w.kind
            yield Arrival(seq, self.start_epoch + t, t, window, kind)

    def _poisson_points(self) -> Iterator[tuple[int, float]]:
        # Independent Poisson streams of rate 1/N each superpose to one Poisson stream of the
        # full rate; in integral space a Poisson process is unit-rate (time rescaling).
        rng = random.Random(f"{self.seed}:{self.share_index}")
        a = 0.0
        for local in _count_from(0, 1):
            a += rng.expovariate(1.0 / self.share_count)
            yield local * self.share_count + self.share_index, a


def _count_from(start: int, step: int) -> Iterator[int]:
    i = start
    while True:
        yield i
        i += step


@dataclass
class DispatchTotals:
    """What the dispatcher did; ``lag_max_s`` is how late the dispatcher itself woke up."""

    scheduled: int = 0
    started: int = 0
    dropped: int = 0
    lag_max_s: float = 0.0


#: visit(arrival, started_at): runs one visit; ``started_at`` is when it got its slot.
Visit = Callable[[Arrival, float], None]
#: on_arrival(arrival, started, lag_s): called once per arrival (started=False: dropped).
ArrivalHook = Callable[[Arrival, bool, float], None]


class ArrivalDispatcher:
    """Starts each arrival's visit at its intended instant (gevent; one per Locust process)."""

    def __init__(
        self,
        plan: ArrivalPlan,
        visit: Visit,
        *,
        max_in_flight: int = 2000,
        max_queue_wait_s: float = 1.0,
        max_waiting: int | None = None,
        on_arrival: ArrivalHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.plan = plan
        self.visit = visit
        self.max_queue_wait_s = max_queue_wait_s
        self.max_waiting = max_in_flight if max_waiting is None else max_waiting
        self.on_arrival = on_arrival
        self.clock = clock
        self.totals = DispatchTotals()
        self._slots = BoundedSemaphore(max_in_flight)
        self._waiting = 0
        #: Visits running (or handed to a visitor not yet running it).
        self._busy = 0
        #: No visit running and none waiting for a slot (what the drain waits for).
        self._quiet = gevent.event.Event()
        self._quiet.set()
        #: The visitors: greenlets that run one visit after another (and the slot waiters).
        self._group = gevent.pool.Group()
        self._visits: gevent.queue.Queue[tuple[Arrival, float] | None] = gevent.queue.Queue()
        #: Visitors free to take the next visit handed over.
        self._free = 0
        self._closing = False
        self._stopped = False

    @property
    def in_flight(self) -> int:
        return self._busy + self._waiting

    def run(self, *, drain_timeout_s: float | None = 60.0) -> DispatchTotals:
        """Dispatch the whole plan (blocking this greenlet), then wait for visits to finish."""
        for arrival in self.plan:
            if self._stopped:
                break
            delay = arrival.intended - self.clock()
            if delay > 0:
                gevent.sleep(delay)
                if self._stopped:
                    break
            lag = max(self.clock() - arrival.intended, 0.0)
            self.totals.scheduled += 1
            self.totals.lag_max_s = max(self.totals.lag_max_s, lag)
            if self._slots.acquire(blocking=False):
                self._start(arrival, lag, holding=True)
            elif self._waiting >= self.max_waiting:
                self._drop(arrival, lag)
            else:
                self._waiting += 1
                self._quiet.clear()
                self._group.spawn(self._wait_for_slot, arrival, lag)
        self._quiet.wait(timeout=drain_timeout_s)
        # Free visitors leave now; busy ones (past the drain) when their visit ends.
        self._closing = True
        for _ in range(self._free):
            self._visits.put(None)
        self._free = 0
        return self.totals

    def stop(self) -> None:
        """Stop dispatching and end the visits in flight (they record an unknown outcome)."""
        self._stopped = True
        self._group.kill(block=True, timeout=5)

    def _start(self, arrival: Arrival, lag: float, *, holding: bool) -> None:
        self.totals.started += 1
        if self.on_arrival:
            self.on_arrival(arrival, True, lag)
        self._busy += 1
        self._quiet.clear()
        if not holding:
            self._run_visit(arrival, self.clock())
            return
        # A free visitor takes it, or a new one: a greenlet that lives on for the next visits
        # rather than one greenlet per visit. A new greenlet's first Python frame maps fresh
        # memory for its frame stack and its end unmaps it (two system calls, page faults and,
        # with more than one thread, a TLB shootdown): ~25 µs a visit the plain user never pays.
        if self._free:
            self._free -= 1
        else:
            self._group.spawn(self._visitor)
        self._visits.put((arrival, self.clock()))

    def _visitor(self) -> None:
        while True:
            visit = self._visits.get()
            if visit is None:
                return
            try:
                self._run_visit(*visit)
            except Exception:  # as a greenlet of its own would: printed, and the visitor goes on
                gevent.get_hub().print_exception(gevent.getcurrent(), *sys.exc_info())
            if self._closing:
                return
            self._free += 1

    def _drop(self, arrival: Arrival, lag: float) -> None:
        self.totals.dropped += 1
        if self.on_arrival:
            self.on_arrival(arrival, False, lag)

    def _wait_for_slot(self, arrival: Arrival, lag: float) -> None:
        try:
            remaining = self.max_queue_wait_s - (self.clock() - arrival.intended)
            got = remaining > 0 and self._slots.acquire(timeout=remaining)
        finally:
            self._waiting -= 1
        if not got:
            self._drop(arrival, lag)
            self._check_quiet()
            return
        self._start(arrival, lag, holding=False)

    def _run_visit(self, arrival: Arrival, started_at: float) -> None:
        try:
            self.visit(arrival, started_at)
        finally:
            self._slots.release()
            self._busy -= 1
            self._check_quiet()

    def _check_quiet(self) -> None:
        if not self._busy and not self._waiting:
            self._quiet.set()
