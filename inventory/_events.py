"""The event-stream entry: the contract between the engine's scripts, which append the
changes of stock to the sale's stream ``{<prefix>:<sale>}:events`` (in the same script as
the change, see ``_keys.py``), and whoever reads that stream (flashsale's order writer,
recovery, audit and checker). An entry records one change, except ``reserved_batch``: the
holds one call of reserve.lua made, one field each (:func:`parse_events` reads it as one
``reserved`` :class:`OrderEvent` per hold). The fields of every entry type are named here and
nowhere else; each Lua script that appends an entry points here, and a test reads every
``XADD`` in ``lua/`` and fails if one writes a field set this table does not list.

Every entry has a ``type``; its other fields are written by the script. One is optional
(``required=False`` in :data:`EVENT_FIELDS`): ``transfer``, present only when a bucket
transfer moved the units (``_buckets.py``); an operator's restock or write-off has none.

======================  ==========================================  ==========================
type                    fields besides ``type``                      written by
======================  ==========================================  ==========================
``reserved_batch``      at, <hold id>                               reserve.lua
``reserved``            order, user, lines, request, deadline, at   none now (older streams)
``confirmed``           order, user, lines, request, deadline, at   confirm.lua
``released``            order, user, lines, request, deadline, at   release.lua
``expired``             order, user, lines, request, deadline, at   expire, confirm, release
``stocked``             sku, total, reserve, limit, low, at         stock.lua
``restocked``           sku, delta, at, transfer                    adjust (delta > 0), transfer_in
``written_off``         sku, delta, at, transfer                    adjust (delta < 0), transfer_out
``reserve_released``    sku, units, at                              release_reserve.lua
======================  ==========================================  ==========================

(The four hold-closing types are written by ``includes/hold_close.lua``.) What each field
means is in :data:`EVENT_FIELDS`. A transfer's two entries, the donor's ``written_off`` and
the receiver's ``restocked``, carry the same ``transfer`` id: units written off under an id
that no bucket received are units lost in transit, whatever became of Redis's records. Values are text: ids as given, numbers in decimal
(``-?[0-9]+``), times in ms of the Redis server's clock, ``lines`` as
``<sku>:<qty>,<sku>:<qty>…`` (each SKU once, qty ≥ 1).

``reserved_batch``: every field but ``type`` and ``at`` is a hold the call made, in the
order it made them: the name is the hold id, the value ``<user> <lines> <request>
<deadline>`` joined by single spaces (the four fields of a ``reserved`` entry, none of
which can hold a space: the client refuses one, and the script refuses a batch with one).
One entry per call rather than one per hold, and one field per hold rather than four:
Redis charges ~1,600 instructions per argument of a command a script runs, and one
``reserved`` entry per hold was a third of reserve.lua's instructions (callgrind, issue
15: 327.0M for 3,200 reservations in batches of 64; 230.5M with one packed entry per call,
276.0M with one entry per call of 5 fields per hold). ``reserved`` entries are no longer
written but stay readable: streams written before the change are still drained.

A reader ignores fields it does not know, so a field can be added to a script before
every reader knows it (not to ``reserved_batch``, whose unknown fields are its holds); a
missing or empty required field, a number that is not one, or a type not in the table is
an :class:`EventError`. That is a ``ValueError`` (bad data read
from Redis), never an :class:`~inventory.InventoryError` (the engine's answers to a call).

Stream ids (``<ms>-<seq>``) are parsed, compared and formatted by :class:`StreamId`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal, cast

from ._types import HoldState, Line

__all__ = [
    "EVENT_FIELDS",
    "EventError",
    "EventField",
    "OrderEvent",
    "StockEvent",
    "StreamId",
    "parse_event",
    "parse_events",
]

OrderEventType = Literal["reserved", "confirmed", "released", "expired"]
StockEventType = Literal["stocked", "restocked", "written_off", "reserve_released"]

#: Entry fields as a client returns them: bytes, or str with ``decode_responses``.
EntryFields = Mapping[str, str | bytes] | Mapping[bytes, str | bytes]


class EventError(ValueError):
    """A stream entry (or stream id) that does not follow this contract."""


@dataclass(frozen=True, slots=True)
class EventField:
    """One field of an entry type: its name in the entry, what it means, and how it reads."""

    name: str
    meaning: str
    #: ``text``, ``int`` (a whole number within ``low``..``high``), ``lines``, or ``hold``
    #: (one field per hold, named by its hold id: see ``reserved_batch`` above).
    kind: Literal["text", "int", "lines", "hold"] = "text"
    low: int | None = None
    high: int | None = None
    required: bool = True


def _number(name: str, meaning: str, *, low: int | None = None, high: int | None = None) -> EventField:
    return EventField(name, meaning, "int", low, high)


_AT = _number("at", "when the script made the change: ms of the Redis server's clock", low=0)
_HOLD = (
    EventField("order", "the hold id (the service's order id), <sale>.<suffix>"),
    EventField("user", "the buyer the hold belongs to"),
    EventField("lines", "the hold's cart, <sku>:<qty> joined by ','; each SKU once, qty >= 1", "lines"),
    EventField("request", "the request id that made the hold (its idempotency key)"),
    _number("deadline", "the hold's payment deadline: ms of the Redis server's clock", low=0),
    _AT,
)
#: The name :data:`EVENT_FIELDS` lists for the one field per hold of a ``reserved_batch``.
_BATCH_HOLDS = "<hold id>"
_BATCH = (
    _AT,
    EventField(
        _BATCH_HOLDS,
        "one per hold the call made, in order: named by the hold id (<sale>.<suffix>), valued "
        "'<user> <lines> <request> <deadline>' (the fields of a reserved entry, joined by ' ')",
        "hold",
    ),
)
_SKU = EventField("sku", "the SKU whose stock changed")
_TRANSFER = EventField(
    "transfer",
    "the bucket transfer that moved these units (the same id in the donor's written_off and the "
    "receiver's restocked); absent when an operator changed the stock",
    required=False,
)


def _table(rows: dict[str, tuple[EventField, ...]]) -> Mapping[str, Mapping[str, EventField]]:
    return MappingProxyType({t: MappingProxyType({f.name: f for f in fs}) for t, fs in rows.items()})


#: Entry type -> field name -> :class:`EventField` (every field but ``type``).
EVENT_FIELDS: Mapping[str, Mapping[str, EventField]] = _table(
    {
        "reserved_batch": _BATCH,  # holds were made: their units went from available to held
        "reserved": _HOLD,  # a hold was made (an older stream's entry: reserved_batch now)
        "confirmed": _HOLD,  # paid: the units went from held to sold
        "released": _HOLD,  # cancelled by the buyer or an operator: held back to available
        "expired": _HOLD,  # the deadline passed unpaid: held back to available
        "stocked": (
            _SKU,
            _number("total", "units put on sale, the reserve pool included", low=0),
            _number("reserve", "units of total held back in the reserve pool", low=0),
            _number("limit", "units one buyer may hold or buy; 0 = no limit", low=0),
            _number("low", "the low-stock line (available at or below it shows 'low')", low=0),
            _AT,
        ),
        "restocked": (
            _SKU,
            _number("delta", "units added: total and available grow by it", low=1),
            _AT,
            _TRANSFER,
        ),
        "written_off": (
            _SKU,
            _number("delta", "minus the units written off: total and available move by it", high=-1),
            _AT,
            _TRANSFER,
        ),
        "reserve_released": (
            _SKU,
            _number("units", "units moved from the reserve pool to available", low=1),
            _AT,
        ),
    }
)

_STATE_AFTER: Mapping[str, HoldState] = MappingProxyType(
    {
        "reserved": HoldState.HELD,
        "confirmed": HoldState.PAID,
        "released": HoldState.CANCELLED,
        "expired": HoldState.EXPIRED,
    }
)


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """A hold made (``reserved``) or closed (``confirmed``, ``released``, ``expired``)."""

    TYPES: ClassVar[frozenset[str]] = frozenset(_STATE_AFTER)

    type: OrderEventType
    hold_id: str
    user: str
    lines: tuple[Line, ...]
    request_id: str
    deadline_ms: int
    at_ms: int

    @property
    def state(self) -> HoldState:
        """The hold's state after this change."""
        return _STATE_AFTER[self.type]


