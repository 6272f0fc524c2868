"""flashsale's personas: browsers, buyers, abandoners, bots/scalpers and retry-storm clients,
written as visits of the kit (``loadtests.visits``) against flashsale's HTTP API.

Each arrival becomes one visit by one persona, drawn by weight (``DEFAULT_WEIGHTS``; before
T0 only browsers make sense, at the T0 rendezvous everyone who waited places an order:
``KINDS``). What the visits share in one process (the catalogue, the buyers' tokens, the
knobs) is a ``Shop``, the process setup's result (``visit.state``).

- **browser**: loads the product page (``GET /api/skus/{sku}``).
- **buyer**: orders, thinks, pays.
- **abandoner**: orders and never pays: the hold lapses and the unit is sold again.
- **bot**: a scalper's script: no think time, a burst of orders on the hot SKU from a few
  accounts, some asking for more than the per-user limit; pays at once for what it got.
- **retry_storm**: an impatient client with a short timeout that retries what it did not
  hear back about — immediately, or with exponential backoff and full jitter — and
  sometimes submits twice after success; every retry reuses the request id.

Every order carries a request id (the history's idempotency key). An expected "sold out"
(409) or "limit reached" (429 ``limit_exceeded``) is a success for the error ratio: the
service answered correctly (``classify``).

**Behind the waiting room** (``Shop.room``, the drill's ``--waiting-room``) the personas do
what real buyers and bots do there (docs/waiting-room.md):

- buyers, abandoners and retry-storm clients join the room for the SKU they want, poll it
  when each answer says (``poll_after_ms``), and order with the ticket it gives them —
  or leave when told "sold out"; a buyer shares a used ticket now and then (a forum post);
- a browser who arrives before T0 finds the product page is the room's pre-queue: most join
  it (``Behaviour.early_join``) and buy as buyers do once admitted;
- bots try to skip the room: orders with no ticket, a forged one, or one a buyer shared —
  each must be refused (401/403), which the oracle checks (``loadtests.room``).

Every room answer and every order there carries the service's account name (``account``)
and, for orders, which ticket went with it (``ticket``: ``own``, ``none``, ``forged``,
``borrowed``), so the oracle can hold them against the room's record.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loadtests.room import ROOM_OPERATIONS
from loadtests.shapes import WindowKind
from loadtests.visits import Call, Visit

__all__ = [
    "DEFAULT_WEIGHTS",
    "KINDS",
    "PERSONAS",
    "VISITS",
    "Behaviour",
    "Catalogue",
    "CatalogueItem",
    "OrderOutcome",
    "RoomVisits",
    "Shop",
    "backoff_delays",
    "classify",
    "order_outcome",
]

PERSONAS = ("browser", "buyer", "abandoner", "bot", "retry_storm")
#: Relative weights of the personas after T0 (``--personas`` overrides them).
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "browser": 45,
    "buyer": 25,
    "abandoner": 15,
    "bot": 10,
    "retry_storm": 5,
}
#: Windows each persona arrives in: browsers refresh the page before T0, buyers wait for it.
KINDS: Mapping[str, tuple[WindowKind, ...]] = {
    "browser": ("countdown", "open", "idle"),
    **dict.fromkeys(PERSONAS[1:], ("rendezvous", "open", "idle")),
}
RetryMode = Literal["immediate", "backoff", "mixed"]
#: ok: the service acknowledged (2xx); failed: it definitely did not act; unknown: no answer.
OrderOutcome = Literal["ok", "failed", "unknown"]

#: Answers that are the service doing its job, per request name; everything else is an error.
_EXPECTED: dict[str, set[tuple[int, str]]] = {
    "order": {
        (201, ""),
        (409, "sold_out"),
        (429, "limit_exceeded"),
        (409, "sale_not_open"),
        (409, "sale_closed"),
    },
    "pay": {(200, ""), (409, "hold_expired"), (409, "hold_cancelled")},
    "browse": {(200, ""), (503, "degraded")},
    # The waiting room: a poll sooner than the last answer said is turned away, rightly.
    **dict.fromkeys(ROOM_OPERATIONS, {(200, ""), (429, "poll_too_often")}),
}
# Behind the room, an admitted buyer's ticket may lapse or be spent by the same account in
# another visit (another tab): the service is right to say so.
_EXPECTED["order"] |= {(401, "ticket_expired"), (403, "ticket_used")}
#: Personas that hammer on purpose: being rate limited is the expected answer for them.
_RATE_LIMIT_EXPECTED = {"bot", "retry_storm"}
#: How the room turns away a bot's order: no ticket, a forged one, another buyer's.
_SKIP_REFUSED = {(401, "ticket_required"), (401, "ticket_invalid"), (403, "ticket_not_yours")}
#: The header an order carries its ticket in, unless the room's answer names another.
TICKET_HEADER = "X-Flashsale-Ticket"


def classify(name: str, persona: str, status: int, code: str = "") -> bool:
    """True when an answer is expected (counts as success for the error ratio)."""
    code = "" if 200 <= status < 300 else code
    if (status, code) in _EXPECTED.get(name, set()):
        return True
    if persona == "bot" and name == "order" and (status, code) in _SKIP_REFUSED:
        return True
    return status == 429 and code == "rate_limited" and persona in _RATE_LIMIT_EXPECTED


def order_outcome(status: int) -> OrderOutcome:
    """What an order answer tells the oracle: acknowledged, definitely not, or not known.

    A 504 ``outcome_unknown``, any other 5xx but a 503 (which the service only sends when
    it refused before deciding) and no answer at all are unknown: the order may exist.
    """
    if 200 <= status < 300:
        return "ok"
    if 400 <= status < 500 or status == 503:
        return "failed"
    return "unknown"


def backoff_delays(rng: random.Random, retries: int, base_s: float, cap_s: float) -> list[float]:
    """Exponential backoff with full jitter: delay k is uniform in [0, min(cap, base·2^k)]."""
    return [rng.uniform(0.0, min(cap_s, base_s * (2**k))) for k in range(retries)]


@dataclass(frozen=True)
class Behaviour:
    """Knobs of the personas (think times in seconds)."""

    think_min_s: float = 0.5
    think_max_s: float = 3.0
    buyer_users: int = 2000
    bot_users: int = 20
    bot_burst: int = 5
    retries: int = 4
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0
    retry_mode: RetryMode = "mixed"
    duplicate_submit: float = 0.3
    browse_first: float = 0.5
    #: Behind the room: the share of browsers arriving before T0 who join its pre-queue, and
    #: of buyers who share their ticket once they have used it.
    early_join: float = 0.8
    share_ticket: float = 0.3


@dataclass(frozen=True)
class CatalogueItem:
    sku: str
    weight: float
    limit_per_user: int = 1


@dataclass(frozen=True)
class Catalogue:
    """The SKUs on sale and how demand spreads over them; ``hot`` is what bots go for."""

    items: tuple[CatalogueItem, ...]
    hot: str

    def pick(self, rng: random.Random) -> CatalogueItem:
        return rng.choices(self.items, weights=[i.weight for i in self.items])[0]

    def item(self, sku: str) -> CatalogueItem:
        return next(i for i in self.items if i.sku == sku)


@dataclass(frozen=True)
class RoomVisits:
    """The sale's waiting room as the personas use it: ``sale``, and the prefix that makes a
    persona's user (``buyer-7``) the service's account (``<prefix>buyer-7``)."""

    sale: str
    account_prefix: str = ""

    @property
    def path(self) -> str:
        return f"/api/sales/{self.sale}/room"


@dataclass(frozen=True)
class Shop:
    """What one process's visits share: the sale's catalogue, the buyers' tokens, the knobs."""

    catalogue: Catalogue
    tokens: Mapping[str, str]
    behaviour: Behaviour = field(default_factory=Behaviour)
    #: The retry-storm clients' timeout in seconds (they retry what they did not hear back about).
    impatient_timeout_s: float = 0.25
    #: The sale's waiting room, when the drill put the sale behind one.
    room: RoomVisits | None = None
    #: Tickets buyers shared after using them (bots try them): (account, ticket).
    shared_tickets: list[tuple[str, str]] = field(default_factory=list)


