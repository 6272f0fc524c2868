"""The ``Inventory`` class: one sale's stock in Redis, reserved atomically."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import _validate as check
from ._batching import Coalescer
from ._errors import OK, REPLAYED, InvalidRequest, OutcomeUnknown, error_for
from ._keys import SaleKeys
from ._scripts import BatchScript, register_all
from ._types import ExpiryBatch, Hold, HoldState, Line, Snapshot, made_hold
from ._validate import Cart

__all__ = ["Inventory", "DEFAULT_HOLD_TTL"]

#: How long a hold keeps its units for the buyer to pay ("we keep your item 30 minutes").
DEFAULT_HOLD_TTL = timedelta(minutes=30)

_STOCK_FIELDS = ("total", "available", "held", "sold", "reserve", "limit", "low")
_UNCERTAIN = (RedisTimeoutError, RedisConnectionError)
_HELD = HoldState.HELD


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _HoldIds:
    """Hold ids, ``<sale>.<24 hex digits>``: 96 random bits each, as ``secrets`` draws them,
    but drawn for 64 holds at a time (one ``os.urandom`` call per batch, not per hold)."""

    _PER_DRAW = 64

    def __init__(self, sale: str) -> None:
        self._prefix = sale + "."
        self._pool = ""
        self._next = 0

    def take(self) -> str:
        at = self._next
        if at == len(self._pool):
            self._pool, at = secrets.token_hex(12 * self._PER_DRAW), 0
        self._next = at + 24
        return self._prefix + self._pool[at : at + 24]


def _ttl_ms(value: float | timedelta) -> int:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    # round() raises ValueError/OverflowError on nan and inf: refuse them as bad input.
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise InvalidRequest("hold TTL must be a number of seconds or a timedelta", field="hold_ttl")
    return check.ttl_ms(round(seconds * 1000))


class Inventory:
    """Stock of one sale, held in Redis. Every change is one atomic Lua script.

    ``redis`` is a ``redis.asyncio.Redis`` (or ``RedisCluster``) client that you own and
    close. Concurrent :meth:`reserve` calls made in the same event-loop turn are sent as
    one script call (``coalesce=False`` sends each on its own).
    """

    def __init__(
        self,
        redis: Any,
        sale: str,
        *,
        prefix: str = "fs",
        hold_ttl: float | timedelta = DEFAULT_HOLD_TTL,
        coalesce: bool = True,
        max_batch: int = 64,
    ) -> None:
        if not 1 <= max_batch <= check.MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{check.MAX_BATCH}")
        self.redis = redis
        self.sale = check.sale_id(sale)
        self.keys = SaleKeys(prefix, self.sale)
        self.hold_ttl_ms = _ttl_ms(hold_ttl)
        self._hold_ids = _HoldIds(self.sale)
        self._scripts = register_all(redis)
        self._reserve_keys = self.keys.for_reserve()
        self._close_keys = self.keys.for_hold_close()
        self._stock_keys = self.keys.for_stock_change()
        self._batch_reserve = BatchScript(redis, self._scripts["reserve"], self._reserve_keys)
        self._coalescer = Coalescer(self._batch_reserve, max_batch=max_batch) if coalesce else None
        self._lookups = Coalescer(self._lookup_call, max_batch=check.MAX_BATCH) if coalesce else None

    # ----------------------------------------------------------------- stocking
    async def stock(
        self,
        sku: str,
        total: int,
        *,
        reserve: int = 0,
        limit_per_user: int = 0,
        low_stock_line: int = 0,
    ) -> Snapshot:
        """Put a new SKU on sale: ``total`` units, of which ``reserve`` are held back."""
        sku = check.sku(sku)
        total = check.quantity(total, field="total", low=0, high=check.MAX_UNITS)
        reserve = check.quantity(reserve, field="reserve", low=0, high=total)
        limit_per_user = check.quantity(limit_per_user, field="limit_per_user", low=0, high=check.MAX_UNITS)
        low_stock_line = check.quantity(low_stock_line, field="low_stock_line", low=0, high=check.MAX_UNITS)
        reply = await self._stock_change("stock", [sku, total, reserve, limit_per_user, low_stock_line], sku)
        return await self._row_snapshot(sku, reply)

    async def restock(self, sku: str, units: int) -> Snapshot:
        """Add ``units`` to the stock on sale (total and available together)."""
        return await self.adjust(sku, check.quantity(units, field="units", high=check.MAX_UNITS))

    async def adjust(self, sku: str, delta: int) -> Snapshot:
        """Add (delta > 0) or write off (delta < 0) available units."""
        sku = check.sku(sku)
        if (
            not isinstance(delta, int)
            or isinstance(delta, bool)
            or delta == 0
            or abs(delta) > check.MAX_UNITS
        ):
            raise InvalidRequest("delta must be a non-zero whole number", field="delta")
        reply = await self._stock_change("adjust", [sku, delta], sku)
        return await self._row_snapshot(sku, reply)

    async def release_reserve(self, sku: str, units: int | None = None) -> Snapshot:
        """Move ``units`` (default: the whole pool) from the reserve pool into sale."""
        sku = check.sku(sku)
        n = 0 if units is None else check.quantity(units, field="units", high=check.MAX_UNITS)
        reply = await self._stock_change("release_reserve", [sku, n], sku)
        return await self._row_snapshot(sku, reply)

    # ------------------------------------------------------------- reservations
    async def reserve(
        self,
        user: str,
        lines: str | Line | Iterable[Line | tuple[str, int]],
        *,
        request_id: str,
        hold_ttl: float | timedelta | None = None,
    ) -> Hold:
        """Hold every line of a cart for ``user``, all or nothing, until the deadline.

        Retrying with the same ``request_id`` returns the first hold (``replayed=True``).
        Request ids are ``user``'s own: another buyer using the same id makes their own
        hold, and learns nothing about this one.
        Raises a :class:`Refused` (sold out, over the limit), an :class:`InvalidRequest`,
        or :class:`OutcomeUnknown` when Redis did not answer: retry with the same id.
        """
        cart = self.check_reserve(user, lines, request_id)
        ttl = self.hold_ttl_ms if hold_ttl is None else _ttl_ms(hold_ttl)
        hold_id = self._hold_ids.take()
        # Sent as bytes: redis-py packs bytes as they are, and a batch carries 7+ arguments
        # per reservation, so its own per-argument encoding is a large part of the cost.
        group: list[Any] = [
            request_id.encode(),
            hold_id.encode(),
            user.encode(),
            b"%d" % ttl,
            b"%d" % len(cart),
        ]
        for line in cart:
            group += [line.sku.encode(), b"%d" % line.qty]
        try:
            if self._coalescer is not None:
                reply = await self._coalescer.submit(group)
            else:
                reply = (await self._reserve_call([1, *group]))[0]
        except _UNCERTAIN as exc:
            raise OutcomeUnknown(
                "Redis did not answer in time; the hold may or may not exist. "
                "Retry with the same request id to learn the outcome.",
                request_id=request_id,
            ) from exc
        if isinstance(reply, int):  # the hold this call made: its deadline; the rest is known here
            return made_hold(hold_id, user, cart, _HELD, reply, reply - ttl, request_id, False)
        if int(reply[0]) != REPLAYED:
            raise error_for(reply, subject=request_id)
        return made_hold(
            _text(reply[1]),
            user,
            cart,
            HoldState(_text(reply[3])),
            int(reply[2]),
            int(reply[4]),
            request_id,
            True,
        )

    @staticmethod
    def check_reserve(
        user: str, lines: str | Line | Iterable[Line | tuple[str, int]], request_id: str
    ) -> Cart:
        """Validate a reservation without sending it: the cart, normalised (sorted by SKU),
        or :class:`InvalidRequest`. :meth:`reserve` does this too; a service calls it
        first to refuse bad input before any cheaper shortcut answers, and hands the
        :class:`Cart` it returns to :meth:`reserve`, which does not check that cart again
        (only the user and the request id, which cost little)."""
        check.ident(user, "user")
        check.ident(request_id, "request_id")
        return check.lines(lines)

    async def _reserve_call(self, argv: list[Any]) -> list[Any]:
        result: list[Any] = await self._scripts["reserve"](keys=self._reserve_keys, args=argv)
        return result

    async def made_hold(self, user: str, request_id: str) -> bool:
        """Whether ``user``'s ``request_id`` made a hold (so :meth:`reserve` with it would
        replay that hold, whatever the stock is now). One read, no script: a service that
        refuses a sold-out SKU without asking the script asks this first, so a retry whose
        first answer was lost still learns it has a hold. Lookups made in the same
        event-loop turn travel as one HMGET. Redis errors propagate as they are."""
        field = SaleKeys.request_field(check.ident(user, "user"), check.ident(request_id, "request_id"))
        if self._lookups is not None:
            return bool(await self._lookups.submit([field]))
        return bool((await self._lookup_call([1, field]))[0])

    async def _lookup_call(self, argv: list[Any]) -> list[Any]:
        found: list[Any] = await self.redis.hmget(self.keys.requests, argv[1:])
        return [value is not None for value in found]

    async def confirm(self, hold_id: str, *, user: str | None = None) -> Hold:
        """The buyer paid: the hold's units become sold. Idempotent.

        Raises :class:`HoldExpired` if the deadline passed first (the units went back on
        sale), :class:`HoldCancelled`, or :class:`HoldNotFound` (also for another user's hold).
        """
        return await self._close("confirm", hold_id, user)

    async def release(self, hold_id: str, *, user: str | None = None) -> Hold:
        """The buyer cancelled: the units go back on sale. Idempotent; a paid hold raises
        :class:`HoldPaid`."""
        return await self._close("release", hold_id, user)

    async def _close(self, script: str, hold_id: str, user: str | None) -> Hold:
        hold_id = self._own_hold_id(hold_id)
        owner = "" if user is None else check.ident(user, "user")
        await self._mutate(script, self._close_keys, [hold_id, owner], hold_id)
        hold = await self.hold(hold_id)
        assert hold is not None  # the script just wrote it
        return hold

    async def expire_due(self, *, limit: int = 100) -> ExpiryBatch:
        """The sweeper: lapse up to ``limit`` holds whose deadline has passed."""
        limit = check.quantity(limit, field="limit", high=check.MAX_BATCH)
        reply = await self._mutate("expire", self._close_keys, [limit], "")
        return ExpiryBatch(expired=tuple(_text(h) for h in reply[2:]), more=bool(int(reply[1])))

    # ------------------------------------------------------------------- reads
    async def hold(self, hold_id: str) -> Hold | None:
        """The hold as Redis has it now, or None."""
        hold_id = self._own_hold_id(hold_id)
        raw = await self.redis.hget(self.keys.holds, hold_id)
        if raw is None:
            return None
        return self._parse_hold(hold_id, raw)

    def _parse_hold(self, hold_id: str, raw: bytes | str) -> Hold:
        rec = json.loads(raw)
        return Hold(
            hold_id=hold_id,
            user=rec["u"],
            lines=tuple(Line(sku, int(qty)) for sku, qty in rec["l"]),
            state=HoldState(rec["s"]),
            deadline_ms=int(rec["d"]),
            created_ms=int(rec["c"]),
            request_id=rec["r"],
        )

    async def snapshot(self, sku: str) -> Snapshot | None:
        """One SKU's counters, or None if the sale has no such SKU."""
        sku = check.sku(sku)
        return self._parse_snapshot(sku, await self.redis.hmget(self.keys.stock, self._stock_fields(sku)))

    @staticmethod
    def _stock_fields(sku: str) -> list[str]:
        return [f"{sku}:{f}" for f in _STOCK_FIELDS]

    @staticmethod
    def _parse_snapshot(sku: str, values: list[Any]) -> Snapshot | None:
        if values[0] is None:
            return None
        return Snapshot(sku, *(int(v or 0) for v in values))

    async def snapshots(self) -> dict[str, Snapshot]:
        """Every SKU of the sale."""
        return self._parse_snapshots(await self.redis.hgetall(self.keys.stock))

    @staticmethod
    def _parse_snapshots(raw: dict[Any, Any]) -> dict[str, Snapshot]:
        fields: dict[str, dict[str, int]] = {}
        for key, value in raw.items():
            sku, _, name = _text(key).rpartition(":")
            fields.setdefault(sku, {})[name] = int(value)
        return {
            sku: Snapshot(sku, *(f.get(name, 0) for name in _STOCK_FIELDS))
            for sku, f in sorted(fields.items())
        }

    @staticmethod
    def sale_of(hold_id: str) -> str:
        """The sale a hold id belongs to (hold ids are ``<sale>.<random>``)."""
        sale, dot, rest = hold_id.partition(".")
        if not dot or not rest:
            raise InvalidRequest("not a hold id", field="hold_id")
        return check.sale_id(sale)

    def _own_hold_id(self, hold_id: str) -> str:
        hold_id = check.ident(hold_id, "hold_id")
        if self.sale_of(hold_id) != self.sale:
            raise InvalidRequest(f"hold {hold_id!r} is not from sale {self.sale!r}", field="hold_id")
        return hold_id

    async def _mutate(
        self,
        script: str,
        keys: list[str],
        args: list[Any],
        subject: str,
        *,
        retry_advice: str = "It is safe to retry.",
    ) -> list[Any]:
        try:
            reply: list[Any] = await self._scripts[script](keys=keys, args=args)
        except _UNCERTAIN as exc:
            raise OutcomeUnknown(
                f"Redis did not answer in time; {script} may or may not have happened. {retry_advice}",
            ) from exc
        if int(reply[0]) not in (OK, REPLAYED):
            raise error_for(reply, subject=subject)
        return reply

    async def _stock_change(self, script: str, args: list[Any], sku: str) -> list[Any]:
        # A fresh operation id per call: redis-py re-sends a command that timed out, and
        # the script records the id, so a re-sent restock is not applied twice. A retry
        # by the caller is a new operation, hence the advice to look before retrying.
        return await self._mutate(
            script,
            self._stock_keys,
            [*args, secrets.token_hex(12)],
            sku,
            retry_advice=f"Check snapshot({sku!r}) before retrying: a retry is a new change.",
        )

    async def _row_snapshot(self, sku: str, reply: list[Any]) -> Snapshot:
        snap = await self.snapshot(sku)
        assert snap is not None
        return snap

    async def load_scripts(self) -> bool:
        """Make sure Redis has every script cached (after a restart or a failover its
        cache is empty; calls would still work, reloading on NOSCRIPT, but a readiness
        probe wants to know). Returns True if all were already loaded."""
        scripts = list(self._scripts.values())
        loaded = await self.redis.script_exists(*[s.sha for s in scripts])
        for script, present in zip(scripts, loaded):
            if not present:
                await self.redis.script_load(script.script)
        return all(loaded)

    async def aclose(self) -> None:
        """Wait for reservations already sent. The Redis client stays open (it is yours)."""
        for coalescer in (self._coalescer, self._lookups):
            if coalescer is not None:
                await coalescer.drain()
