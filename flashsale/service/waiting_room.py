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
  step), rate-limited per buyer and cheap: one Redis round trip, no PostgreSQL;
* the room's settings on ``POST /api/admin/sales`` (``waiting_room``) and the operator's
  switch ``POST /api/admin/sales/{sale}/room``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
from typing import Any

from aiohttp import web

import inventory
from flashsale.service.errors import ApiError
from flashsale.service.http import read_json
from flashsale.service.sales import SaleSettings, iso
from flashsale.service.state import STATE, ServiceState
from flashsale.service.tokens import Buyer

__all__ = [
    "TICKET_HEADER",
    "admit_order",
    "configure_room",
    "mint_ticket",
    "room_spec",
    "routes",
    "verify_ticket",
]

routes = web.RouteTableDef()

#: The header an order carries its ticket in while the sale's room is on.
TICKET_HEADER = "X-Flashsale-Ticket"


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
        # Poll again in about a quarter of the expected wait, 0.5-5 s, jittered by ±20 %.
        base = min(5.0, max(0.5, status.eta_s / 4)) if status.state == "waiting" else 1.0
        if status.state == "pre":
            base = min(5.0, max(0.5, (status.opens_at_ms - status.now_ms) / 4000))
        body["poll_after_ms"] = int(base * 1000 * random.uniform(0.8, 1.2))
    return web.json_response(body)


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
    request: web.Request, state: ServiceState, sale: SaleSettings, buyer: Buyer, request_id: str
) -> None:
    """While the sale's room is on, an order needs its buyer's ticket for this sale, unspent
    or spent on this very request id (a retry)."""
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
        await room_of(state, sale.sale).use(buyer.user, fields["n"], request_id)
    except inventory.TicketRefused as exc:
        if exc.reason == "ticket_expired":
            raise ApiError(401, "ticket_expired", "the ticket lapsed: join the room again") from None
        if exc.reason == "ticket_used":
            raise ApiError(403, "ticket_used", "the ticket was spent on another order (request_id)") from None
        raise ApiError(403, "ticket_invalid", "this ticket no longer admits an order") from None
