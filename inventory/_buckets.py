"""Hot-SKU buckets: one sale's stock split across N buckets on N hash slots, so a SKU
that one Redis shard cannot serve alone is served by N shards.

Bucket ``k`` of sale ``d11`` is an ordinary :class:`Inventory` whose sale id is
``d11-b<k>`` (its own hash tag, so on a Redis Cluster the buckets spread over shards).
Every buyer has a **home bucket** (a hash of the user id). All of a buyer's holds, and so
their per-user counts, live there: per-user limits stay exact, idempotency records stay
in one place, and a cart is atomic inside the home bucket.

When the home bucket has run out of a SKU that other buckets still have, the reservation
**pulls** units from the fullest other bucket into the home bucket and tries again; it is
refused as sold out only when every bucket is out. So the SKU sells out exactly: no
oversell (each bucket is atomic) and no unit stranded in a bucket. (Under a crowd, the
units a pull brings in may be taken by the home bucket's other buyers before this buyer
retries; after a bounded number of pulls the refusal is ``SoldOut`` with the units the
sale still has, never 0 while units remain.)

Request ids are per buyer (``SaleKeys.request_field``) and a buyer's records all live in
the home bucket, so a bucketed sale answers a reused id exactly as a plain sale does.

A pull is a crash-safe transfer in three steps, each idempotent, each one script
(``lua/transfer_*.lua``):

1. record an *intent* ``<id>`` in the home bucket's ``transfers`` hash, stamped with that
   Redis server's clock (nothing has moved yet);
2. write the units off in the donor bucket (operation ``xo-<id>``);
3. add them in the home bucket (operation ``xi-<id>``) and drop the intent, together.

A process that dies between 1 and 3 leaves an intent behind: :meth:`settle_transfers`
finishes it. It asks the donor to decide the transfer for good — "moved" if the units
left, else it records the transfer *aborted*, so a write-off that arrives late (a process
paused rather than dead) is refused — and adds the moved units to the receiver. No clock
of a process takes part: an intent's age is read on the clock that stamped it, and
settling a live transfer early costs a retry, never a unit. ``flashsale worker``'s
sweeper calls it every few seconds, and ``flashsale audit`` reports any intent left
unsettled as leaked stock.

Events carry the moves as ``written_off`` / ``restocked`` in each bucket's stream, each with
the transfer's id (``transfer``), so PostgreSQL's per-bucket totals stay right and a
write-off that no bucket received is visible there too (the audit reports it as leaked;
recovery rebuilds the operation records from it, so a transfer cut by a Redis data loss is
still finished).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import zlib
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from . import _validate as check
from ._engine import DEFAULT_HOLD_TTL, Inventory, _text
from ._errors import InsufficientStock, InvalidRequest, SoldOut
from ._types import ExpiryBatch, Hold, Line, Snapshot
from ._validate import Cart

__all__ = ["BucketedInventory", "bucket_sale_id", "parent_sale_id"]

_BUCKET_SUFFIX = re.compile(r"^(?P<sale>.+)-b(?P<k>\d{1,3})$")
MAX_BUCKETS = 64
#: An intent older than this, by the Redis clock that stamped it, is finished by
#: settle_transfers (younger ones are most likely still in flight).
SETTLE_AFTER_S = 10.0


def bucket_sale_id(sale: str, k: int) -> str:
    return f"{sale}-b{k}"


def parent_sale_id(sale: str) -> tuple[str, int] | None:
    """``("d11", 3)`` for a bucket's sale id ``d11-b3``, else None."""
    match = _BUCKET_SUFFIX.match(sale)
    return (match["sale"], int(match["k"])) if match else None


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