@dataclass(frozen=True, slots=True)
class StockEvent:
    """A change of a SKU's stock. The counters its type carries are set (see the module's
    table); the others are None."""

    TYPES: ClassVar[frozenset[str]] = frozenset(EVENT_FIELDS) - OrderEvent.TYPES - {"reserved_batch"}

    type: StockEventType
    sku: str
    at_ms: int
    total: int | None = None
    reserve: int | None = None
    limit_per_user: int | None = None
    low_stock_line: int | None = None
    delta: int | None = None
    units: int | None = None
    #: The bucket transfer that moved the units (``restocked`` / ``written_off`` only).
    transfer: str | None = None


_WHOLE = re.compile(r"-?[0-9]+")


def _decode(value: str | bytes) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise EventError(f"{value[:40]!r} is not UTF-8") from None


def _whole(spec: EventField, raw: str) -> int:
    if not _WHOLE.fullmatch(raw):
        raise EventError(f"field {spec.name!r} is not a whole number: {raw[:40]!r}")
    value = int(raw)
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        raise EventError(f"field {spec.name!r} is out of range ({spec.low}..{spec.high}): {value}")
    return value


def _lines(raw: str) -> tuple[Line, ...]:
    lines: list[Line] = []
    for part in raw.split(","):
        sku, _, qty = part.rpartition(":")
        if not sku or not qty.isascii() or not qty.isdigit() or int(qty) < 1:
            raise EventError(f"line {part[:80]!r} is not '<sku>:<qty>'")
        lines.append(Line(sku, int(qty)))
    if len({line.sku for line in lines}) != len(lines):
        raise EventError("a SKU appears on two lines")
    return tuple(lines)


