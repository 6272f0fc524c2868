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
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
}
#: Personas that hammer on purpose: being rate limited is the expected answer for them.
_RATE_LIMIT_EXPECTED = {"bot", "retry_storm"}


def classify(name: str, persona: str, status: int, code: str = "") -> bool:
    """True when an answer is expected (counts as success for the error ratio)."""
    code = "" if 200 <= status < 300 else code
    if (status, code) in _EXPECTED.get(name, set()):
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
class Shop:
    """What one process's visits share: the sale's catalogue, the buyers' tokens, the knobs."""

    catalogue: Catalogue
    tokens: Mapping[str, str]
    behaviour: Behaviour = field(default_factory=Behaviour)
    #: The retry-storm clients' timeout in seconds (they retry what they did not hear back about).
    impatient_timeout_s: float = 0.25


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


def _order(
    visit: Visit, user: str, sku: str, qty: int, rid: str, *, attempt: int = 0, impatient: bool = False
) -> tuple[Call, str | None]:
    """One order request; returns the call and the acknowledged order id (None if not)."""
    shop = _shop(visit)
    call = visit.post(
        "/api/orders",
        name="order",
        key=rid,
        json={"request_id": rid, "sku": sku, "qty": qty},
        headers=_auth(shop, user),
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
        )
        return call, order
    _settle(call, visit.persona, impatient=impatient, user=user, attempt=attempt)
    return call, None


def _pay(visit: Visit, user: str, order_id: str) -> None:
    call = visit.post(f"/api/orders/{order_id}/pay", name="pay", headers=_auth(_shop(visit), user))
    if call.status == 200:
        call.ok(paid_order=order_id, user=user)
    else:
        _settle(call, visit.persona, paid_order=order_id, user=user)


# -- personas ----------------------------------------------------------------------------------
def browser(visit: Visit) -> None:
    _browse(visit, _shop(visit).catalogue.pick(visit.rng).sku)


def buyer(visit: Visit, *, pays: bool = True) -> None:
    shop = _shop(visit)
    b = shop.behaviour
    item = shop.catalogue.pick(visit.rng)
    user = f"buyer-{visit.rng.randrange(b.buyer_users)}"
    if visit.arrival.kind == "open" and visit.rng.random() < b.browse_first:
        _browse(visit, item.sku)
        visit.think(b.think_min_s, b.think_max_s)
    _, order = _order(visit, user, item.sku, 1, visit.id)
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
        _, order = _order(visit, user, hot.sku, qty, f"{visit.id}-{k}")
        if order is not None:
            _pay(visit, user, order)


def retry_storm(visit: Visit) -> None:
    shop = _shop(visit)
    b, rng = shop.behaviour, visit.rng
    item = shop.catalogue.pick(rng)
    user = f"buyer-{rng.randrange(b.buyer_users)}"
    mode = b.retry_mode if b.retry_mode != "mixed" else rng.choice(("immediate", "backoff"))
    delays = (
        [0.0] * b.retries
        if mode == "immediate"
        else backoff_delays(rng, b.retries, b.backoff_base_s, b.backoff_cap_s)
    )
    order: str | None = None
    for attempt in range(b.retries + 1):
        call, order = _order(visit, user, item.sku, 1, visit.id, attempt=attempt, impatient=True)
        if order is not None:
            break
        retryable = call.status in (0, 429, 503) or call.status >= 500
        if not retryable or call.code == "limit_exceeded" or attempt == b.retries:
            break
        visit.sleep(delays[attempt])
    if order is None:
        return
    if rng.random() < b.duplicate_submit:  # the double click: must replay, not buy twice
        _order(visit, user, item.sku, 1, visit.id, attempt=b.retries + 1)
    _pay(visit, user, order)


#: The personas as the drill registers them: name → visit.
VISITS = {
    "browser": browser,
    "buyer": buyer,
    "abandoner": abandoner,
    "bot": bot,
    "retry_storm": retry_storm,
}
