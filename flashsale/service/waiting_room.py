"""The waiting room at the HTTP edge: buyers join and poll it, operators switch it, and while
it is on an order needs a ticket the room gave its buyer.

The room itself — the pre-queue and its shuffle at T0, first come first served after,
admission by rate and by stock, "sold out" told on the next poll, tickets spent once — is
``inventory.WaitingRoom`` (Lua, in the sale's hash slot). This module adds what the HTTP
edge owns:

* **signed tickets**: the room hands out a nonce and an expiry; the service signs
  ``{sale, buyer, nonce, expires}`` with HMAC-SHA256 (its token secret, a ``ticket|``
  domain prefix) so a ticket cannot be forged, shared with another buyer or moved to another
  sale — and the room's ``use`` binds it to one order attempt series (its request id);
* **polling answers** that say when to poll next (with jitter, so a crowd does not poll in
  step) — soon enough that a waiting buyer hears a sell-out within a second of it
  (:func:`poll_after_s`) — rate-limited per buyer and cheap: one Redis round trip, no
  PostgreSQL;
* the room's settings on ``POST /api/admin/sales`` (``waiting_room``), the operator's
  switch ``POST /api/admin/sales/{sale}/room``, and the room's record for an audit
  ``GET /api/admin/sales/{sale}/room`` (the seed, the pre-queue in arrival order and every
  buyer's position, admission and told times: enough to replay the shuffle at T0);
* the room's figures as the war room shows them (:func:`room_view`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

from aiohttp import web

import inventory
from flashsale.service.errors import ApiError
from flashsale.service.http import read_json
from flashsale.service.sales import SaleSettings, iso
from flashsale.service.state import STATE, ServiceState
from flashsale.service.tokens import Buyer

__all__ = [
    "EDGE_POLL_S",
    "TICKET_HEADER",
    "admit_order",
    "configure_room",
    "mint_ticket",
    "poll_after_s",
    "room_spec",
    "room_view",
    "routes",
    "settle_ticket",
    "verify_ticket",
]

routes = web.RouteTableDef()
log = logging.getLogger("flashsale.waiting_room")

#: The header an order carries its ticket in while the sale's room is on.
TICKET_HEADER = "X-Flashsale-Ticket"
#: How often a waiting buyer polls once a sell-out of their SKUs could come at any moment
#: (every unit spoken for): at most 1.2 × this apart, so they hear it within a second.
EDGE_POLL_S = 0.6


# ------------------------------------------------------------------- tickets
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), b"ticket|" + payload.encode(), hashlib.sha256).digest())


def mint_ticket(secret: str, *, sale: str, user: str, nonce: str, expires_ms: int) -> str:
    payload = _b64(
        json.dumps({"s": sale, "u": user, "n": nonce, "x": expires_ms}, separators=(",", ":")).encode()
    )
    return f"{payload}.{_sign(secret, payload)}"


def verify_ticket(secret: str, ticket: str) -> dict[str, Any]:
    """The ticket's fields, or ApiError 401 ``ticket_invalid`` if it was not signed here."""
    payload, _, signature = ticket.partition(".")
    try:
        good = hmac.compare_digest(_sign(secret, payload), signature)
        fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))) if good else None
    except (ValueError, TypeError):  # not base64, not JSON, not ASCII
        fields = None
    if (
        not isinstance(fields, dict)
        or not all(isinstance(fields.get(k), str) for k in ("s", "u", "n"))
        or not isinstance(fields.get("x"), int)
    ):
        raise ApiError(401, "ticket_invalid", "the waiting-room ticket is not one this service issued")
    return fields


# --------------------------------------------------------------- room settings
def room_spec(body: dict[str, Any], opens_at_ms: int) -> tuple[inventory.RoomSettings, int | None] | None:
    """The ``waiting_room`` object of a sale body as room settings (and a fixed seed, if
    given), or None when there is none; 422 for anything out of range."""
    spec = body.get("waiting_room")
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise ApiError(422, "invalid_request", "waiting_room is an object (or true)", field="waiting_room")

    def number(name: str, default: float, low: float, high: float) -> float:
        value = spec.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise ApiError(
                422, "invalid_request", f"waiting_room.{name} is a number from {low} to {high}", field=name
            )
        return float(value)

    seed = spec.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 1 <= seed <= 2**31 - 2
    ):
        raise ApiError(422, "invalid_request", "waiting_room.seed is a whole number from 1 to 2147483646")
    settings = inventory.RoomSettings(
        opens_at_ms=opens_at_ms,
        rate_per_s=number("rate_per_s", 50.0, 0.01, 100_000.0),
        oversubscribe=number("oversubscribe", 1.0, 0.0, 100.0),
        ticket_ttl_ms=int(number("ticket_ttl_s", 120.0, 1.0, 3600.0) * 1000),
    )
    return settings, seed


