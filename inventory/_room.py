"""A stock-aware virtual waiting room in front of a sale.

At an opening more buyers arrive in the first second than there are units. The room
holds them in a queue and lets them through at a configured rate — and, unlike a waiting
room that does not know the stock, never lets through more buyers than there are units
that could still be sold to them, and tells every waiting buyer of a SKU that can no
longer be sold "sold out" on their next poll.

The rules (all in Lua, atomic, in the sale's hash slot — so it works on a Redis Cluster,
survives a restarted service process and is shared by every process):

* **Before T0** buyers join a pre-queue (in arrival order); **at T0** it gets one uniform
  shuffle (Fisher–Yates driven by a Park–Miller generator from a seed recorded in the room,
  so a run can be replayed: :func:`replay_shuffle`); **after T0** buyers join at the back.
  Refreshing early gives no edge; joining again never loses a place.
* **Admission by rate and by stock**: a token bucket admits ``rate`` buyers per second from
  the head of the queue, in queue order, and a buyer is admitted only while, for each SKU
  they asked for, the admitted-but-unused tickets stay below the units available now ×
  ``oversubscribe``. Units in holds that may lapse (and the reserve pool) keep the SKU's
  buyers waiting — not sold out — and admission resumes, in queue order, when they come
  back. Each step looks at a bounded window of the queue's head (200 buyers) so a poll
  stays cheap.
* **The truth, at once**: a SKU that can no longer be sold (nothing available, held or in
  the reserve pool) sends each of its waiting buyers away with "sold out" on their next
  poll — wherever they stand — and the room records how long after it first saw the
  sell-out each buyer heard it.
* **Tickets**: an admitted buyer gets a ticket (a nonce with an expiry); the caller signs
  it (this package holds no secret). :meth:`WaitingRoom.use` binds a ticket to the first
  request id that spends it: retries with that id pass again, any other id is refused.
  A ticket that lapses unused gives its place back; the buyer may join again at the back.

A bucketed sale's stock lives in its buckets' slots, which one script cannot read: the
caller passes the summed counts (``capacities={sku: (could still be sold, available)}``)
and the room then trusts them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import Refused
from ._keys import SaleKeys
from ._scripts import register_room
from ._validate import ident

__all__ = ["RoomSettings", "RoomState", "RoomStatus", "TicketRefused", "WaitingRoom", "replay_shuffle"]

RoomState = Literal["pre", "waiting", "admitted", "used", "expired", "sold_out", "not_in_room", "room_off"]
_STATES = frozenset({"pre", "waiting", "admitted", "used", "expired", "sold_out"})
_MODULUS = 2147483647  # 2^31 - 1, the Park-Miller modulus


@dataclass(frozen=True, slots=True)
class RoomSettings:
    """How a sale's room admits (see the module docstring)."""

    opens_at_ms: int
    rate_per_s: float = 50.0
    oversubscribe: float = 1.0
    ticket_ttl_ms: int = 120_000


@dataclass(frozen=True, slots=True)
class RoomStatus:
    """Where one buyer stands."""

    state: RoomState
    ahead: int = 0  # buyers before them in the queue (waiting only)
    waiting: int = 0  # buyers in the queue
    pre_queue: int = 0  # buyers who joined before T0
    ticket_nonce: str = ""  # set once admitted
    ticket_expires_ms: int = 0
    now_ms: int = 0  # Redis's clock when this was read
    opens_at_ms: int = 0
    rate_per_s: float = 0.0
    told_after_ms: int = -1  # sold out: ms between the room seeing the sell-out and this buyer hearing it

    @property
    def eta_s(self) -> float:
        """A rough wait: the buyers ahead at the admission rate (sooner if stock runs out)."""
        return self.ahead / self.rate_per_s if self.rate_per_s > 0 else 0.0


class TicketRefused(Refused):
    """A ticket that does not admit this order: ``reason`` is ``ticket_invalid``,
    ``ticket_used`` (spent on another request id) or ``ticket_expired``."""

    code = "ticket_refused"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the waiting-room ticket does not admit this order: {reason}", reason=reason)
        self.reason = reason


def _status(reply: Sequence[Any]) -> RoomStatus:
    items = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
    state = items[0]
    if state not in _STATES:
        return RoomStatus(state)  # type: ignore[arg-type]  # not_in_room | room_off
    return RoomStatus(
        state,  # type: ignore[arg-type]
        ahead=int(items[1]),
        waiting=int(items[2]),
        pre_queue=int(items[3]),
        ticket_nonce=items[4],
        ticket_expires_ms=int(float(items[5])),
        now_ms=int(items[6]),
        opens_at_ms=int(float(items[7])),
        rate_per_s=float(items[8]),
        told_after_ms=int(float(items[9])),
    )


