"""Input checks done before anything is sent to Redis (the scripts check again)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from ._errors import InvalidQuantity, InvalidRequest
from ._types import Line

# The same bounds are in lua/includes/counts.lua (tests check the two agree).
MAX_LINES = 20
MAX_QTY = 10_000
MAX_UNITS = 1_000_000_000
MAX_TTL_MS = 7 * 24 * 3600 * 1000
MAX_BATCH = 1000

_SALE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_SKU = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sale_id(value: object) -> str:
    if not isinstance(value, str) or not _SALE.fullmatch(value):
        raise InvalidRequest(
            "a sale id is 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit",
            field="sale",
        )
    return value


def sku(value: object) -> str:
    if not isinstance(value, str) or not _SKU.fullmatch(value):
        raise InvalidRequest("a SKU is 1-64 ASCII characters of A-Z, a-z, 0-9, '_' and '-'", field="sku")
    return value


#: The last two ids that passed :func:`ident`, kept by identity. A reservation's user and
#: request id are checked by the service (``check_reserve``) and again by ``Inventory.reserve``
#: in the same step of its task (which must check them: a bad id would spoil the whole batch
#: it travels in), so the second check of each is the same string object: an identity test
#: instead of a regular expression, with nothing kept beyond two references (a table of every
#: id that passed would keep each order's request id alive, issue 15).
_NOTHING = object()  # (what the two start as: no value a caller can pass)
_passed: list[object] = [_NOTHING, _NOTHING]


def ident(value: object, field: str) -> str:
    """A user, request or hold id: 1-64 ASCII characters."""
    if value is _passed[0] or value is _passed[1]:
        return value  # type: ignore[return-value]  # (only a str ever gets in)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequest(
            f"{field} must be 1-64 ASCII characters of A-Z, a-z, 0-9, '_', '.', '@' and '-'",
            field=field,
        )
    _passed[1] = _passed[0]
    _passed[0] = value
    return value


def quantity(value: object, *, field: str = "qty", low: int = 1, high: int = MAX_QTY) -> int:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise InvalidQuantity(f"{field} must be a whole number from {low} to {high}", field=field)
    return int(value)  # type: ignore[call-overload,no-any-return]


_MADE_HERE = object()


class Cart(tuple[Line, ...]):
    """A cart :func:`lines` accepted: 1-20 lines, one per SKU, each SKU and quantity
    valid, sorted by SKU. Only :func:`lines` makes one (``Cart(...)`` raises
    ``TypeError``), so a Cart is checked once: ``Inventory.reserve`` takes a cart
    ``Inventory.check_reserve`` returned as it is. A copy or an unpickled cart is a plain
    tuple, checked again."""

    __slots__ = ()

    def __new__(cls, lines: Iterable[Line], made: object = None) -> Cart:
        if made is not _MADE_HERE:
            raise TypeError("a Cart is made by Inventory.check_reserve, not directly")
        return super().__new__(cls, lines)

    def __reduce__(self) -> tuple[type[tuple[Line, ...]], tuple[tuple[Line, ...]]]:
        return tuple, (tuple(self),)


_CART = "a cart is a SKU, a Line, or a list of Line(sku, qty) or (sku, qty) pairs"


@functools.lru_cache(maxsize=4096)
def _one_unit(value: str) -> Cart:
    """The cart of one unit of SKU ``value``. Carts are immutable, so one per SKU serves
    every reservation of it (a surge is thousands per second of the same few SKUs)."""
    return Cart((Line(sku(value), 1),), _MADE_HERE)


def lines(value: Iterable[Line | tuple[str, int]] | Line | str) -> Cart:
    """A cart: 1-20 lines, one per SKU, sorted so the same cart has one fingerprint.
    A :class:`Cart` is one already: it is returned as it is."""
    if type(value) is Cart:
        return value
    if isinstance(value, str):  # one unit of one SKU: the usual cart, so the short way
        return _one_unit(value)
    if isinstance(value, Line):
        value = [value]
    elif not isinstance(value, Iterable):
        raise InvalidRequest(_CART, field="lines")
    out: list[Line] = []
    for item in value:
        if len(out) == MAX_LINES:  # stop before reading an endless iterable
            raise InvalidRequest(f"a cart has at most {MAX_LINES} lines", field="lines")
        if isinstance(item, Line):
            line = item
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            line = Line(item[0], item[1])
        else:
            raise InvalidRequest(_CART, field="lines")
        out.append(Line(sku(line.sku), quantity(line.qty)))
    if not out:
        raise InvalidRequest("a cart needs at least one line", field="lines")
    if len({line.sku for line in out}) != len(out):
        raise InvalidRequest("each SKU may appear on one line only", field="lines")
    return Cart(sorted(out, key=lambda line: line.sku), _MADE_HERE)


def ttl_ms(value: object) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_TTL_MS:  # type: ignore[operator]
        raise InvalidRequest(f"hold TTL must be 1 ms to {MAX_TTL_MS} ms", field="hold_ttl")
    return int(value)  # type: ignore[call-overload,no-any-return]