def room_of(state: ServiceState, sale: str) -> inventory.WaitingRoom:
    room = state.rooms.get(sale)
    if room is None:
        room = state.rooms[sale] = inventory.WaitingRoom(state.redis, sale, prefix=state.settings.key_prefix)
    return room


async def configure_room(
    state: ServiceState,
    sale: SaleSettings,
    spec: tuple[inventory.RoomSettings, int | None],
    *,
    on: bool = True,
) -> int:
    """Put ``sale`` behind its room (or take it out); returns the shuffle seed in force."""
    settings, seed = spec
    used = await room_of(state, sale.sale).configure(settings, on=on, seed=seed)
    await state.sales.update(sale.sale, room=1 if on else 0)
    return used


@routes.post("/api/admin/sales/{sale}/room")
async def switch_room(request: web.Request) -> web.Response:
    """The operator's switch: ``{"on": true, "rate_per_s": …}`` (settings as on creation)."""
    from flashsale.service.admin_api import require_admin

    state = require_admin(request)
    body = await read_json(request)
    sale = await state.sales.sale(request.match_info["sale"], fresh=True)
    if sale is None:
        raise ApiError(404, "sale_not_found", "no such sale")
    on = body.get("on", True)
    if not isinstance(on, bool):
        raise ApiError(422, "invalid_request", "on is true or false", field="on")
    spec = room_spec({"waiting_room": {k: v for k, v in body.items() if k != "on"}}, sale.opens_at_ms)
    assert spec is not None
    seed = await configure_room(state, sale, spec, on=on)
    return web.json_response({"sale": sale.sale, "room": on, "seed": seed})


#: A buyer's record in the room (compact JSON in Redis, see inventory's room.lua) -> the
#: names the admin record answers with.
_RECORD_FIELDS = {
    "st": "state",
    "j": "joined_ms",
    "p": "position",
    "a": "admitted_ms",
    "x": "ticket_expires_ms",
    "u": "used_ms",
    "r": "request_id",
    "t": "told_ms",
    "d": "told_after_ms",
}


