"""Exceptions, and the one place that maps script result codes to them.

Exception tree::

    InventoryError                  base of everything the engine raises
    ├── Refused                     valid request, the answer is no; nothing changed
    │   ├── SoldOut                 not enough units available for a line
    │   ├── LimitExceeded           the buyer's per-user limit for a SKU
    │   └── HoldClosed              the hold already left "held" another way
    │       ├── HoldExpired
    │       ├── HoldCancelled
    │       └── HoldPaid
    ├── InvalidRequest              malformed input; nothing changed
    │   ├── InvalidQuantity
    │   ├── UnknownSku
    │   └── RequestConflict         a request id reused with a different payload
    ├── HoldNotFound                no such hold (or not this user's)
    ├── SkuExists
    ├── InsufficientStock           adjust/release more units than there are
    └── OutcomeUnknown              Redis did not answer in time: the change may or may
                                    not have happened. Retry with the same request id.

Every exception has a stable ``code`` string (used as the service's JSON error code).
A stream entry that breaks the event contract raises ``EventError`` (``_events.py``), a
``ValueError``: bad data read back, not an answer of the engine, so outside this tree.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "InventoryError",
    "Refused",
    "SoldOut",
    "LimitExceeded",
    "HoldClosed",
    "HoldExpired",
    "HoldCancelled",
    "HoldPaid",
    "InvalidRequest",
    "InvalidQuantity",
    "UnknownSku",
    "RequestConflict",
    "HoldNotFound",
    "SkuExists",
    "InsufficientStock",
    "OutcomeUnknown",
]

# Script result codes: the same table as lua/includes/codes.lua.
OK = 0
REPLAYED = 1
SOLD_OUT = 10
LIMIT_EXCEEDED = 11
UNKNOWN_SKU = 12
INVALID = 13
REQUEST_CONFLICT = 14
HOLD_NOT_FOUND = 20
HOLD_EXPIRED = 21
HOLD_CANCELLED = 22
HOLD_PAID = 23
SKU_EXISTS = 30
INSUFFICIENT_STOCK = 31


class InventoryError(Exception):
    """Base class of every error the inventory engine raises."""

    code: ClassVar[str] = "inventory_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Refused(InventoryError):
    code = "refused"


class SoldOut(Refused):
    code = "sold_out"

    def __init__(self, sku: str, available: int) -> None:
        super().__init__(f"SKU {sku!r} has {available} unit(s) available", sku=sku, available=available)
        self.sku = sku
        self.available = available


class LimitExceeded(Refused):
    code = "limit_exceeded"

    def __init__(self, sku: str, limit: int, already: int) -> None:
        super().__init__(
            f"per-user limit for SKU {sku!r} is {limit}; this buyer already holds or bought {already}",
            sku=sku,
            limit=limit,
            already=already,
        )
        self.sku = sku
        self.limit = limit
        self.already = already


class HoldClosed(Refused):
    code = "hold_closed"


class HoldExpired(HoldClosed):
    code = "hold_expired"


class HoldCancelled(HoldClosed):
    code = "hold_cancelled"


class HoldPaid(HoldClosed):
    code = "hold_paid"


class InvalidRequest(InventoryError):
    code = "invalid_request"


class InvalidQuantity(InvalidRequest):
    code = "invalid_quantity"


class UnknownSku(InvalidRequest):
    code = "unknown_sku"

    def __init__(self, sku: str) -> None:
        super().__init__(f"no SKU {sku!r} in this sale", sku=sku)
        self.sku = sku


class RequestConflict(InvalidRequest):
    code = "request_conflict"


class HoldNotFound(InventoryError):
    code = "hold_not_found"


class SkuExists(InventoryError):
    code = "sku_exists"


class InsufficientStock(InventoryError):
    code = "insufficient_stock"


class OutcomeUnknown(InventoryError):
    code = "outcome_unknown"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def error_for(reply: list[Any], *, subject: str = "") -> InventoryError:
    """Map a script's non-OK reply ``[code, ...]`` to its exception."""
    code = int(reply[0])
    if code == SOLD_OUT:
        return SoldOut(_text(reply[1]), int(reply[2]))
    if code == LIMIT_EXCEEDED:
        return LimitExceeded(_text(reply[1]), int(reply[2]), int(reply[3]))
    if code == UNKNOWN_SKU:
        return UnknownSku(_text(reply[1]))
    if code == INVALID:
        reason = _text(reply[1]) if len(reply) > 1 else "invalid"
        if reason == "invalid_quantity":
            return InvalidQuantity("quantities must be whole numbers of at least 1")
        return InvalidRequest(f"invalid request: {reason}", reason=reason)
    if code == REQUEST_CONFLICT:
        return RequestConflict(
            "this request id was already used with a different user or cart; "
            "use a new request id for a new order",
            hold_id=_text(reply[1]),
        )
    if code == HOLD_NOT_FOUND:
        return HoldNotFound(f"no hold {subject!r}", hold_id=subject)
    if code == HOLD_EXPIRED:
        return HoldExpired(f"hold {subject!r} lapsed: its payment deadline passed", hold_id=subject)
    if code == HOLD_CANCELLED:
        return HoldCancelled(f"hold {subject!r} was cancelled", hold_id=subject)
    if code == HOLD_PAID:
        return HoldPaid(f"hold {subject!r} is paid", hold_id=subject)
    if code == SKU_EXISTS:
        return SkuExists(f"SKU {subject!r} is already stocked; use adjust or restock", sku=subject)
    if code == INSUFFICIENT_STOCK:
        return InsufficientStock(
            f"SKU {_text(reply[1])!r} has only {int(reply[2])} unit(s) to take from",
            sku=_text(reply[1]),
            units=int(reply[2]),
        )
    return InventoryError(f"unexpected script reply code {code}")
