"""A rehearsal: what you declare in your locustfile to rehearse your own backend.

::

    from loadtests import Rehearsal, Truth, Visit, OracleContext

    rehearsal = Rehearsal("shop", order_operations=("checkout",))

    @rehearsal.persona(weight=3, kinds=("rendezvous", "open"))
    def buyer(visit: Visit) -> None: ...          # plain code making HTTP calls

    @rehearsal.oracle
    def ledger(ctx: OracleContext) -> Truth: ...  # reads your backend's truth after the run

    ArrivalDriver, ArrivalShape = rehearsal.locust_classes()   # Locust finds these two

The hooks, all optional but one persona:

- ``@rehearsal.persona``: one kind of visitor, drawn per arrival by weight (``--personas``
  overrides the weights); ``kinds`` limits it to windows of those kinds (``countdown``
  before the opening, the T0 ``rendezvous``, ``open``, ``idle``);
- ``@rehearsal.shape("name")``: your own arrival curve (``(peak_rps, time_scale) -> Shape``,
  e.g. from ``rate_table`` or ``rate_function``), chosen with ``--shape name``;
- ``@rehearsal.setup``: once, on the master, before the first arrival (create a sale, seed
  stock); what it returns (JSON-able) reaches every process as ``ctx.shared``;
- ``@rehearsal.process_setup``: once in every load process (log in, mint tokens); what it
  returns is ``visit.state`` in that process;
- ``@rehearsal.sampler``: once a second on the master; returns a ``ServiceSample`` (stock per
  item, a backlog) for the live line and the report's stock and queue plots;
- ``@rehearsal.oracle``: after the run, on the master; returns a ``Truth`` that the kit judges
  (``loadtests.verdict``). Without one the report says "no oracle", never "invariants held".

Options are Locust's: the kit adds its own (``python -m loadtests help LOCUSTFILE`` lists
them); add yours with ``locust.events.init_command_line_parser`` as usual and read them
from ``ctx.options`` / ``visit.options``.
"""

from __future__ import annotations

import random
import time
from bisect import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, TypeVar, overload

from loadtests.arrivals import Arrival
from loadtests.history import HistorySummary, Operation, read_history
from loadtests.recording import ServiceSample
from loadtests.shapes import SHAPES, Shape, WindowKind
from loadtests.slo import DEFAULT_THRESHOLDS
from loadtests.verdict import Truth
from loadtests.visits import Visit

__all__ = [
    "OracleContext",
    "Persona",
    "ProcessContext",
    "Rehearsal",
    "RunContext",
    "SetupContext",
    "SetupError",
]

ALL_KINDS: tuple[WindowKind, ...] = ("countdown", "rendezvous", "open", "idle")


class SetupError(RuntimeError):
    """Raise from a setup hook when the run cannot start; the message is shown as it is."""


@dataclass(frozen=True)
class RunContext:
    """What every hook knows about the run."""

    host: str
    options: Any
    run_id: str
    shape: Shape
    #: Wall clock (epoch seconds) of the shape's t=0; the first arrival is at or after it.
    start_epoch: float
    #: What the setup hook returned.
    shared: Mapping[str, Any] = field(default_factory=dict)

    @property
    def t0_epoch(self) -> float:
        """When the shape's opening (its T0) happens, on the wall clock."""
        return self.start_epoch + self.shape.t0_s


@dataclass(frozen=True)
class SetupContext(RunContext):
    """The setup hook's view; it may schedule actions, name an item to watch and add notes."""

    report_dir: Path = Path(".")
    #: Persona weights in effect (after ``--personas``).
    weights: Mapping[str, float] = field(default_factory=dict)
    _actions: list[tuple[float, Callable[[], str | None]]] = field(default_factory=list, repr=False)
    _watch: list[str] = field(default_factory=list, repr=False)
    _notes: dict[str, Any] = field(default_factory=dict, repr=False)

    def at(self, offset_s: float, action: Callable[[], str | None]) -> None:
        """Run ``action`` on the master ``offset_s`` seconds after ``start_epoch`` (release a
        reserve, restock mid-surge); the text it returns marks the moment on the plots."""
        self._actions.append((offset_s, action))

    def watch(self, item: str) -> None:
        """The item whose stock the live progress line shows (from the sampler)."""
        self._watch[:] = [item]

    def note(self, key: str, value: Any) -> None:
        """Add ``key: value`` to the report's run section (e.g. the sale's name)."""
        self._notes[key] = value


