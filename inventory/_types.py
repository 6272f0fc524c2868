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
