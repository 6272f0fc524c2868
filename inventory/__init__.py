"""inventory: atomic stock reservation in Redis for flash sales, embeddable in any
asyncio service. It never oversells: every change of stock is one Lua script that
validates first, then writes, and appends the change to the sale's event stream.

    from redis.asyncio import Redis
    from inventory import Inventory, Line, SoldOut

    inv = Inventory(Redis(), "d11")
    await inv.stock("phone", 100, reserve=20, limit_per_user=2)
    hold = await inv.reserve("alice", [Line("phone", 1)], request_id="r-1")
    await inv.confirm(hold.hold_id, user="alice")

Request ids are each buyer's own (``SaleKeys.request_field``): a retry by the same buyer
replays the first hold; another buyer using the same id gets a hold of their own.

Every change is appended to the sale's event stream, in the same script; ``parse_events``
reads an entry back as the changes it records — one per hold of a reservation call's
``reserved_batch``, else one (the fields of each type are the contract in ``_events.py``).

The only dependency is redis-py.
"""

from ._buckets import BucketedInventory, bucket_sale_id, parent_sale_id
from ._engine import DEFAULT_HOLD_TTL, Inventory
from ._errors import (
    HoldCancelled,
    HoldClosed,
    HoldExpired,
    HoldNotFound,
    HoldPaid,
    InsufficientStock,
    InvalidQuantity,
    InvalidRequest,
    InventoryError,
    LimitExceeded,
    OutcomeUnknown,
    Refused,
    RequestConflict,
    SkuExists,
    SoldOut,
    UnknownSku,
)
from ._events import (
    EVENT_FIELDS,
    EventError,
    EventField,
    OrderEvent,
    StockEvent,
    StreamId,
    parse_event,
    parse_events,
)
from ._keys import SaleKeys
from ._room import RoomFigures, RoomSettings, RoomStatus, TicketRefused, WaitingRoom, replay_shuffle
from ._types import ExpiryBatch, Hold, HoldState, Line, Snapshot, StockState
from ._validate import Cart

__all__ = [
    "DEFAULT_HOLD_TTL",
    "EVENT_FIELDS",
    "BucketedInventory",
    "Cart",
    "EventError",
    "EventField",
    "ExpiryBatch",
    "Hold",
    "HoldCancelled",
    "HoldClosed",
    "HoldExpired",
    "HoldNotFound",
    "HoldPaid",
    "HoldState",
    "InsufficientStock",
    "InvalidQuantity",
    "InvalidRequest",
    "Inventory",
    "InventoryError",
    "LimitExceeded",
    "Line",
    "OrderEvent",
    "OutcomeUnknown",
    "Refused",
    "RoomFigures",
    "RoomSettings",
    "RoomStatus",
    "RequestConflict",
    "SaleKeys",
    "SkuExists",
    "Snapshot",
    "SoldOut",
    "StockEvent",
    "StockState",
    "StreamId",
    "TicketRefused",
    "UnknownSku",
    "WaitingRoom",
    "bucket_sale_id",
    "parent_sale_id",
    "parse_event",
    "parse_events",
    "replay_shuffle",
]