def parse_event(fields: EntryFields) -> OrderEvent | StockEvent:
    """The change one stream entry records; :class:`EventError` if it breaks the contract,
    or records several changes (a ``reserved_batch``: read it with :func:`parse_events`)."""
    text = _text(fields)
    if text.get("type") == "reserved_batch":
        raise EventError("a 'reserved_batch' entry records several holds: read it with parse_events")
    return _change(text)


def parse_events(fields: EntryFields) -> tuple[OrderEvent | StockEvent, ...]:
    """The changes one stream entry records, in order: one ``reserved`` :class:`OrderEvent`
    per hold of a ``reserved_batch``, else the one change :func:`parse_event` reads;
    :class:`EventError` if the entry breaks the contract."""
    text = _text(fields)
    if text.get("type") == "reserved_batch":
        return _reserved_batch(text)
    return (_change(text),)


def _text(fields: EntryFields) -> dict[str, str]:
    return {_decode(k): _decode(v) for k, v in fields.items()}


_BATCH_AT = EVENT_FIELDS["reserved_batch"]["at"]
_DEADLINE = EVENT_FIELDS["reserved"]["deadline"]


def _reserved_batch(text: dict[str, str]) -> tuple[OrderEvent, ...]:
    at = text.get("at")
    if not at:
        raise EventError("field 'at' is missing")
    at_ms = _whole(_BATCH_AT, at)
    holds: list[OrderEvent] = []
    for hold_id, packed in text.items():
        if hold_id in ("type", "at"):
            continue
        parts = packed.split(" ")
        if not hold_id or len(parts) != 4 or not all(parts):
            raise EventError(
                f"hold {hold_id[:80]!r} is not '<user> <lines> <request> <deadline>': {packed[:120]!r}"
            )
        user, lines, request_id, deadline = parts
        holds.append(
            OrderEvent(
                "reserved", hold_id, user, _lines(lines), request_id, _whole(_DEADLINE, deadline), at_ms
            )
        )
    if not holds:
        raise EventError("a 'reserved_batch' entry has no hold")
    return tuple(holds)


def _change(text: dict[str, str]) -> OrderEvent | StockEvent:
    kind = text.get("type")
    if not kind:
        raise EventError("field 'type' is missing")
    spec = EVENT_FIELDS.get(kind)
    if spec is None:
        raise EventError(f"unknown event type {kind[:40]!r}")
    values: dict[str, str] = {}
    numbers: dict[str, int] = {}
    lines: tuple[Line, ...] = ()
    for name, field in spec.items():
        raw = text.get(name)
        if raw is None or raw == "":
            if field.required:
                raise EventError(f"field {name!r} is missing")
            continue
        if field.kind == "int":
            numbers[name] = _whole(field, raw)
        elif field.kind == "lines":
            lines = _lines(raw)
        else:
            values[name] = raw
    if kind in OrderEvent.TYPES:
        return OrderEvent(
            type=cast(OrderEventType, kind),
            hold_id=values["order"],
            user=values["user"],
            lines=lines,
            request_id=values["request"],
            deadline_ms=numbers["deadline"],
            at_ms=numbers["at"],
        )
    total, reserve = numbers.get("total"), numbers.get("reserve")
    if total is not None and reserve is not None and reserve > total:
        raise EventError(f"reserve {reserve} exceeds total {total}")
    return StockEvent(
        type=cast(StockEventType, kind),
        sku=values["sku"],
        at_ms=numbers["at"],
        total=total,
        reserve=reserve,
        limit_per_user=numbers.get("limit"),
        low_stock_line=numbers.get("low"),
        delta=numbers.get("delta"),
        units=numbers.get("units"),
        transfer=values.get("transfer"),
    )


_SEQ_MAX = 2**64 - 1
_STREAM_ID = re.compile(r"([0-9]+)(?:-([0-9]+))?")


@dataclass(frozen=True, slots=True, order=True)
class StreamId:
    """A stream entry's id, ``<ms>-<seq>``: ordered as Redis orders them (by ms, then seq)."""

    ms: int
    seq: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.ms <= _SEQ_MAX and 0 <= self.seq <= _SEQ_MAX):
            raise EventError(f"stream id {self.ms}-{self.seq} is out of range")

    @classmethod
    def parse(cls, value: str | bytes) -> StreamId:
        """``<ms>-<seq>`` (or ``<ms>``, seq 0, as Redis reads it in a range)."""
        text = _decode(value)
        match = _STREAM_ID.fullmatch(text)
        if match is None:
            raise EventError(f"{text[:40]!r} is not a stream id")
        return cls(int(match[1]), int(match[2] or 0))

    def next(self) -> StreamId:
        """The smallest id above this one."""
        if self.seq < _SEQ_MAX:
            return StreamId(self.ms, self.seq + 1)
        return StreamId(self.ms + 1, 0)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"
