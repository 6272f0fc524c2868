"""Buyers' endpoints: the product page, placing an order (the hot path), looking it up,
paying and cancelling.

Admission, in this order, on every buyer endpoint: the token (401), one of the buyer's
few turns (429 ``too_many_in_progress``), the body read under the read deadline (408) and
checked (4xx) — and only then, for orders, the rate limit and one of the process's
in-flight slots (429 ``overloaded``). So a slow or hostile client holds at most its own
turns, never the slots every other buyer's order needs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

import inventory
from flashsale.ledger import archived_order
from flashsale.service.errors import ApiError
from flashsale.service.http import bearer, json_answer, read_json
from flashsale.service.sales import SaleSettings, iso, now_ms
from flashsale.service.state import STATE, ServiceState
from flashsale.service.tokens import Buyer, InvalidToken
from flashsale.service.waiting_room import admit_order, settle_ticket

log = logging.getLogger("flashsale.service")

__all__ = ["routes", "read_json", "bearer"]

routes = web.RouteTableDef()


def buyer_of(request: web.Request, state: ServiceState) -> Buyer:
    try:
        return state.identity.buyer(bearer(request))
    except InvalidToken as exc:
        raise ApiError(
            401, "unauthorized", f"{exc}: get a new token", headers={"WWW-Authenticate": "Bearer"}
        ) from None


@contextlib.contextmanager
def buyer_turn(state: ServiceState, buyer: Buyer) -> Iterator[None]:
    """One of the buyer's turns for the request, or 429 ``too_many_in_progress``."""
    if not state.buyers.take(buyer.user):
        raise _too_many_in_progress(state)
    try:
        yield
    finally:
        state.buyers.give_back(buyer.user)


def _too_many_in_progress(state: ServiceState) -> ApiError:
    return ApiError(
        429,
        "too_many_in_progress",
        f"this buyer already has {state.buyers.limit} requests in progress; "
        "wait for their answers before sending more",
        headers={"Retry-After": "1"},
    )


def _cart(body: dict[str, Any]) -> list[inventory.Line] | str:
    """Accept {"lines": [{"sku", "qty"}]} or the one-SKU short form {"sku", "qty"}."""
    if "lines" in body:
        lines = body["lines"]
        if not isinstance(lines, list):
            raise ApiError(
                422, "invalid_request", '\'lines\' must be a list of {"sku", "qty"}', field="lines"
            )
    elif "sku" in body:
        sku, qty = body["sku"], body.get("qty", 1)
        if isinstance(sku, str) and type(qty) is int and qty == 1:
            return sku  # one unit of one SKU: the engine keeps that cart per SKU
        lines = [{"sku": sku, "qty": qty}]
    else:
        raise ApiError(
            422, "invalid_request", "give 'lines' (a list of {\"sku\", \"qty\"}) or 'sku'", field="lines"
        )
    cart = []
    for line in lines:
        if not isinstance(line, dict) or not isinstance(line.get("sku"), str):
            raise ApiError(
                422, "invalid_request", 'each line is {"sku": string, "qty": integer}', field="lines"
            )
        qty = line.get("qty", 1)
        if not isinstance(qty, int) or isinstance(qty, bool):
            raise ApiError(422, "invalid_quantity", "qty must be a whole number", field="qty")
        cart.append(inventory.Line(line["sku"], qty))
    return cart


def order_json(hold: inventory.Hold, *, status: int = 200) -> web.Response:
    # orjson writes the state (a str enum) as its value and each line (a dataclass) as
    # {"sku", "qty"}: no per-order copies of them. The sale is the hold id's own prefix
    # (the engine makes every hold id ``<sale>.<random>``).
    body = {
        "order_id": hold.hold_id,
        "status": hold.state,
        "sale": hold.hold_id.partition(".")[0],
        "lines": list(hold.lines),
        "pay_by": iso(hold.deadline_ms),
        "pay_by_ms": hold.deadline_ms,
        "created_ms": hold.created_ms,
        "request_id": hold.request_id,
        "replayed": hold.replayed,
    }
    return json_answer(body, status=status)