def _shop(visit: Visit) -> Shop:
    shop = visit.state
    assert isinstance(shop, Shop), "flashsale's personas need the Shop from the process setup"
    return shop


def _auth(shop: Shop, user: str) -> dict[str, str]:
    token = shop.tokens.get(user)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _settle(call: Call, persona: str, *, impatient: bool = False, **value: Any) -> None:
    """Report a non-2xx answer by flashsale's rules (2xx answers are reported by the caller)."""
    expected = classify(call.name, persona, call.status, call.code)
    if call.name == "order":
        outcome = order_outcome(call.status)
    else:
        outcome = "failed" if 400 <= call.status < 500 or call.status == 503 else "unknown"
    if outcome == "failed":
        call.refused(call.code or str(call.status), expected=expected, **value)
    elif not call.status and impatient:
        # The client gave up by its own choice (it retries): slow, and the latency says so,
        # but not a wrong answer from the service, so not in the error ratio.
        call.unknown("impatient_timeout", expected=True, **value)
    else:
        call.unknown(call.code, expected=expected, **value)


# -- requests ----------------------------------------------------------------------------------
def _browse(visit: Visit, sku: str) -> None:
    # Page views are counted and timed, not written to the history (they change nothing).
    call = visit.get(f"/api/skus/{sku}", name="browse", history=False)
    if call.status == 200:
        call.ok()
    else:
        _settle(call, visit.persona)