class BucketedInventory:
    """A sale whose stock is split across ``buckets`` hash slots. Same calls as
    :class:`Inventory`; hold ids name their bucket (``<sale>-b<k>.<random>``)."""

    def __init__(
        self,
        redis: Any,
        sale: str,
        buckets: int,
        *,
        prefix: str = "fs",
        hold_ttl: float | timedelta = DEFAULT_HOLD_TTL,
        coalesce: bool = True,
        max_batch: int = 64,
    ) -> None:
        if not isinstance(buckets, int) or not 1 <= buckets <= MAX_BUCKETS:
            raise InvalidRequest(f"buckets must be 1..{MAX_BUCKETS}", field="buckets")
        self.sale = check.sale_id(sale)
        if len(bucket_sale_id(self.sale, buckets - 1)) > 32:
            raise InvalidRequest("sale id too long to add a bucket suffix", field="sale")
        self.redis = redis
        self.buckets = [
            Inventory(
                redis,
                bucket_sale_id(self.sale, k),
                prefix=prefix,
                hold_ttl=hold_ttl,
                coalesce=coalesce,
                max_batch=max_batch,
            )
            for k in range(buckets)
        ]

    @property
    def hold_ttl_ms(self) -> int:
        return self.buckets[0].hold_ttl_ms

    @hold_ttl_ms.setter
    def hold_ttl_ms(self, value: int) -> None:
        for bucket in self.buckets:
            bucket.hold_ttl_ms = value

    @staticmethod
    def parent_of(sale: str) -> tuple[str, int] | None:
        """``("d11", 3)`` for bucket 3's sale id ``d11-b3``; None for any other sale id."""
        return parent_sale_id(sale)

    def home(self, user: str) -> Inventory:
        """The bucket holding ``user``'s holds and counts."""
        return self.buckets[zlib.crc32(user.encode()) % len(self.buckets)]

    def bucket_of_hold(self, hold_id: str) -> Inventory:
        parsed = parent_sale_id(Inventory.sale_of(hold_id))
        if parsed is None or parsed[0] != self.sale or parsed[1] >= len(self.buckets):
            raise InvalidRequest(f"hold {hold_id!r} is not from sale {self.sale!r}", field="hold_id")
        return self.buckets[parsed[1]]

    # ----------------------------------------------------------------- stocking
    async def stock(
        self, sku: str, total: int, *, reserve: int = 0, limit_per_user: int = 0, low_stock_line: int = 0
    ) -> Snapshot:
        total = check.quantity(total, field="total", low=0, high=check.MAX_UNITS)
        reserve = check.quantity(reserve, field="reserve", low=0, high=total)
        n = len(self.buckets)
        for bucket, t, r in zip(self.buckets, _split(total, n), _split(reserve, n)):
            await bucket.stock(
                sku, t, reserve=r, limit_per_user=limit_per_user, low_stock_line=low_stock_line
            )
        return await self._snapshot_or_raise(sku)

    async def restock(self, sku: str, units: int) -> Snapshot:
        units = check.quantity(units, field="units", high=check.MAX_UNITS)
        for bucket, share in zip(self.buckets, _split(units, len(self.buckets))):
            if share:
                await bucket.restock(sku, share)
        return await self._snapshot_or_raise(sku)

    async def release_reserve(self, sku: str, units: int | None = None) -> Snapshot:
        snaps = [await b.snapshot(sku) for b in self.buckets]
        if any(s is None for s in snaps):
            raise InvalidRequest(f"no SKU {sku!r} in this sale", field="sku")
        pools = [s.reserve for s in snaps if s is not None]
        want = sum(pools) if units is None else check.quantity(units, field="units", high=check.MAX_UNITS)
        if want > sum(pools):
            raise InsufficientStock(
                f"SKU {sku!r} has only {sum(pools)} unit(s) in its reserve pool", sku=sku, units=sum(pools)
            )
        # Release into the emptiest buckets first: that is where buyers are waiting.
        order = sorted(range(len(self.buckets)), key=lambda k: snaps[k].available)  # type: ignore[union-attr]
        for k in order:
            take = min(want, pools[k])
            if take:
                await self.buckets[k].release_reserve(sku, take)
                want -= take
        return await self._snapshot_or_raise(sku)

    # ------------------------------------------------------------- reservations
    async def reserve(
        self,
        user: str,
        lines: str | Line | Iterable[Line | tuple[str, int]],
        *,
        request_id: str,
        hold_ttl: float | timedelta | None = None,
    ) -> Hold:
        cart = Inventory.check_reserve(user, lines, request_id)
        home = self.home(user)
        wanted = {line.sku: line.qty for line in cart}
        for _ in range(len(cart) * len(self.buckets) + 1):
            try:
                return await home.reserve(user, cart, request_id=request_id, hold_ttl=hold_ttl)
            except SoldOut as refusal:
                moved = await self._pull(refusal.sku, wanted[refusal.sku] - refusal.available, into=home)
                if moved == 0:
                    # Every other bucket looked empty — but units written off by a donor
                    # and not yet added to their receiver are in no bucket: that is not
                    # "sold out". Refuse only if the sale, in transit included, lacks them.
                    left = await self._left(refusal.sku)
                    if left < wanted[refusal.sku]:
                        return await self._last_word(home, user, cart, request_id, hold_ttl)
        # Other buyers kept taking what the pulls brought in. The SKU may still have units
        # in other buckets: the refusal says how many, so nobody takes this for "sold out"
        # (available 0) and refuses the SKU's later buyers from a cache.
        return await self._last_word(home, user, cart, request_id, hold_ttl)

    async def _last_word(
        self, home: Inventory, user: str, cart: Cart, request_id: str, hold_ttl: float | timedelta | None
    ) -> Hold:
        """The refusal, decided by the home bucket's script rather than here: the same
        request id, sent again or twice at once, may have made a hold since this call's
        last try (it is then replayed, as on a plain sale), or units may have come in.
        A refusal names the units the sale still has, in transit included."""
        try:
            return await home.reserve(user, cart, request_id=request_id, hold_ttl=hold_ttl)
        except SoldOut as refusal:
            raise SoldOut(refusal.sku, await self._left(refusal.sku)) from None

    async def made_hold(self, user: str, request_id: str) -> bool:
        return await self.home(user).made_hold(user, request_id)

    async def confirm(self, hold_id: str, *, user: str | None = None) -> Hold:
        return await self.bucket_of_hold(hold_id).confirm(hold_id, user=user)

    async def release(self, hold_id: str, *, user: str | None = None) -> Hold:
        return await self.bucket_of_hold(hold_id).release(hold_id, user=user)

    async def hold(self, hold_id: str) -> Hold | None:
        return await self.bucket_of_hold(hold_id).hold(hold_id)

    async def expire_due(self, *, limit: int = 100) -> ExpiryBatch:
        batches = await asyncio.gather(*(b.expire_due(limit=limit) for b in self.buckets))
        return ExpiryBatch(tuple(h for b in batches for h in b.expired), any(b.more for b in batches))

    # ------------------------------------------------------------------- reads
    async def snapshot(self, sku: str) -> Snapshot | None:
        parts = await self._snapshots_of(sku, self.buckets)
        if any(p is None for p in parts):
            return None
        return _sum(sku, [p for p in parts if p is not None])

    async def snapshots(self) -> dict[str, Snapshot]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in self.buckets:
                pipe.hgetall(bucket.keys.stock)
            replies = await pipe.execute()
        per_bucket = [Inventory._parse_snapshots(raw) for raw in replies]
        skus = sorted(set().union(*(p.keys() for p in per_bucket)))
        return {sku: _sum(sku, [p[sku] for p in per_bucket if sku in p]) for sku in skus}

    async def _snapshots_of(self, sku: str, buckets: list[Inventory]) -> list[Snapshot | None]:
        """``sku``'s counters in each of ``buckets``, in one pipeline: one connection and one
        round trip (per shard on a cluster), not one each — 64 buckets read side by side
        took 64 of the client's connections per product page or pull."""
        sku = check.sku(sku)
        fields = Inventory._stock_fields(sku)
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hmget(bucket.keys.stock, fields)
            replies = await pipe.execute()
        return [Inventory._parse_snapshot(sku, values) for values in replies]

    async def _snapshot_or_raise(self, sku: str) -> Snapshot:
        snap = await self.snapshot(sku)
        if snap is None:
            raise InvalidRequest(f"no SKU {sku!r} in this sale", field="sku")
        return snap

    # --------------------------------------------------------------- transfers
    async def _pull(self, sku: str, need: int, *, into: Inventory) -> int:
        """Move units of ``sku`` into ``into`` from the fullest other bucket. Returns the
        units moved (0: every other bucket is out too)."""
        for _ in range(len(self.buckets)):
            donors = [b for b in self.buckets if b is not into]
            snaps = await self._snapshots_of(sku, donors)
            best = max(
                ((s.available, b) for s, b in zip(snaps, donors) if s is not None and s.available > 0),
                key=lambda pair: pair[0],
                default=None,
            )
            if best is None:
                return 0
            available, donor = best
            # Half the donor's stock (at least what this buyer needs): later buyers of the
            # home bucket find units there instead of pulling one at a time.
            units = min(available, max(need, 1, available // 2))
            try:
                moved = await self.transfer(sku, units, source=donor, target=into)
            except InsufficientStock:
                continue  # the donor sold them meanwhile: look again
            if moved:
                return units
            # Aborted by the settle step while this process was paused: look again.
        return 0

    async def transfer(self, sku: str, units: int, *, source: Inventory, target: Inventory) -> bool:
        """Move ``units`` available units of ``sku`` between two buckets (crash-safe).
        Returns False if the settle step aborted the transfer before its units left
        (this process was paused longer than ``SETTLE_AFTER_S``): nothing moved."""
        xfer = secrets.token_hex(8)
        await target._mutate("transfer_begin", [target.keys.transfers], [xfer, source.sale, sku, units], sku)
        try:
            out = await source._mutate("transfer_out", source._stock_keys, [sku, units, xfer, "move"], sku)
        except InsufficientStock:
            await self.redis.hdel(target.keys.transfers, xfer)
            raise
        if _text(out[1]) != "moved":
            return False
        await target._mutate(
            "transfer_in", [*target._stock_keys, target.keys.transfers], [sku, units, xfer], sku
        )
        return True

    async def settle_transfers(self, *, older_than_s: float = SETTLE_AFTER_S) -> int:
        """Finish transfers a crashed process left half done: add the units the donor
        wrote off to the receiver, or abort the transfer if they never left. Returns how
        many it settled. Cheap when there are none (one small hash per bucket), so the
        sweeper calls it."""
        settled = 0
        by_sale = {b.sale: b for b in self.buckets}
        for target in self.buckets:
            due = await target._mutate(
                "transfer_due", [target.keys.transfers], [round(older_than_s * 1000)], ""
            )
            for field, raw in zip(due[2::2], due[3::2]):
                xfer, intent = _text(field), json.loads(raw)
                source = by_sale.get(intent["from"])
                if source is None:
                    continue  # not a bucket of this sale: left for the audit to report
                sku, units = intent["sku"], int(intent["units"])
                out = await source._mutate(
                    "transfer_out", source._stock_keys, [sku, units, xfer, "abort"], sku
                )
                if _text(out[1]) == "moved":
                    await target._mutate(
                        "transfer_in", [*target._stock_keys, target.keys.transfers], [sku, units, xfer], sku
                    )
                else:
                    await self.redis.hdel(target.keys.transfers, xfer)
                settled += 1
        return settled

    async def _left(self, sku: str) -> int:
        """Units of ``sku`` the sale still has: available in a bucket or in transit between
        two. The transfers are read before the stock: a transfer in flight when a pull read
        the donors is then either still an intent here or already added (and counted by the
        stock read after), so 0 means sold out, never "between buckets". (An intent whose
        write-off has not happened yet is counted in its donor too: an upper bound, which
        costs a retry at most, never a unit.)"""
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in self.buckets:
                pipe.hvals(bucket.keys.transfers)
            replies = await pipe.execute()
        moving = sum(
            int(intent["units"]) for raw in replies for intent in map(json.loads, raw) if intent["sku"] == sku
        )
        snap = await self.snapshot(sku)
        return moving + (snap.available if snap is not None else 0)

    async def in_transit(self) -> int:
        """Units of intents not yet settled (an upper bound on units written off in a
        donor but not yet added to their target)."""
        units = 0
        for target in self.buckets:
            for raw in (await self.redis.hgetall(target.keys.transfers)).values():
                units += int(json.loads(raw)["units"])
        return units

    async def rebalance(self, sku: str) -> dict[str, int]:
        """Even out ``sku``'s available units across buckets (e.g. before the opening, or
        when buyers' hashes turned out uneven). Returns available units per bucket after."""
        snaps = await self._snapshots_of(sku, self.buckets)
        if any(s is None for s in snaps):
            raise InvalidRequest(f"no SKU {sku!r} in this sale", field="sku")
        avail = [s.available for s in snaps if s is not None]
        targets = _split(sum(avail), len(self.buckets))
        surplus = [k for k in range(len(avail)) if avail[k] > targets[k]]
        deficit = [k for k in range(len(avail)) if avail[k] < targets[k]]
        for k in deficit:
            while avail[k] < targets[k] and surplus:
                j = surplus[0]
                units = min(targets[k] - avail[k], avail[j] - targets[j])
                try:
                    moved = await self.transfer(sku, units, source=self.buckets[j], target=self.buckets[k])
                except InsufficientStock:
                    moved = False
                if not moved:
                    break  # stock moved under us (sales going on): good enough
                avail[j] -= units
                avail[k] += units
                if avail[j] <= targets[j]:
                    surplus.pop(0)
        after = await self._snapshots_of(sku, self.buckets)
        return {b.sale: (s.available if s else 0) for b, s in zip(self.buckets, after)}

    async def aclose(self) -> None:
        for bucket in self.buckets:
            await bucket.aclose()


def _sum(sku: str, parts: list[Snapshot]) -> Snapshot:
    return Snapshot(
        sku=sku,
        total=sum(p.total for p in parts),
        available=sum(p.available for p in parts),
        held=sum(p.held for p in parts),
        sold=sum(p.sold for p in parts),
        reserve=sum(p.reserve for p in parts),
        limit_per_user=parts[0].limit_per_user,
        low_stock_line=parts[0].low_stock_line,
    )
