"""Who arrives: browsers, buyers, abandoners, bots/scalpers and retry-storm clients.

Each arrival becomes one visit by one persona, drawn by configurable weights (the mix
depends on the window: before T0 everyone is refreshing the product page; at the T0
rendezvous everyone who waited places an order). Visits speak to the service through a
``Transport`` (the locustfile's one wraps Locust's FastHttpSession) and write every order
and payment attempt to the request log the oracle reads.

- **browser**: loads the product page (``GET /api/skus/{sku}``).
- **buyer**: orders, thinks, pays.
- **abandoner**: orders and never pays: the hold lapses and the unit is sold again.
- **bot**: a scalper's script: no think time, a burst of orders on the hot SKU from a few
  accounts, some asking for more than the per-user limit; pays at once for what it got.
- **retry_storm**: an impatient client with a short timeout that retries what it did not
  hear back about — immediately, or with exponential backoff and full jitter — and
  sometimes submits twice after success; every retry reuses the request id.

Every order carries a request id. An expected "sold out" (409) or "limit reached" (429
``limit_exceeded``) is a success for the error ratio: the service answered correctly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

from loadtests.arrivals import Arrival

__all__ = [
    "PERSONAS",
    "Behaviour",
    "Catalogue",
    "CatalogueItem",
    "OrderOutcome",
    "PersonaWeights",
    "Reply",
    "Shopper",
    "Transport",
    "backoff_delays",
    "classify",
    "order_outcome",
]

PERSONAS = ("browser", "buyer", "abandoner", "bot", "retry_storm")
RetryMode = Literal["immediate", "backoff", "mixed"]
#: ok: the service acknowledged (2xx); failed: it definitely did not act; unknown: no answer.
OrderOutcome = Literal["ok", "failed", "unknown"]


@dataclass(frozen=True)
class Reply:
    """What came back. ``status`` 0 means no HTTP answer (timeout, connection error)."""

    status: int
    body: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def code(self) -> str:
        """The stable error code of a JSON error body, else ``""``."""
        value = self.body.get("error") if isinstance(self.body, Mapping) else None
        return value if isinstance(value, str) else ""


class Transport(Protocol):
    def send(
        self,
        method: str,
        path: str,
        *,
        name: str,
        persona: str,
        intended: float,
        token: str | None = None,
        json: Mapping[str, Any] | None = None,
        impatient: bool = False,
    ) -> Reply:
        """Send one request; ``intended`` is when the schedule meant it to go (epoch s)."""
        ...


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


def classify(name: str, persona: str, reply: Reply) -> bool:
    """True when ``reply`` is an expected answer (counts as success for the error ratio)."""
    code = "" if 200 <= reply.status < 300 else reply.code
    if (reply.status, code) in _EXPECTED.get(name, set()):
        return True
    return reply.status == 429 and code == "rate_limited" and persona in _RATE_LIMIT_EXPECTED


def order_outcome(reply: Reply) -> OrderOutcome:
    """What an order reply tells the oracle: acknowledged, definitely not, or not known.

    A 504 ``outcome_unknown``, any other 5xx but a 503 (which the service only sends when
    it refused before deciding) and no answer at all are unknown: the order may exist.
    """
    if 200 <= reply.status < 300:
        return "ok"
    if 400 <= reply.status < 500 or reply.status == 503:
        return "failed"
    return "unknown"


def backoff_delays(rng: random.Random, retries: int, base_s: float, cap_s: float) -> list[float]:
    """Exponential backoff with full jitter: delay k is uniform in [0, min(cap, base·2^k)]."""
    return [rng.uniform(0.0, min(cap_s, base_s * (2**k))) for k in range(retries)]


@dataclass(frozen=True)
class PersonaWeights:
    """Relative weights of the personas after T0 (need not sum to 1)."""

    browser: float = 45.0
    buyer: float = 25.0
    abandoner: float = 15.0
    bot: float = 10.0
    retry_storm: float = 5.0

    def __post_init__(self) -> None:
        values = [getattr(self, f.name) for f in fields(self)]
        if any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError("persona weights must be >= 0 and not all zero")

    @classmethod
    def parse(cls, text: str) -> PersonaWeights:
        """``"browser=45,buyer=25,abandoner=15,bot=10,retry_storm=5"``; missing ones are 0."""
        if not text.strip():
            return cls()
        values: dict[str, float] = {p: 0.0 for p in PERSONAS}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in values:
                raise ValueError(
                    f"bad persona weight {part!r}: use NAME=WEIGHT with NAME in {', '.join(PERSONAS)}"
                )
            values[key] = float(value)
        return cls(**values)

    def as_dict(self) -> dict[str, float]:
        return {p: float(getattr(self, p)) for p in PERSONAS}

    def pick(self, rng: random.Random, *, exclude: Sequence[str] = ()) -> str:
        choices = [(p, w) for p, w in self.as_dict().items() if p not in exclude and w > 0]
        if not choices:  # e.g. only browsers configured, at the rendezvous: buyers it is
            return "buyer"
        return rng.choices([p for p, _ in choices], weights=[w for _, w in choices])[0]


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


RequestLogWriter = Callable[[dict[str, Any]], None]


@dataclass
class Shopper:
    """Runs visits for one Locust process."""

    transport: Transport
    catalogue: Catalogue
    tokens: Mapping[str, str]
    log: RequestLogWriter
    run_id: str
    weights: PersonaWeights = field(default_factory=PersonaWeights)
    behaviour: Behaviour = field(default_factory=Behaviour)
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time

    def persona_for(self, arrival: Arrival) -> str:
        if arrival.kind == "countdown":
            return "browser"
        if arrival.kind == "rendezvous":
            return self.weights.pick(self.rng, exclude=("browser",))
        return self.weights.pick(self.rng)

    def visit(self, arrival: Arrival, started_at: float) -> str:
        """One visit; returns the persona that made it."""
        persona = self.persona_for(arrival)
        getattr(self, f"_visit_{persona}")(arrival, started_at)
        return persona

    # -- personas ----------------------------------------------------------------------
    def _visit_browser(self, arrival: Arrival, started_at: float) -> None:
        item = self.catalogue.pick(self.rng)
        self._browse(item.sku, "browser", arrival.intended)

    def _visit_buyer(
        self, arrival: Arrival, started_at: float, *, pays: bool = True, persona: str = "buyer"
    ) -> None:
        item = self.catalogue.pick(self.rng)
        user = f"buyer-{self.rng.randrange(self.behaviour.buyer_users)}"
        intended = arrival.intended
        if arrival.kind == "open" and self.rng.random() < self.behaviour.browse_first:
            intended = self._browse(item.sku, persona, intended) + self._think()
            self.sleep(max(intended - self.clock(), 0.0))
        order = self._order(persona, user, item.sku, 1, f"{self.run_id}-{arrival.seq}", intended)
        if pays and order is not None:
            intended = self.clock() + self._think()
            self.sleep(max(intended - self.clock(), 0.0))
            self._pay(persona, user, order, intended)

    def _visit_abandoner(self, arrival: Arrival, started_at: float) -> None:
        self._visit_buyer(arrival, started_at, pays=False, persona="abandoner")

    def _visit_bot(self, arrival: Arrival, started_at: float) -> None:
        hot = self.catalogue.item(self.catalogue.hot)
        user = f"bot-{self.rng.randrange(self.behaviour.bot_users)}"
        intended = arrival.intended
        for k in range(self.behaviour.bot_burst):
            # Some asks are beyond the per-user limit on their own; the rest exceed it together.
            qty = hot.limit_per_user + 1 if self.rng.random() < 0.2 else 1
            order = self._order("bot", user, hot.sku, qty, f"{self.run_id}-{arrival.seq}-{k}", intended)
            if order is not None:
                self._pay("bot", user, order, self.clock())
            intended = self.clock()  # no think time

    def _visit_retry_storm(self, arrival: Arrival, started_at: float) -> None:
        b = self.behaviour
        item = self.catalogue.pick(self.rng)
        user = f"buyer-{self.rng.randrange(b.buyer_users)}"
        mode = b.retry_mode if b.retry_mode != "mixed" else self.rng.choice(("immediate", "backoff"))
        delays = (
            [0.0] * b.retries
            if mode == "immediate"
            else backoff_delays(self.rng, b.retries, b.backoff_base_s, b.backoff_cap_s)
        )
        rid = f"{self.run_id}-{arrival.seq}"
        intended = arrival.intended
        order: str | None = None
        for attempt in range(b.retries + 1):
            reply = self._order_reply(
                "retry_storm", user, item.sku, 1, rid, intended, attempt=attempt, impatient=True
            )
            if order_outcome(reply) == "ok":
                order = str(reply.body.get("order_id"))
                break
            retryable = reply.status in (0, 429, 503) or reply.status >= 500
            if not retryable or reply.code in ("limit_exceeded",) or attempt == b.retries:
                break
            self.sleep(delays[attempt])
            intended = self.clock()
        if order is None:
            return
        if self.rng.random() < b.duplicate_submit:  # the double click: must replay, not buy twice
            self._order_reply(
                "retry_storm", user, item.sku, 1, rid, self.clock(), attempt=b.retries + 1, impatient=False
            )
        self._pay("retry_storm", user, order, self.clock())

    # -- requests ----------------------------------------------------------------------
    def _think(self) -> float:
        return self.rng.uniform(self.behaviour.think_min_s, self.behaviour.think_max_s)

    def _browse(self, sku: str, persona: str, intended: float) -> float:
        self.transport.send("GET", f"/api/skus/{sku}", name="browse", persona=persona, intended=intended)
        return self.clock()

    def _order(self, persona: str, user: str, sku: str, qty: int, rid: str, intended: float) -> str | None:
        reply = self._order_reply(persona, user, sku, qty, rid, intended)
        if order_outcome(reply) == "ok":
            return str(reply.body.get("order_id"))
        return None

    def _order_reply(
        self,
        persona: str,
        user: str,
        sku: str,
        qty: int,
        rid: str,
        intended: float,
        *,
        attempt: int = 0,
        impatient: bool = False,
    ) -> Reply:
        sent = self.clock()
        reply = self.transport.send(
            "POST",
            "/api/orders",
            name="order",
            persona=persona,
            intended=intended,
            token=self.tokens.get(user),
            json={"request_id": rid, "sku": sku, "qty": qty},
            impatient=impatient,
        )
        body = reply.body
        self.log(
            {
                "kind": "order",
                "rid": rid,
                "attempt": attempt,
                "persona": persona,
                "user": user,
                "sku": sku,
                "qty": qty,
                "status": reply.status,
                "code": reply.code,
                "outcome": order_outcome(reply),
                "order_id": body.get("order_id"),
                "replayed": bool(body.get("replayed", False)),
                "pay_by_ms": body.get("pay_by_ms"),
                "t_sent": round(sent, 4),
                "t_done": round(self.clock(), 4),
                "error": reply.error,
            }
        )
        return reply

    def _pay(self, persona: str, user: str, order_id: str, intended: float) -> None:
        reply = self.transport.send(
            "POST",
            f"/api/orders/{order_id}/pay",
            name="pay",
            persona=persona,
            intended=intended,
            token=self.tokens.get(user),
        )
        outcome = "paid" if reply.status == 200 else ("failed" if 400 <= reply.status < 500 else "unknown")
        self.log(
            {
                "kind": "pay",
                "order_id": order_id,
                "persona": persona,
                "user": user,
                "status": reply.status,
                "code": reply.code,
                "outcome": outcome,
                "t_done": round(self.clock(), 4),
            }
        )