@dataclass(frozen=True)
class _Ticket:
    """What goes with an order behind the room: the ticket (None: none), its header, and
    which kind it is for the history (``own``, ``none``, ``forged``, ``borrowed``); for an
    own ticket, the SKU it admits (the account may have queued for another in another tab)."""

    kind: str
    ticket: str | None = None
    header: str = TICKET_HEADER
    sku: str | None = None


def _order(
    visit: Visit,
    user: str,
    sku: str,
    qty: int,
    rid: str,
    *,
    attempt: int = 0,
    impatient: bool = False,
    ticket: _Ticket | None = None,
) -> tuple[Call, str | None]:
    """One order request; returns the call and the acknowledged order id (None if not)."""
    shop = _shop(visit)
    headers = _auth(shop, user)
    room: dict[str, Any] = {}
    if shop.room is not None:
        room = {"account": shop.room.account_prefix + user, "ticket": ticket.kind if ticket else "none"}
        if ticket is not None and ticket.ticket is not None:
            headers[ticket.header] = ticket.ticket
    call = visit.post(
        "/api/orders",
        name="order",
        key=rid,
        json={"request_id": rid, "sku": sku, "qty": qty},
        headers=headers,
        timeout=shop.impatient_timeout_s if impatient else None,
    )
    body = call.body if isinstance(call.body, Mapping) else {}
    if order_outcome(call.status) == "ok":
        order = str(body["order_id"]) if body.get("order_id") is not None else None
        call.ok(
            order=order,
            item=sku,
            units=qty,
            replayed=bool(body.get("replayed", False)),
            user=user,
            attempt=attempt,
            pay_by_ms=body.get("pay_by_ms"),
            **room,
        )
        return call, order
    _settle(call, visit.persona, impatient=impatient, user=user, attempt=attempt, **room)
    return call, None


# -- the waiting room ------------------------------------------------------------------------
def _room_answer(visit: Visit, call: Call, user: str, sku: str) -> tuple[str, float, _Ticket | None]:
    """Report one answer of the room; returns the state ("" when there was none), how long
    to wait before asking again, and the ticket once admitted."""
    room = _shop(visit).room
    assert room is not None
    account = room.account_prefix + user
    body = call.body if isinstance(call.body, Mapping) else {}
    if call.status == 200:
        state = str(body.get("state", ""))
        poll = body.get("poll_after_ms")
        # What the room says the account queues for (joining again for another SKU keeps it).
        skus = [str(x) for x in body.get("skus") or [sku]]
        call.ok(item=skus[0], account=account, skus=skus, state=state, poll_after_ms=poll)
        ticket = None
        if state == "admitted" and isinstance(body.get("ticket"), str):
            header = str(body.get("ticket_header") or TICKET_HEADER)
            ticket = _Ticket("own", body["ticket"], header, skus[0])
        return state, (float(poll) / 1000 if isinstance(poll, int | float) else 1.0), ticket
    _settle(call, visit.persona, account=account, item=sku)
    return "", 1.0, None


