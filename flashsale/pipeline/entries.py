"""A sale stream's entries as the order writer sees them: where an entry came from
(:class:`StreamEntry`), the changes it records (:class:`OrderChange` or
:class:`StockChange`: one, or one per hold of a reservation call's ``reserved_batch``), and
:func:`parse_entry`, which reads the fields through inventory's entry contract
(``inventory.parse_events``) and adds the writer's own check — each order belongs to the
stream's sale. An entry that can never be written is an :class:`EntryError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flashsale.redis_client import as_text
from inventory import EventError, OrderEvent, StockEvent, parse_events

__all__ = [
    "EntryError",
    "OrderChange",
    "StockChange",
    "StreamEntry",
    "change_count",
    "entry_fields",
    "parse_entry",
]


def entry_fields(raw: Mapping[Any, Any] | None) -> dict[str, str] | None:
    """Entry fields as str, whichever way the client decodes replies."""
    if not raw or isinstance(next(iter(raw)), str):
        return raw  # type: ignore[return-value]
    return {
        as_text(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in raw.items()
    }


def change_count(entry: StreamEntry) -> int:
    """How many changes ``entry`` records, told without parsing it: a ``reserved_batch``'s
    holds (every field but ``type`` and ``at``: inventory's entry contract), else one."""
    fields = entry.fields
    if fields and fields.get("type") == "reserved_batch":
        return max(len(fields) - 2, 1)
    return 1


class EntryError(ValueError):
    """A stream entry that can never be written: malformed or of an unknown type."""


@dataclass(slots=True)
class StreamEntry:
    sale: str
    key: str
    stream_id: str
    fields: dict[str, str] | None  # None: the entry was deleted while pending


@dataclass(frozen=True, slots=True)
class OrderChange:
    order_id: str
    sale: str
    user: str
    request_id: str
    status: str
    lines: tuple[tuple[str, int], ...]
    pay_by_ms: int
    at_ms: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class StockChange:
    sale: str
    stream_id: str
    type: str
    sku: str
    total: int | None
    reserve: int | None
    per_user_limit: int | None
    low_stock_line: int | None
    delta: int | None
    units: int | None
    at_ms: int
    transfer: str | None = None  # the bucket transfer that moved the units, if one did


def parse_entry(entry: StreamEntry) -> list[OrderChange | StockChange]:
    """The changes a stream entry records, in order; :class:`EntryError` if it cannot be
    written. The fields are read by inventory's entry contract (``inventory.parse_events``);
    what is checked here is the writer's own: every order of the entry belongs to the
    stream's sale. The entry is one unit: one bad hold of a batch refuses all of it."""
    if entry.fields is None:
        raise EntryError("the entry was deleted from the stream before it was written")
    try:
        events = parse_events(entry.fields)
    except EventError as exc:
        raise EntryError(str(exc)) from None
    return [_change(entry, event) for event in events]


def _change(entry: StreamEntry, event: OrderEvent | StockEvent) -> OrderChange | StockChange:
    if isinstance(event, OrderEvent):
        if not event.hold_id.startswith(entry.sale + "."):
            raise EntryError(f"order id {event.hold_id[:80]!r} is not from sale {entry.sale!r}")
        return OrderChange(
            order_id=event.hold_id,
            sale=entry.sale,
            user=event.user,
            request_id=event.request_id,
            status=event.state.value,
            lines=tuple((line.sku, line.qty) for line in event.lines),
            pay_by_ms=event.deadline_ms,
            at_ms=event.at_ms,
            stream_id=entry.stream_id,
        )
    return StockChange(
        sale=entry.sale,
        stream_id=entry.stream_id,
        type=event.type,
        sku=event.sku,
        total=event.total,
        reserve=event.reserve,
        per_user_limit=event.limit_per_user,
        low_stock_line=event.low_stock_line,
        delta=event.delta,
        units=event.units,
        at_ms=event.at_ms,
        transfer=event.transfer,
    )