@routes.get("/api/admin/sales/{sale}/room")
async def room_record(request: web.Request) -> web.Response:
    """The room's record, for an audit after the sale: its settings and seed, the pre-queue
    in arrival order, and every buyer's state, SKUs, position and times (docs/waiting-room.md).
    It reads the whole room: ask after the peak, not during it."""
    from flashsale.service.admin_api import require_admin

    state = require_admin(request)
    sale = await state.sales.sale(request.match_info["sale"], fresh=True)
    if sale is None:
        raise ApiError(404, "sale_not_found", "no such sale")
    record = await room_of(state, sale.sale).record()
    room = record["room"]
    if not room:
        raise ApiError(404, "no_room", f"sale {sale.sale!r} was never put behind a waiting room")
    buyers: dict[str, dict[str, Any]] = {}
    for buyer, raw in record["buyers"].items():
        rec = json.loads(raw)
        entry: dict[str, Any] = {"skus": str(rec.get("s", "")).split(",")}
        entry.update({name: rec[short] for short, name in _RECORD_FIELDS.items() if short in rec})
        if not entry.get("position"):  # a pre-queue buyer has no place until T0 (p = 0)
            entry.pop("position", None)
        buyers[buyer] = entry

    def number(name: str) -> int:
        return int(float(room.get(name, 0)))

    body = {
        "sale": sale.sale,
        "on": room.get("on") == "1",
        "opens_at_ms": number("t0"),
        "rate_per_s": float(room.get("rate", 0)),
        "oversubscribe": float(room.get("factor", 0)),
        "ticket_ttl_ms": number("ttl_ms"),
        "seed": number("seed"),
        "shuffled": room.get("shuffled") == "1",
        "shuffled_n": number("shuffled_n"),
        "counters": {
            name: number(field)
            for name, field in (
                ("joined", "joined"),
                ("admitted", "admits"),
                ("used", "used"),
                ("expired", "expired"),
                ("told_sold_out", "told_sold_out"),
                ("told_max_ms", "told_max_ms"),
            )
        },
        "sold_out_seen_ms": {k[len("soldout:") :]: number(k) for k in room if k.startswith("soldout:")},
        "sold_out_at_ms": await _sold_out_at_ms(state, sale),
        "pre_queue": record["pre_queue"],
        "buyers": buyers,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _sold_out_at_ms(state: ServiceState, sale: SaleSettings) -> dict[str, int] | None:
    """For each SKU sold out now (nothing available, held or in reserve), when its last unit
    was paid, from PostgreSQL's record (exact, unlike when the room first noticed); None
    without a database. Read it once the writer has drained: a payment not yet recorded
    makes the moment look earlier than it was."""
    if state.pg is None:
        return None
    from flashsale.ledger import last_paid_ms

    gone = [
        sku
        for sku, s in (await state.engine(sale).snapshots()).items()
        if s.total and not s.available + s.held + s.reserve
    ]
    if not gone:
        return {}
    paid = await last_paid_ms(state.pg, [p.sale for p in state.engine_parts(sale)])
    return {sku: paid[sku] for sku in gone if sku in paid}


async def room_view(state: ServiceState, sale: str) -> dict[str, Any]:
    """The room's live figures for the war room: queue lengths, counters, and wait and
    told-after percentiles (upper bounds of their histogram buckets)."""
    f = await room_of(state, sale).figures()
    return {
        "on": f.on,
        "waiting": f.waiting,
        "pre_queue": f.pre_queue,
        "tickets_out": f.tickets_out,
        "joined": f.joined,
        "admitted": f.admitted,
        "used": f.used,
        "expired": f.expired,
        "told_sold_out": f.told_sold_out,
        "told_max_ms": f.told_max_ms,
        "wait_p50_ms": _finite(f.wait_quantile_ms(0.5)),
        "wait_p99_ms": _finite(f.wait_quantile_ms(0.99)),
        "told_p99_ms": _finite(f.told_quantile_ms(0.99)),
    }


def _finite(ms: float | None) -> float | None:
    """JSON has no infinity: a quantile in the open top bucket is reported as None."""
    return ms if ms is not None and ms != float("inf") else None


# ---------------------------------------------------------------- buyers
async def _capacities(state: ServiceState, sale: SaleSettings) -> dict[str, tuple[int, int]] | None:
    """A bucketed sale's stock summed over its buckets (one script cannot read them all)."""
    if sale.buckets <= 1:
        return None
    snaps = await state.engine(sale).snapshots()
    return {sku: (s.available + s.held + s.reserve, s.available) for sku, s in snaps.items()}


def _answer(
    state: ServiceState, sale: SaleSettings, buyer: Buyer, status: inventory.RoomStatus
) -> web.Response:
    if status.state == "room_off":
        raise ApiError(409, "room_off", f"sale {sale.sale!r} has no waiting room: order directly")
    if status.state == "not_in_room":
        raise ApiError(404, "not_in_room", "join the room first: POST this URL with the SKUs you want")
    body: dict[str, Any] = {
        "sale": sale.sale,
        "state": status.state,
        "ahead": status.ahead,
        "waiting": status.waiting,
        "pre_queue": status.pre_queue,
        "opens_at": iso(status.opens_at_ms),
        "eta_s": round(status.eta_s, 1),
        "skus": list(status.skus),
    }
    if status.state == "admitted":
        body["ticket"] = mint_ticket(
            state.settings.token_secret or "",
            sale=sale.sale,
            user=buyer.user,
            nonce=status.ticket_nonce,
            expires_ms=status.ticket_expires_ms,
        )
        body["ticket_expires_at"] = iso(status.ticket_expires_ms)
        body["ticket_header"] = TICKET_HEADER
    if status.state == "sold_out":
        body["told_after_ms"] = status.told_after_ms
    if status.state in ("pre", "waiting"):
        body["poll_after_ms"] = int(poll_after_s(status) * 1000)
    return web.json_response(body)


def poll_after_s(status: inventory.RoomStatus) -> float:
    """When a buyer in the pre-queue or the queue should poll again: about a quarter of the
    time to T0 (0.5-5 s) or of the expected wait (``EDGE_POLL_S``-5 s) — but never later
    than the soonest their SKUs could sell out (``sell_out_horizon_s``; ``EDGE_POLL_S`` once
    every unit is spoken for), so a waiting buyer hears "sold out" within a second of it.
    Jittered by ±20 %, so a crowd does not poll in step. The price: a waiting buyer of a SKU
    whose last units are spoken for polls about 1.7 times a second (within the default
    per-buyer poll limit of 2) until they are sold or come back."""
    if status.state == "pre":
        base = min(5.0, max(0.5, (status.opens_at_ms - status.now_ms) / 4000))
    else:
        base = min(5.0, max(EDGE_POLL_S, status.eta_s / 4))
        # The jitter may stretch the wait by a fifth: keep even that before the horizon.
        base = min(base, max(EDGE_POLL_S, status.sell_out_horizon_s / 1.2))
    return base * random.uniform(0.8, 1.2)


async def _room_request(request: web.Request) -> tuple[ServiceState, SaleSettings, Buyer]:
    from flashsale.service.buyer_api import buyer_of

    state = request.app[STATE]
    buyer = buyer_of(request, state)
    if not state.room_polls.allow(buyer.user):
        raise ApiError(
            429, "poll_too_often", "poll when the last answer said to", headers={"Retry-After": "1"}
        )
    sale = await state.sales.sale(request.match_info["sale"])
    if sale is None:
        raise ApiError(404, "sale_not_found", "no such sale")
    if sale.fenced:
        raise ApiError(503, "sale_fenced", f"sales are paused: {sale.fenced}", headers={"Retry-After": "5"})
    return state, sale, buyer


@routes.post("/api/sales/{sale}/room")
async def join_room(request: web.Request) -> web.Response:
    state, sale, buyer = await _room_request(request)
    body = await read_json(request)
    skus = body.get("skus")
    if (
        not isinstance(skus, list)
        or not 1 <= len(skus) <= 20
        or not all(isinstance(s, str) and s and len(s) <= 64 for s in skus)
    ):
        raise ApiError(422, "invalid_request", "skus is a list of 1 to 20 SKU ids", field="skus")
    for sku in skus:
        if await state.sales.sale_of_sku(sku) != sale.sale:
            raise ApiError(422, "unknown_sku", f"SKU {sku!r} is not on sale {sale.sale!r}", sku=sku)
    status = await room_of(state, sale.sale).join(buyer.user, skus, capacities=await _capacities(state, sale))
    return _answer(state, sale, buyer, status)


@routes.get("/api/sales/{sale}/room")
async def poll_room(request: web.Request) -> web.Response:
    state, sale, buyer = await _room_request(request)
    status = await room_of(state, sale.sale).poll(buyer.user, capacities=await _capacities(state, sale))
    return _answer(state, sale, buyer, status)


# ---------------------------------------------------------------- the order gate
async def admit_order(
    request: web.Request,
    state: ServiceState,
    sale: SaleSettings,
    buyer: Buyer,
    request_id: str,
    skus: Sequence[str] = (),
) -> None:
    """While the sale's room is on, an order needs its buyer's ticket for this sale, unspent
    or spent on this very request id (a retry), for SKUs the buyer queued for. Once the
    order has reserved its units, or was refused, call :func:`settle_ticket`."""
    ticket = request.headers.get(TICKET_HEADER, "")
    if not ticket:
        raise ApiError(
            401,
            "ticket_required",
            f"sale {sale.sale!r} is behind a waiting room: join it (POST /api/sales/{sale.sale}/room) "
            f"and send the ticket it gives you in {TICKET_HEADER}",
        )
    fields = verify_ticket(state.settings.token_secret or "", ticket)
    if fields["u"] != buyer.user or fields["s"] != sale.sale:
        raise ApiError(403, "ticket_not_yours", "this ticket was issued to another buyer or for another sale")
    try:
        await room_of(state, sale.sale).use(buyer.user, fields["n"], request_id, skus)
    except inventory.TicketRefused as exc:
        if exc.reason == "ticket_expired":
            raise ApiError(401, "ticket_expired", "the ticket lapsed: join the room again") from None
        if exc.reason == "ticket_used":
            raise ApiError(403, "ticket_used", "the ticket was spent on another order (request_id)") from None
        if exc.reason == "ticket_other_sku":
            raise ApiError(
                403, "ticket_not_for_sku", "the ticket admits orders of the SKUs you queued for, not others"
            ) from None
        raise ApiError(403, "ticket_invalid", "this ticket no longer admits an order") from None


async def settle_ticket(state: ServiceState, sale: SaleSettings, buyer: Buyer, request_id: str) -> None:
    """The order has reserved its units (or was refused): its ticket stops counting against
    the stock. Never raises — the order's answer stands; a ticket not settled is released
    at its expiry (the room admits more slowly meanwhile, never too many)."""
    try:
        await room_of(state, sale.sale).settle(buyer.user, request_id)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning(
            "waiting room of %s: ticket of %s not settled; it is released at its expiry",
            sale.sale,
            buyer.user,
        )