def _wait_in_room(visit: Visit, user: str, sku: str) -> _Ticket | None:
    """Join the room for ``sku`` and poll when each answer says until admitted (the ticket),
    or sent away: sold out, the account's ticket already used, or a room that keeps failing."""
    shop = _shop(visit)
    assert shop.room is not None
    path, headers = shop.room.path, _auth(shop, user)

    def join() -> Call:
        return visit.post(path, name="room_join", json={"skus": [sku]}, headers=headers)

    call = join()
    failures = 0
    while True:
        state, wait_s, ticket = _room_answer(visit, call, user, sku)
        if ticket is not None:
            return ticket
        if state in ("sold_out", "used", "admitted"):
            return None
        failures = failures + 1 if not state else 0
        if failures > 10 or (not state and call.status not in (0, 404, 429) and call.status < 500):
            return None
        visit.sleep(wait_s)
        if state == "expired" or call.status == 404:  # the ticket lapsed, or not (yet) in: join
            call = join()
        else:
            call = visit.get(path, name="room_poll", headers=headers)


def _through_the_room(visit: Visit, user: str, sku: str) -> tuple[str, _Ticket | None] | None:
    """The SKU to order and the ticket to order it with: at once when the sale has no room;
    behind one, once admitted (the SKU the room admitted the account for). None: sent away."""
    if _shop(visit).room is None:
        return sku, None
    ticket = _wait_in_room(visit, user, sku)
    if ticket is None:
        return None
    return ticket.sku or sku, ticket


def _share(shop: Shop, rng: random.Random, user: str, ticket: _Ticket) -> None:
    """Now and then a buyer posts their used ticket somewhere bots read."""
    if shop.room is not None and ticket.ticket and rng.random() < shop.behaviour.share_ticket:
        shop.shared_tickets.append((shop.room.account_prefix + user, ticket.ticket))
        del shop.shared_tickets[:-100]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forged(shop: Shop, rng: random.Random, account: str) -> _Ticket:
    """A ticket for ``account`` the service never signed: a shared one with its buyer changed
    (the signature kept), or one made up from the documented format."""
    assert shop.room is not None
    if shop.shared_tickets:
        _, real = rng.choice(shop.shared_tickets)
        payload, _, signature = real.partition(".")
        try:
            fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            fields = {}
        if isinstance(fields, dict):
            return _Ticket("forged", f"{_b64(json.dumps({**fields, 'u': account}).encode())}.{signature}")
    made_up = {"s": shop.room.sale, "u": account, "n": str(rng.randrange(1, 10**6)), "x": 2**42}
    return _Ticket("forged", f"{_b64(json.dumps(made_up).encode())}.{_b64(rng.randbytes(32))}")


def _skip_the_room(visit: Visit, user: str, sku: str, k: int) -> _Ticket:
    """A bot's k-th try at ordering past the room: no ticket, a forged one, another's."""
    shop = _shop(visit)
    assert shop.room is not None
    account = shop.room.account_prefix + user
    kind = ("none", "forged", "borrowed")[k % 3]
    if kind == "borrowed" and shop.shared_tickets:
        return _Ticket("borrowed", visit.rng.choice(shop.shared_tickets)[1])
    if kind == "none":
        return _Ticket("none")
    return _forged(shop, visit.rng, account)


def _pay(visit: Visit, user: str, order_id: str) -> None:
    call = visit.post(f"/api/orders/{order_id}/pay", name="pay", headers=_auth(_shop(visit), user))
    if call.status == 200:
        call.ok(paid_order=order_id, user=user)
    else:
        _settle(call, visit.persona, paid_order=order_id, user=user)