@routes.get("/api/skus/{sku}")
async def get_sku(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not (await state.sales.switches())["browse"]:
        raise ApiError(
            503,
            "degraded",
            "product pages are switched off during the peak; ordering still works",
            headers={"Retry-After": "5"},
        )
    sku = request.match_info["sku"]
    cached = state.sku_cache.get(sku)
    if cached is not None and cached[0] > time.monotonic():
        return json_answer(cached[1])
    # Viewers arriving while the page is being read wait for that read: a lapsed cache at
    # the peak costs one read of the stock (64 on a 64-bucket SKU), not one per viewer.
    return json_answer(await state.page_loads.load(sku, lambda: _product_page(state, sku)))


async def _product_page(state: ServiceState, sku: str) -> dict[str, Any]:
    sale = await state.sales.sale_of_sku(sku)
    settings = await state.sales.sale(sale) if sale else None
    if sale is None or settings is None:
        raise ApiError(404, "unknown_sku", f"no SKU {sku!r} is on sale", sku=sku)
    snap = await state.engine(settings).snapshot(sku)
    if snap is None:
        raise ApiError(404, "unknown_sku", f"no SKU {sku!r} is on sale", sku=sku)
    body = {
        "sku": sku,
        "sale": sale,
        "state": snap.state.value,
        "available": snap.available,
        "opens_at": iso(settings.opens_at_ms),
        "open": settings.state != "closed" and now_ms() >= settings.opens_at_ms,
    }
    state.sku_cache[sku] = (time.monotonic() + state.settings.sku_cache_s, body)
    return body


@routes.post("/api/orders")
async def create_order(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = time.perf_counter()
    try:
        buyer = buyer_of(request, state)
        # buyer_turn's work, spelled out: the hot path skips a generator per order.
        if not state.buyers.take(buyer.user):
            state.metrics.count("rate_limited")
            raise _too_many_in_progress(state)
        try:
            return await _create_order(request, state, buyer)
        finally:
            state.buyers.give_back(buyer.user)
    finally:
        state.metrics.observe("orders", time.perf_counter() - started)


async def _create_order(request: web.Request, state: ServiceState, buyer: Buyer) -> web.Response:
    metrics = state.metrics
    try:
        body = await read_json(request)
        lines = _cart(body)
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise ApiError(
                422,
                "invalid_request",
                "request_id (a string you choose, reused on retries) is required",
                field="request_id",
            )
        # Checked once: the engine takes the Cart it returns as checked.
        cart = inventory.Inventory.check_reserve(buyer.user, lines, request_id)
    except (ApiError, inventory.InvalidRequest):
        metrics.count("invalid")
        raise
    if not state.rate.allow(buyer.user):
        metrics.count("rate_limited")
        raise ApiError(
            429, "rate_limited", "too many orders from this buyer; slow down", headers={"Retry-After": "1"}
        )
    if not state.in_flight.enter():
        metrics.count("shed")
        # A 4xx: concurrency is what clients send (RFC 6585), not a fault of the service.
        raise ApiError(
            429,
            "overloaded",
            "the service is at capacity (too many orders in progress); "
            "retry after Retry-After seconds with the same request_id",
            headers={"Retry-After": "1"},
        )
    try:
        settings = await _open_sale(state, buyer, cart)
        if not settings.room:
            return await _reserve(request, state, settings, buyer, cart, request_id)
        # Behind the sale's waiting room: the buyer's ticket first.
        try:
            await admit_order(request, state, settings, buyer, request_id, [line.sku for line in cart])
        except ApiError:
            metrics.count("no_ticket")
            raise
        try:
            return await _reserve(request, state, settings, buyer, cart, request_id)
        finally:  # reserved or refused: the ticket stops counting against the stock
            await settle_ticket(state, settings, buyer, request_id)
    finally:
        state.in_flight.leave()


async def _open_sale(state: ServiceState, buyer: Buyer, cart: inventory.Cart) -> SaleSettings:
    """The one sale every line of the cart is from, open to this buyer now, or the answer
    saying why not. Read from what the sale book holds (no wait, nearly every order)."""
    metrics, book = state.metrics, state.sales
    sale: str | None = None
    spans = False
    for line in cart:
        of_line = book.cached_sale_of_sku(line.sku) or await book.sale_of_sku(line.sku)
        if of_line is None:
            metrics.count("invalid")
            raise ApiError(422, "unknown_sku", f"no SKU {line.sku!r} is on sale", sku=line.sku)
        if sale is None:
            sale = of_line
        elif of_line != sale:
            spans = True
    if sale is None or spans:
        metrics.count("invalid")
        raise ApiError(422, "cart_spans_sales", "every line of one order must come from the same sale")
    settings = book.cached_sale(sale) or await book.sale(sale)
    if settings is None:
        metrics.count("invalid")
        raise ApiError(422, "unknown_sku", f"sale {sale!r} no longer exists")
    if settings.fenced:
        metrics.count("fenced")
        raise ApiError(
            503, "sale_fenced", f"sales are paused: {settings.fenced}", headers={"Retry-After": "5"}
        )
    if settings.state == "closed":
        metrics.count("not_open")
        raise ApiError(409, "sale_closed", f"sale {sale!r} is closed")
    if settings.state != "open" and now_ms() < settings.opens_for(buyer.member):
        metrics.count("not_open")
        raise ApiError(
            409,
            "sale_not_open",
            f"sale {sale!r} opens at {iso(settings.opens_at_ms)}",
            opens_at=iso(settings.opens_at_ms),
            opens_at_ms=settings.opens_at_ms,
        )
    return settings


async def _reserve(
    request: web.Request,
    state: ServiceState,
    settings: SaleSettings,
    buyer: Buyer,
    cart: inventory.Cart,
    request_id: str,
) -> web.Response:
    metrics, sale = state.metrics, settings.sale
    state.sold_out.observe_epoch(sale, settings.epoch, settings.generation)
    # Not behind a waiting room, which admits a buyer only when a unit is there: a stale
    # "sold out" would refuse them.
    cached_out = None
    if not settings.room:
        for line in cart:
            if state.sold_out.is_sold_out(sale, line.sku):
                cached_out = line.sku
                break
    inv = state.engine(settings)
    try:
        # One timer for every order's deadline, not one per order (nor a task, as wait_for);
        # entered without the two coroutines of ``async with``.
        with state.redis_deadline():
            # The sold-out shortcut refuses without running the reserve script, but not a
            # retry whose first answer was lost (a 504, a cut connection) and whose hold
            # exists: one read of the buyer's own idempotency record tells them apart,
            # whatever headers the client sends.
            if cached_out is not None and not await inv.made_hold(buyer.user, request_id):
                metrics.count("sold_out")
                raise ApiError(
                    409, "sold_out", f"SKU {cached_out!r} is sold out", sku=cached_out, available=0
                )
            hold = await inv.reserve(buyer.user, cart, request_id=request_id)
    except TimeoutError:
        metrics.count("unknown")
        raise ApiError(
            504,
            "outcome_unknown",
            "Redis did not answer in time: the order may or may not exist. "
            "Retry with the same request_id to learn the outcome.",
            request_id=request_id,
        ) from None
    except inventory.SoldOut as exc:
        if exc.available == 0:
            state.sold_out.mark(sale, exc.sku)
        metrics.count("sold_out")
        raise
    except inventory.LimitExceeded:
        metrics.count("limit_exceeded")
        raise
    except inventory.OutcomeUnknown:
        metrics.count("unknown")
        raise
    except inventory.InvalidRequest:
        metrics.count("invalid")
        raise
    metrics.count("replayed" if hold.replayed else "created")
    return order_json(hold, status=201)


async def _order_id(request: web.Request, state: ServiceState) -> tuple[str, SaleSettings]:
    """The order id and its sale; 404 unless the sale exists (so a made-up id never
    makes this process build state for a sale nobody created). Orders of a sale split
    into buckets name their bucket (``<sale>-b<k>.<random>``)."""
    order_id = request.match_info["order_id"]
    try:
        sale: str | None = inventory.Inventory.sale_of(order_id)
    except inventory.InvalidRequest:
        sale = None
    settings = await state.sales.sale(sale) if sale else None
    if settings is None and sale is not None:
        parent = inventory.BucketedInventory.parent_of(sale)
        if parent is not None:
            settings = await state.sales.sale(parent[0])
            if settings is not None and parent[1] >= settings.buckets:
                settings = None
    if settings is None:
        raise ApiError(404, "order_not_found", "no such order")
    return order_id, settings


@routes.get("/api/orders/{order_id}")
async def get_order(request: web.Request) -> web.Response:
    state = request.app[STATE]
    buyer = buyer_of(request, state)
    with buyer_turn(state, buyer):
        return await _get_order(request, state, buyer)


async def _get_order(request: web.Request, state: ServiceState, buyer: Buyer) -> web.Response:
    if not (await state.sales.switches())["order_lookup"]:
        raise ApiError(
            503,
            "degraded",
            "order lookup is switched off during the peak; your order is safe",
            headers={"Retry-After": "5"},
        )
    order_id, sale = await _order_id(request, state)
    try:
        hold = await state.engine(sale).hold(order_id)
    except inventory.InvalidRequest:
        hold = None
    if hold is None and state.pg is not None:
        hold = await _archived_order(state, order_id)
    if hold is None or hold.user != buyer.user:
        raise ApiError(404, "order_not_found", "no such order")
    return order_json(hold)


async def _archived_order(state: ServiceState, order_id: str) -> inventory.Hold | None:
    """An order Redis no longer has (its sale was archived) as PostgreSQL recorded it: None
    only when PostgreSQL answered that it has no such order. PostgreSQL not answering within
    the look-up's deadline (a full pool, a connect or a query that hangs) or failing is an
    outage, answered 503 - never "no such order" to a buyer whose order may well exist."""
    deadline = state.archive_deadline
    try:
        async with deadline():
            order = await archived_order(state.pg, order_id, timeout=deadline.seconds)
    except Exception as exc:  # the deadline's TimeoutError, asyncpg's errors, OSError
        log.warning("order archive (PostgreSQL) did not answer for %s: %r", order_id, exc)
        raise ApiError(
            503,
            "archive_unavailable",
            "the order archive is not answering, so whether this order exists is not known here; "
            "try again shortly",
            headers={"Retry-After": "5"},
        ) from None
    if order is None:
        return None
    return inventory.Hold(
        hold_id=order_id,
        user=order.user,
        lines=tuple(inventory.Line(sku, qty) for sku, qty in order.lines),
        state=inventory.HoldState(order.status),
        deadline_ms=int(order.pay_by.timestamp() * 1000),
        created_ms=int(order.created_at.timestamp() * 1000),
        request_id=order.request_id,
    )


@routes.post("/api/orders/{order_id}/pay")
async def pay_order(request: web.Request) -> web.Response:
    return await _close_order(request, pay=True)


@routes.post("/api/orders/{order_id}/cancel")
async def cancel_order(request: web.Request) -> web.Response:
    return await _close_order(request, pay=False)


async def _close_order(request: web.Request, *, pay: bool) -> web.Response:
    state = request.app[STATE]
    buyer = buyer_of(request, state)
    with buyer_turn(state, buyer):
        order_id, sale = await _order_id(request, state)
        if sale.fenced:
            # The fence's flag in Redis, as orders check it: the in-process guard alone
            # does not see a fence raised by another process or by `flashsale recover`.
            raise ApiError(
                503,
                "sale_fenced",
                f"sales are paused: {sale.fenced}",
                headers={"Retry-After": "5"},
                sale=sale.sale,
            )
        inv = state.engine(sale)
        try:
            if pay:
                hold = await inv.confirm(order_id, user=buyer.user)
            else:
                hold = await inv.release(order_id, user=buyer.user)
        except inventory.InvalidRequest:
            # Not an order id at all (too long, odd characters): as for GET, no such order.
            raise ApiError(404, "order_not_found", "no such order") from None
    return json_answer({"order_id": hold.hold_id, "status": hold.state.value})
