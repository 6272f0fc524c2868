"""The history: every operation the clients made, in a format an external checker can read.

Each Locust process appends one JSON object per line when an operation completes (its
``processes/<proc>.requests.jsonl``); the master merges them into the report folder's
``requests.jsonl``. The format is ``loadtests.history/1``:

==========  ===========  ===================================================================
field       type         meaning
==========  ===========  ===================================================================
op          int          the operation's number within its process (``proc``, ``op`` is unique)
proc        str          the Locust process (``local``, or a worker's client id)
visit       str          the visit it belongs to (unique in the run: ``<run id>-<arrival seq>``)
persona     str          who made it (``buyer``, ``browser`` …)
f           str          what it was: the request's name (``order``, ``pay``, ``checkout`` …)
key         str | null   the idempotency key sent with it, if the persona gave one
intended    float        when the arrival schedule meant it to be sent (epoch seconds)
invoke      float        when it was sent (epoch seconds)
complete    float        when its answer came, or the client gave up (epoch seconds)
type        str          ``ok``: the backend did it; ``fail``: it definitely did not (refused);
                         ``info``: not known (no answer, a timeout, a 5xx) — it may have happened
status      int          the HTTP status (0: no answer)
code        str          the refusal's or unknown outcome's code (``sold_out``, ``no_answer`` …)
order       str | null   for ``ok``: the order id the backend acknowledged
item        str | null   what that order holds, if the persona said …
units       int | null   … and how many units
replayed    bool         an idempotent retry answered with the first outcome
value       object       anything else the persona reported
error       str          the transport's error text, if any
==========  ===========  ===================================================================

The types are Jepsen's: a checker treats ``info`` operations as possibly applied, with an
unknown completion time. An operation the drill stopped in flight (Ctrl-C, the end of the
drain) is written as ``info`` with code ``stopped``.

``read_history`` reads files of this format back; ``summarize_history`` reduces them to
what the clients were told (``HistorySummary``), which the oracle judges a backend against.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "HISTORY_FORMAT",
    "HistorySummary",
    "Operation",
    "OutcomeType",
    "history_line",
    "merge_histories",
    "read_history",
    "summarize_history",
    "to_micros",
]

HISTORY_FORMAT = "loadtests.history/1"
#: ok: the backend acted; fail: it definitely did not; info: not known.
OutcomeType = Literal["ok", "fail", "info"]


@dataclass(frozen=True)
class Operation:
    """One line of the history (see the module docstring for each field)."""

    op: int
    proc: str
    visit: str
    persona: str
    f: str
    intended: float
    invoke: float
    complete: float
    type: OutcomeType
    status: int
    code: str = ""
    key: str | None = None
    order: str | None = None
    item: str | None = None
    units: int | None = None
    replayed: bool = False
    value: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return history_line(asdict(self))

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> Operation:
        kind = line.get("type")
        if kind not in ("ok", "fail", "info"):
            raise ValueError(f"not a {HISTORY_FORMAT} line (type {kind!r}): {dict(line)}")
        units = line.get("units")
        return cls(
            op=int(line["op"]),
            proc=str(line["proc"]),
            visit=str(line.get("visit", "")),
            persona=str(line.get("persona", "")),
            f=str(line["f"]),
            intended=float(line.get("intended", line["invoke"])),
            invoke=float(line["invoke"]),
            complete=float(line["complete"]),
            type=kind,
            status=int(line.get("status", 0)),
            code=str(line.get("code") or ""),
            key=None if line.get("key") is None else str(line["key"]),
            order=None if line.get("order") is None else str(line["order"]),
            item=None if line.get("item") is None else str(line["item"]),
            units=None if units is None else int(units),
            replayed=bool(line.get("replayed", False)),
            value=dict(line.get("value") or {}),
            error=str(line.get("error") or ""),
        )


#: Written even when empty, so every line names its operation fully.
_ALWAYS = frozenset(
    {"op", "proc", "visit", "persona", "f", "intended", "invoke", "complete", "type", "status"}
)
#: Each field with its default (None for the required ones), in the order a line lists them.
_FIELDS: tuple[tuple[str, Any], ...] = tuple(
    (f.name, None if f.default is MISSING else f.default) for f in fields(Operation)
)
#: The fields every line has, then the others with their defaults: ``Operation`` lists the
#: required ones first, so a line keeps the dataclass's order of fields.
_REQUIRED = tuple(name for name, _ in _FIELDS if name in _ALWAYS)
_OPTIONAL = tuple((name, default) for name, default in _FIELDS if name not in _ALWAYS)
assert [n for n, _ in _FIELDS] == [*_REQUIRED, *(n for n, _ in _OPTIONAL)], "required fields come first"


def history_line(values: Mapping[str, Any]) -> dict[str, Any]:
    """The line ``Operation(**values).to_json()`` is, without building the ``Operation``: a load
    process writes one for every request. Empty fields are left out (but those in ``_ALWAYS``)."""
    line = {name: values.get(name) for name in _REQUIRED}
    get = values.get
    for name, default in _OPTIONAL:
        value = get(name, default)
        if value is not None and value != "" and value != {}:
            line[name] = value
    return line


def to_micros(epoch: float) -> float:
    """An instant rounded to the microsecond, as the history writes it: ``round(t, 6)`` but
    for ties, in a fifth of its time (a load process rounds three per request). Monotonic,
    so a line's ``intended <= invoke <= complete`` survive it."""
    return (epoch * 1e6 + 0.5) // 1 / 1e6