@dataclass(frozen=True)
class ProcessContext(RunContext):
    """A load process's view: which share of the arrivals it sends."""

    index: int = 0
    count: int = 1
    proc_id: str = "local"


@dataclass(frozen=True)
class OracleContext(RunContext):
    """The oracle's view: what the clients were told, and ways to wait politely."""

    history: HistorySummary | None = None
    history_paths: tuple[Path, ...] = ()
    report_dir: Path = Path(".")
    sleep: Callable[[float], None] = time.sleep
    progress: Callable[[str], None] = lambda _message: None

    def operations(self) -> Iterator[Operation]:
        """Every operation of the run, from the history files."""
        return read_history(self.history_paths)


#: A persona: a function of one visit.
VisitFn = Callable[[Visit], None]


@dataclass(frozen=True)
class Persona:
    name: str
    visit: VisitFn
    weight: float = 1.0
    kinds: tuple[WindowKind, ...] = ALL_KINDS


ShapeFactory = Callable[[float, float], Shape]
SetupHook = Callable[[SetupContext], "Mapping[str, Any] | None"]
ProcessSetupHook = Callable[[ProcessContext], Any]
SamplerHook = Callable[[RunContext], "ServiceSample | None"]
OracleHook = Callable[[OracleContext], Truth]
F = TypeVar("F", bound=Callable[..., Any])


def parse_weights(text: str, defaults: Mapping[str, float]) -> dict[str, float]:
    """``"browser=45,buyer=25"`` over ``defaults``: personas left out weigh 0 (an empty text
    keeps the defaults)."""
    if not text.strip():
        weights = dict(defaults)
    else:
        weights = {name: 0.0 for name in defaults}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in weights:
                raise ValueError(
                    f"bad persona weight {part.strip()!r}: use NAME=WEIGHT with NAME in {', '.join(defaults)}"
                )
            try:
                weights[key] = float(value)
            except ValueError:
                raise ValueError(
                    f"bad persona weight {part.strip()!r}: {value.strip()!r} is not a number"
                ) from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError("persona weights must be >= 0 and not all zero")
    return weights