def _capacities(capacities: Mapping[str, tuple[int, int]] | None) -> str:
    if capacities is None:
        return ""
    return ",".join(f"{sku}={max(0, int(c))}/{max(0, int(a))}" for sku, (c, a) in capacities.items())


class WaitingRoom:
    """The waiting room of one sale (``sale`` as the engine knows it; for a bucketed sale,
    the parent sale id). ``redis`` is an asyncio redis-py client you own."""

    def __init__(self, redis: Any, sale: str, *, prefix: str = "fs") -> None:
        self.redis = redis
        self.sale = ident(sale, "sale")
        self.keys = SaleKeys(prefix, self.sale)
        self._keys = self.keys.for_room()
        self._scripts = register_room(redis)

    async def configure(self, settings: RoomSettings, *, on: bool = True, seed: int | None = None) -> int:
        """Turn the room on (or off) with ``settings``; returns the shuffle seed in force
        (fixed by the first call: a later seed never re-orders a pre-queue)."""
        seed = seed if seed is not None else secrets.randbelow(_MODULUS - 2) + 1
        reply = await self._scripts["room_configure"](
            keys=self._keys[:1],
            args=[
                "1" if on else "0",
                repr(float(settings.rate_per_s)),
                repr(float(settings.oversubscribe)),
                int(settings.ticket_ttl_ms),
                int(settings.opens_at_ms),
                int(seed),
            ],
        )
        if reply[0] in (b"invalid", "invalid"):
            raise ValueError(f"room settings out of range: {settings} (seed {seed})")
        return int(reply[1])

    async def join(
        self, buyer: str, skus: Sequence[str], *, capacities: Mapping[str, tuple[int, int]] | None = None
    ) -> RoomStatus:
        """``buyer`` joins (or, already in, polls) the queue for ``skus``."""
        buyer = ident(buyer, "user")
        names = [ident(sku, "sku") for sku in skus]
        if not names:
            raise ValueError("a buyer joins the room for at least one SKU")
        reply = await self._scripts["room_join"](
            keys=self._keys, args=[buyer, ",".join(sorted(set(names))), _capacities(capacities)]
        )
        return _status(reply)

    async def poll(
        self, buyer: str, *, capacities: Mapping[str, tuple[int, int]] | None = None
    ) -> RoomStatus:
        """Where ``buyer`` stands; also moves the room one bounded admission step."""
        reply = await self._scripts["room_poll"](
            keys=self._keys, args=[ident(buyer, "user"), _capacities(capacities)]
        )
        return _status(reply)

    async def use(self, buyer: str, nonce: str, request_id: str) -> None:
        """Spend ``buyer``'s ticket on ``request_id`` (again for the same id: fine);
        :class:`TicketRefused` otherwise."""
        reply = await self._scripts["room_use"](
            keys=self._keys, args=[ident(buyer, "user"), nonce, request_id]
        )
        outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if outcome != "ok":
            raise TicketRefused(outcome)

    async def record(self) -> dict[str, Any]:
        """Everything an auditor needs: the room's settings and counters, the pre-queue in
        arrival order, every buyer's record (JSON text) and the waiting queue."""
        room, pre, buyers = await self._read_many()
        return {"room": room, "pre_queue": pre, "buyers": buyers}

    async def _read_many(self) -> tuple[dict[str, str], list[str], dict[str, str]]:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        room = {text(k): text(v) for k, v in (await self.redis.hgetall(self._keys[0])).items()}
        pre = [text(v) for v in await self.redis.lrange(self._keys[1], 0, -1)]
        buyers = {text(k): text(v) for k, v in (await self.redis.hgetall(self._keys[3])).items()}
        return room, pre, buyers


def replay_shuffle(pre_queue: Sequence[str], seed: int) -> list[str]:
    """The order the room gave the pre-queue at T0, recomputed outside Redis from the
    arrival order and the recorded seed (the same Fisher–Yates and Park–Miller steps)."""
    order = list(pre_queue)
    x = seed
    for i in range(len(order), 1, -1):
        x = (x * 16807) % _MODULUS
        j = x % i  # 0-based index of the Lua's (x % i) + 1
        order[i - 1], order[j] = order[j], order[i - 1]
    return order