def _lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                raw = raw.strip()
                if raw:
                    yield json.loads(raw)


def read_history(paths: Iterable[Path]) -> Iterator[Operation]:
    """Every operation in ``paths`` (``requests.jsonl`` files), in file order."""
    for line in _lines(paths):
        yield Operation.from_json(line)


def merge_histories(paths: Iterable[Path], out: Path) -> int:
    """Concatenate per-process histories (e.g. copied from several machines) into one file."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for line in _lines(paths):
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
            n += 1
    return n


@dataclass(frozen=True)
class HistorySummary:
    """What the clients were told, from the history of every process.

    *Order operations* are those named in ``order_operations`` (or, if none were named,
    those that ever acknowledged an order); the counts below are over them.
    """

    #: Order ids acknowledged to a client (an ``ok`` with an order), in the order first seen.
    acknowledged: tuple[str, ...]
    #: Units acknowledged per item (each order counted once), where the personas said.
    acknowledged_units: dict[str, int]
    #: Idempotency keys answered with more than one order id: a duplicate the clients saw.
    key_conflicts: dict[str, list[str]]
    #: Every idempotency key an order operation sent.
    keys: frozenset[str]
    attempts: int
    ok: int
    failed: int
    unknown: int
    replays: int
    failed_by_code: dict[str, int]
    #: ``{operation name: {"ok": n, "fail": n, "info": n}}`` over every operation.
    by_operation: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        """The client side's figures for the report (the lists are left out: they can be long)."""
        return {
            "acknowledged": len(self.acknowledged),
            "attempts": self.attempts,
            "ok": self.ok,
            "failed": self.failed,
            "unknown": self.unknown,
            "replays": self.replays,
            "failed_by_code": dict(self.failed_by_code),
            "key_conflicts": len(self.key_conflicts),
            "by_operation": {k: dict(v) for k, v in sorted(self.by_operation.items())},
        }


def summarize_history(
    operations: Iterable[Operation], order_operations: Sequence[str] = ()
) -> HistorySummary:
    ops = list(operations)
    names = set(order_operations) or {o.f for o in ops if o.type == "ok" and o.order}
    acked: dict[str, None] = {}
    units: dict[str, int] = defaultdict(int)
    by_key: dict[str, dict[str, None]] = defaultdict(dict)
    keys: set[str] = set()
    failed_by_code: dict[str, int] = defaultdict(int)
    by_operation: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "fail": 0, "info": 0})
    attempts = ok = failed = unknown = replays = 0
    for o in ops:
        by_operation[o.f][o.type] += 1
        if o.f not in names:
            continue
        attempts += 1
        if o.key is not None:
            keys.add(o.key)
        if o.type == "ok":
            ok += 1
            replays += o.replayed
            if o.order:
                if o.order not in acked and o.item is not None:
                    units[o.item] += 1 if o.units is None else o.units
                acked[o.order] = None
                if o.key is not None:
                    by_key[o.key][o.order] = None
        elif o.type == "fail":
            failed += 1
            failed_by_code[f"{o.status}:{o.code or '-'}"] += 1
        else:
            unknown += 1
    return HistorySummary(
        acknowledged=tuple(acked),
        acknowledged_units=dict(units),
        key_conflicts={k: list(v) for k, v in by_key.items() if len(v) > 1},
        keys=frozenset(keys),
        attempts=attempts,
        ok=ok,
        failed=failed,
        unknown=unknown,
        replays=replays,
        failed_by_code=dict(failed_by_code),
        by_operation=dict(by_operation),
    )
