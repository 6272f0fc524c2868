"""Every service-level Redis key, built here and nowhere else.

The keys of one sale's engine (stock, holds, events stream, ...) are ``inventory``'s and
live in :class:`inventory.SaleKeys`; this module owns the keys the service, the worker,
the fence and the war room add around them. All start with the key prefix
(``FLASHSALE_KEY_PREFIX``, default ``fs``).

=====================================  ======  ===============================================
key                                    type    what it holds
=====================================  ======  ===============================================
``<prefix>:sales``                     set     every sale id (and bucket sale id) ever created
``<prefix>:sale:<sale>``               hash    a sale's settings (T0, hold TTL, state, fenced)
``<prefix>:skus``                      hash    SKU -> the sale selling it
``<prefix>:switches``                  hash    the degraded-site switches
``<prefix>:lineage``                   string  the fence's lineage marker (also in PostgreSQL)
``<prefix>:stats:procs``               set     the per-process stats keys published
``<prefix>:stats:proc:<pid>``          hash    one service process's published counters
``<prefix>:writer:stats``              hash    the order writer's published counters
``<prefix>:audit:last``                hash    the last audit's violations per kind, and when
``{<prefix>:<sale>}:dead``             stream  entries PostgreSQL refused (the sale's slot)
``{<prefix>:warroom}:<name>``          *       the war room's history and operator log (one slot)
=====================================  ======  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass

from inventory import SaleKeys

__all__ = ["ServiceKeys"]


@dataclass(frozen=True, slots=True)
class ServiceKeys:
    """The service-level keys under one prefix."""

    prefix: str = "fs"

    @property
    def sales(self) -> str:
        return f"{self.prefix}:sales"

    def sale(self, sale: str) -> str:
        return f"{self.prefix}:sale:{sale}"

    @property
    def skus(self) -> str:
        return f"{self.prefix}:skus"

    @property
    def switches(self) -> str:
        return f"{self.prefix}:switches"

    @property
    def lineage(self) -> str:
        return f"{self.prefix}:lineage"

    @property
    def stats_procs(self) -> str:
        return f"{self.prefix}:stats:procs"

    def stats_proc(self, pid: int) -> str:
        return f"{self.prefix}:stats:proc:{pid}"

    @property
    def audit_last(self) -> str:
        return f"{self.prefix}:audit:last"

    @property
    def writer_stats(self) -> str:
        return f"{self.prefix}:writer:stats"

    def events(self, sale: str) -> str:
        """The sale's events stream (inventory's key)."""
        return SaleKeys(self.prefix, sale).events

    def dead_letters(self, sale: str) -> str:
        """The sale's dead-letter stream, in the same hash slot as its events."""
        return SaleKeys(self.prefix, sale).tag + ":dead"

    def warroom(self, name: str) -> str:
        """A war-room key; they share one hash tag so their MULTIs stay in one slot."""
        return "{" + self.prefix + ":warroom}:" + name