# -- personas ----------------------------------------------------------------------------------
def browser(visit: Visit) -> None:
    shop = _shop(visit)
    sku = shop.catalogue.pick(visit.rng).sku
    _browse(visit, sku)
    early = visit.arrival.kind == "countdown" and shop.room is not None
    if early and visit.rng.random() < shop.behaviour.early_join:
        _buy(visit, shop.catalogue.item(sku), pays=True)  # the product page is the pre-queue


def buyer(visit: Visit, *, pays: bool = True) -> None:
    shop = _shop(visit)
    b = shop.behaviour
    item = shop.catalogue.pick(visit.rng)
    if visit.arrival.kind == "open" and visit.rng.random() < b.browse_first:
        _browse(visit, item.sku)
        visit.think(b.think_min_s, b.think_max_s)
    _buy(visit, item, pays=pays)


def _buy(visit: Visit, item: CatalogueItem, *, pays: bool) -> None:
    """Order one unit (through the waiting room when there is one), think, pay."""
    shop = _shop(visit)
    b = shop.behaviour
    user = f"buyer-{visit.rng.randrange(b.buyer_users)}"
    admitted = _through_the_room(visit, user, item.sku)
    if admitted is None:
        return
    sku, ticket = admitted
    _, order = _order(visit, user, sku, 1, visit.id, ticket=ticket)
    if ticket is not None:
        _share(shop, visit.rng, user, ticket)
    if pays and order is not None:
        visit.think(b.think_min_s, b.think_max_s)
        _pay(visit, user, order)


def abandoner(visit: Visit) -> None:
    buyer(visit, pays=False)


def bot(visit: Visit) -> None:
    shop = _shop(visit)
    hot = shop.catalogue.item(shop.catalogue.hot)
    user = f"bot-{visit.rng.randrange(shop.behaviour.bot_users)}"
    for k in range(shop.behaviour.bot_burst):  # no think time: each order goes as the last one ends
        # Some asks are beyond the per-user limit on their own; the rest exceed it together.
        qty = hot.limit_per_user + 1 if visit.rng.random() < 0.2 else 1
        ticket = _skip_the_room(visit, user, hot.sku, k) if shop.room is not None else None
        _, order = _order(visit, user, hot.sku, qty, f"{visit.id}-{k}", ticket=ticket)
        if order is not None:
            _pay(visit, user, order)


def retry_storm(visit: Visit) -> None:
    shop = _shop(visit)
    b, rng = shop.behaviour, visit.rng
    item = shop.catalogue.pick(rng)
    user = f"buyer-{rng.randrange(b.buyer_users)}"
    admitted = _through_the_room(visit, user, item.sku)
    if admitted is None:
        return
    sku, ticket = admitted
    mode = b.retry_mode if b.retry_mode != "mixed" else rng.choice(("immediate", "backoff"))
    delays = (
        [0.0] * b.retries
        if mode == "immediate"
        else backoff_delays(rng, b.retries, b.backoff_base_s, b.backoff_cap_s)
    )
    order: str | None = None
    for attempt in range(b.retries + 1):
        call, order = _order(visit, user, sku, 1, visit.id, attempt=attempt, impatient=True, ticket=ticket)
        if order is not None:
            break
        retryable = call.status in (0, 429, 503) or call.status >= 500
        if not retryable or call.code == "limit_exceeded" or attempt == b.retries:
            break
        visit.sleep(delays[attempt])
    if order is None:
        return
    if rng.random() < b.duplicate_submit:  # the double click: must replay, not buy twice
        _order(visit, user, sku, 1, visit.id, attempt=b.retries + 1, ticket=ticket)
    _pay(visit, user, order)


#: The personas as the drill registers them: name → visit.
VISITS = {
    "browser": browser,
    "buyer": buyer,
    "abandoner": abandoner,
    "bot": bot,
    "retry_storm": retry_storm,
}