class Rehearsal:
    """Your rehearsal: personas, shapes and hooks; ``locust_classes()`` plugs it into Locust.

    ``name`` titles the report; ``order_operations`` names the calls that place orders (their
    outcomes are drawn per second and counted in the verdict); ``default_shape`` is the
    ``--shape`` default; ``thresholds`` the ``--slo`` default (k6-style, ``loadtests.slo``).
    """

    def __init__(
        self,
        name: str,
        *,
        order_operations: Sequence[str] = ("order",),
        default_shape: str = "midnight_surge",
        thresholds: Sequence[str] = DEFAULT_THRESHOLDS,
    ) -> None:
        self.name = name
        self.order_operations = tuple(order_operations)
        self.default_shape = default_shape
        self.thresholds = tuple(thresholds)
        self.personas: dict[str, Persona] = {}
        self.shapes: dict[str, ShapeFactory] = dict(SHAPES)
        self.setup_hook: SetupHook | None = None
        self.process_setup_hook: ProcessSetupHook | None = None
        self.sampler_hook: SamplerHook | None = None
        self.oracle_hook: OracleHook | None = None
        self._classes: tuple[type[Any], type[Any]] | None = None

    # -- declaring ---------------------------------------------------------------------------
    @overload
    def persona(
        self,
        visit: VisitFn,
        *,
        name: str | None = None,
        weight: float = 1.0,
        kinds: Sequence[WindowKind] = ALL_KINDS,
    ) -> VisitFn: ...

    @overload
    def persona(
        self,
        visit: None = None,
        *,
        name: str | None = None,
        weight: float = 1.0,
        kinds: Sequence[WindowKind] = ALL_KINDS,
    ) -> Callable[[VisitFn], VisitFn]: ...

    def persona(
        self,
        visit: VisitFn | None = None,
        *,
        name: str | None = None,
        weight: float = 1.0,
        kinds: Sequence[WindowKind] = ALL_KINDS,
    ) -> VisitFn | Callable[[VisitFn], VisitFn]:
        """Register a persona (as ``@rehearsal.persona`` or ``@rehearsal.persona(weight=…)``)."""

        def register(fn: VisitFn) -> VisitFn:
            key = name or fn.__name__
            if weight < 0:
                raise ValueError(f"persona {key}: weight must be >= 0")
            unknown = set(kinds) - set(ALL_KINDS)
            if unknown:
                raise ValueError(f"persona {key}: unknown window kinds {sorted(unknown)}; use {ALL_KINDS}")
            self.personas[key] = Persona(key, fn, float(weight), tuple(kinds))
            return fn

        return register(visit) if visit is not None else register

    def shape(self, name: str) -> Callable[[ShapeFactory], ShapeFactory]:
        """Register your own shape under ``--shape name``: ``(peak_rps, time_scale) -> Shape``."""

        def register(factory: ShapeFactory) -> ShapeFactory:
            self.shapes[name] = factory
            return factory

        return register

    def setup(self, hook: F) -> F:
        """Register ``hook(ctx: SetupContext) -> dict | None``: once, on the master, before the
        first arrival; what it returns (JSON-able) is ``ctx.shared`` in every process."""
        self.setup_hook = hook
        return hook

    def process_setup(self, hook: F) -> F:
        """Register ``hook(ctx: ProcessContext) -> Any``: once in every load process; what it
        returns is ``visit.state`` there. Raise ``SetupError`` if the process cannot take part."""
        self.process_setup_hook = hook
        return hook

    def sampler(self, hook: F) -> F:
        """Register ``hook(ctx: RunContext) -> ServiceSample | None``: once a second on the master,
        for the live line and the stock and queue plots."""
        self.sampler_hook = hook
        return hook

    def oracle(self, hook: F) -> F:
        """Register ``hook(ctx: OracleContext) -> Truth``: after the run, on the master; the kit
        judges the Truth against the history (``loadtests.verdict``)."""
        self.oracle_hook = hook
        return hook

    # -- using -------------------------------------------------------------------------------
    def build_shape(self, name: str, peak_rps: float, time_scale: float, **params: float) -> Shape:
        """The shape ``--shape name`` builds (shipped or yours), scaled."""
        if name not in self.shapes:
            raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(sorted(self.shapes))}")
        if peak_rps <= 0 or time_scale <= 0:
            raise ValueError("--peak-rps and --time-scale must be > 0")
        if params and name in SHAPES:
            return SHAPES[name](peak_rps, time_scale, **params)
        shape = self.shapes[name](peak_rps, time_scale)
        return shape if shape.name == name else replace(shape, name=name)  # reported as --shape named it

    def weights(self, text: str = "") -> dict[str, float]:
        """The persona weights in effect: the registered ones, or ``--personas`` text over them."""
        return parse_weights(text, {p.name: p.weight for p in self.personas.values()})

    def pick(self, arrival: Arrival, weights: Mapping[str, float], rng: random.Random) -> Persona:
        """The persona for one arrival: by weight among those allowed in its window's kind
        (if none is, among all)."""
        return self.picker(weights)(arrival, rng)

    def picker(self, weights: Mapping[str, float]) -> Callable[[Arrival, random.Random], Persona]:
        """``pick`` with these weights, its choices among each window kind's personas made once:
        a load process picks for every arrival. The same draw from ``rng`` as ``pick`` (one
        ``random()``, as ``rng.choices`` takes), so a seeded run picks the same personas."""
        draws: dict[str, tuple[list[Persona], list[float]]] = {}
        for kind in ALL_KINDS:
            eligible = [p for p in self.personas.values() if kind in p.kinds and weights.get(p.name, 0) > 0]
            if not eligible:
                eligible = [p for p in self.personas.values() if weights.get(p.name, 0) > 0]
            draws[kind] = (eligible, list(accumulate(weights[p.name] for p in eligible)))

        def pick(arrival: Arrival, rng: random.Random) -> Persona:
            eligible, cumulative = draws[arrival.kind]
            return eligible[bisect(cumulative, rng.random() * (cumulative[-1] + 0.0), 0, len(eligible) - 1)]

        return pick

    def locust_classes(self) -> tuple[type[Any], type[Any]]:
        """Register the rehearsal's options and event listeners with Locust and return the
        two classes Locust must find in your locustfile: the arrival driver (one Locust user
        per process, which sends that process's share of the arrivals) and the shape class
        (keeps one driver per process until every process has finished). Call it once, at
        the bottom of the locustfile, and assign both to module-level names."""
        if not self.personas:
            raise ValueError(f"rehearsal {self.name!r} has no persona: add one with @rehearsal.persona")
        if self._classes is None:
            from loadtests.plugin import install

            self._classes = install(self)
        return self._classes
