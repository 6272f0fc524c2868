"""The engine's value types: what callers pass in and get back."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Line", "HoldState", "Hold", "StockState", "Snapshot", "ExpiryBatch"]


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a cart: ``qty`` units of ``sku``."""

    sku: str
    qty: int = 1


class HoldState(str, enum.Enum):
    """Where a hold is in its life: ``held`` until it is paid, cancelled or lapses."""

    HELD = "held"
    PAID = "paid"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Hold:
    """Units reserved for one buyer until a payment deadline (the order, in the service)."""

    hold_id: str
    user: str
    lines: tuple[Line, ...]
    state: HoldState
    deadline_ms: int
    created_ms: int
    request_id: str
    #: True when this reply repeats the first outcome of the same request id.
    replayed: bool = False


# A hold made by a reservation, built without the dataclass's __init__: a frozen dataclass
# sets each field through object.__setattr__, ~1.7 us for a Hold against ~0.5 us through
# the slots' own setters, and the engine builds one per reservation (issue 15: the client's
# CPU per coalesced reservation). The same object, equal to one Hold(...) makes.
_HOLD_FIELDS = ("hold_id", "user", "lines", "state", "deadline_ms", "created_ms", "request_id", "replayed")
if tuple(Hold.__dataclass_fields__) != _HOLD_FIELDS:  # a field added to Hold goes here too
    raise TypeError("made_hold() must set every field of Hold")
_set_hold_id, _set_user, _set_lines, _set_state, _set_deadline, _set_created, _set_request, _set_replayed = (
    Hold.__dict__[name].__set__ for name in _HOLD_FIELDS
)
_new = object.__new__


def made_hold(
    hold_id: str,
    user: str,
    lines: tuple[Line, ...],
    state: HoldState,
    deadline_ms: int,
    created_ms: int,
    request_id: str,
    replayed: bool,
) -> Hold:
    """``Hold(hold_id, user, lines, state, deadline_ms, created_ms, request_id, replayed)``,
    built the fast way (the engine's reservations)."""
    hold: Hold = _new(Hold)
    _set_hold_id(hold, hold_id)
    _set_user(hold, user)
    _set_lines(hold, lines)
    _set_state(hold, state)
    _set_deadline(hold, deadline_ms)
    _set_created(hold, created_ms)
    _set_request(hold, request_id)
    _set_replayed(hold, replayed)
    return hold


class StockState(str, enum.Enum):
    """What a product page shows."""

    IN_STOCK = "in_stock"
    LOW = "low"
    SOLD_OUT = "sold_out"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One SKU's counters. ``available + held + sold + reserve == total`` always."""

    sku: str
    total: int
    available: int
    held: int
    sold: int
    reserve: int
    limit_per_user: int
    low_stock_line: int

    @property
    def state(self) -> StockState:
        if self.available <= 0:
            return StockState.SOLD_OUT
        if self.available <= self.low_stock_line:
            return StockState.LOW
        return StockState.IN_STOCK

    @property
    def balanced(self) -> bool:
        """Conservation: every unit is available, held, sold or in the reserve pool."""
        terms = (self.available, self.held, self.sold, self.reserve)
        return all(t >= 0 for t in terms) and sum(terms) == self.total


@dataclass(frozen=True, slots=True)
class ExpiryBatch:
    """What one sweep closed, and whether more holds are already due."""

    expired: tuple[str, ...]
    more: bool
