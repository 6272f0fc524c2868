"""The key layout: every Redis key the engine touches is built here, and nowhere else.

All keys of one sale share the hash tag ``{<prefix>:<sale>}``, so they live in one
Redis Cluster hash slot and every script (which may touch any of them) runs on one
shard. The event stream a script appends to is in that slot too; the fields of its
entries (one per change, of a few types) are a contract of their own, in ``_events.py``.

=================================  ======  =============================================
key                                type    holds
=================================  ======  =============================================
``{fs:<sale>}:stock``              hash    ``<sku>:total|available|held|sold|reserve|
                                           limit|low`` counters of every SKU of the sale
``{fs:<sale>}:holds``              hash    hold id -> JSON hold record (user, lines,
                                           state, deadline, created, request id)
``{fs:<sale>}:requests``           hash    ``r:<user>:<request id>`` -> JSON {hold id,
                                           fingerprint}: a buyer's idempotency record
                                           (:meth:`SaleKeys.request_field`); ``op:<id>`` ->
                                           what a stock change did (so a re-sent one is a
                                           no-op)
``{fs:<sale>}:users``              hash    ``<user>:<sku>`` -> units held or bought
``{fs:<sale>}:deadlines``          zset    open hold ids scored by deadline (ms)
``{fs:<sale>}:events``             stream  the state changes, appended by the same
                                           script that made them: one entry each, but
                                           one per reserve call for all its holds
                                           (fields: see ``_events.py``)
``{fs:<sale>}:transfers``          hash    transfer id -> JSON intent, while units move
                                           between a bucketed sale's buckets
``{fs:<sale>}:room``               hash    the waiting room's settings and counters
                                           (``_room.py``)
``{fs:<sale>}:room:pre``           list    buyers who joined before T0, in arrival order
``{fs:<sale>}:room:queue``         zset    waiting buyers scored by queue position
``{fs:<sale>}:room:buyers``        hash    buyer -> JSON room record
``{fs:<sale>}:room:tickets``       zset    admitted buyers scored by ticket expiry (ms)
=================================  ======  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SaleKeys"]


@dataclass(frozen=True, slots=True)
class SaleKeys:
    """The Redis keys of one sale (all in one hash slot)."""

    prefix: str
    sale: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + ":" + self.sale + "}"

    @property
    def stock(self) -> str:
        return self.tag + ":stock"

    @property
    def holds(self) -> str:
        return self.tag + ":holds"

    @property
    def requests(self) -> str:
        return self.tag + ":requests"

    @property
    def users(self) -> str:
        return self.tag + ":users"

    @property
    def deadlines(self) -> str:
        return self.tag + ":deadlines"

    @property
    def events(self) -> str:
        return self.tag + ":events"

    @property
    def transfers(self) -> str:
        """Bucket transfers in progress into this bucket (see ``_buckets.py``)."""
        return self.tag + ":transfers"

    @staticmethod
    def request_field(user: str, request_id: str) -> str:
        """The field of :attr:`requests` holding ``user``'s record of ``request_id``.

        Request ids are scoped per buyer: one buyer's id never answers, blocks or reveals
        another buyer's. Neither part may contain ':' (ids are checked), so the field is
        unambiguous and never one of the ``op:`` records of stock changes."""
        return "r:" + user + ":" + request_id

    @property
    def room(self) -> str:
        """The sale's waiting room (see ``_room.py``); its other keys start with this."""
        return self.tag + ":room"

    def for_room(self) -> list[str]:
        r = self.room
        return [r, r + ":pre", r + ":queue", r + ":buyers", r + ":tickets", self.stock]

    def all(self) -> tuple[str, ...]:
        """Every key of the sale (for dumps, audits and deleting a finished sale)."""
        return (
            self.stock,
            self.holds,
            self.requests,
            self.users,
            self.deadlines,
            self.events,
            self.transfers,
            *self.for_room()[:5],
        )

    def for_reserve(self) -> list[str]:
        return [self.stock, self.holds, self.requests, self.users, self.deadlines, self.events]

    def for_hold_close(self) -> list[str]:
        return [self.stock, self.holds, self.users, self.deadlines, self.events]

    def for_stock_change(self) -> list[str]:
        return [self.stock, self.events, self.requests]
