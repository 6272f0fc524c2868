"""Buyer identity: HMAC-signed bearer tokens ``<user>.<expires>.<member>.<signature>``.

Stateless, so any service process can check any token without a round trip. The
signature is base64url (no padding) of HMAC-SHA256 over ``<user>.<expires>.<member>``.

:class:`VerifiedTokens` remembers tokens already checked (each buyer sends theirs again
with every request), so the signature is not computed again for each one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["USER_ID", "Buyer", "InvalidToken", "VerifiedTokens", "mint", "verify"]

#: What a user id may be (the engine keys per-user counts by it).
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@-]{0,63}")
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{1,128}")


class InvalidToken(Exception):
    """Missing, malformed, forged or expired."""


@dataclass(frozen=True, slots=True)
class Buyer:
    user: str
    member: bool
    expires: int


@functools.lru_cache(maxsize=8)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret``, never updated: each signature starts from a
    copy of it. Keying is most of an HMAC's cost for a payload this short (it hashes the
    key's two pads), and a process signs with one or two secrets, not one per token."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def _sign(secret: str, payload: str) -> str:
    mac = _keyed(secret).copy()
    mac.update(payload.encode())
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def mint(secret: str, user: str, *, ttl_s: int = 3600, member: bool = False, now: float | None = None) -> str:
    if not USER_ID.fullmatch(user):
        raise ValueError("user ids are 1-64 characters of A-Z, a-z, 0-9, '_', '@' and '-'")
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = f"{user}.{expires}.{int(member)}"
    return f"{payload}.{_sign(secret, payload)}"


def verify(secret: str, token: str, *, now: float | None = None) -> Buyer:
    parts = token.split(".")
    if len(parts) != 4:
        raise InvalidToken("malformed token")
    user, expires, member, signature = parts
    # ASCII only: hmac.compare_digest raises TypeError on non-ASCII text, and a header
    # can carry any byte; str.isdigit() also accepts digits int() refuses ("²").
    if (
        not USER_ID.fullmatch(user)
        or not _EXPIRES.fullmatch(expires)
        or member not in ("0", "1")
        or not _SIGNATURE.fullmatch(signature)
    ):
        raise InvalidToken("malformed token")
    if not hmac.compare_digest(_sign(secret, f"{user}.{expires}.{member}"), signature):
        raise InvalidToken("bad signature")
    if int(expires) < (time.time() if now is None else now):
        raise InvalidToken("token expired")
    return Buyer(user, member == "1", int(expires))


class VerifiedTokens:
    """Tokens whose signature was checked, and until when each may be taken on trust:
    at most ``limit`` of them, the least recently used forgotten first.

    Only a token that passed its check is remembered, keyed by the whole token string
    (signature included), so a forged or altered token is never found here. A token is
    taken from here only before ``good_until``, which is no later than the instant its own
    check starts refusing it as expired; from then on the caller checks it again, and the
    buyer hears why it is refused. Nothing else can turn a good token bad inside one process: the secret
    and the JWT keys are read once, at start-up, and there is no revocation list.
    """

    def __init__(self, limit: int = 32_768) -> None:
        self.limit = limit
        self._tokens: OrderedDict[str, tuple[Buyer, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, token: str, now: float | None = None) -> Buyer | None:
        """The buyer of a remembered token still good now, else None."""
        known = self._tokens.get(token)
        if known is None:
            return None
        if (time.time() if now is None else now) >= known[1]:
            del self._tokens[token]  # expired: the check refuses it from now on
            return None
        self._tokens.move_to_end(token)
        return known[0]

    def add(self, token: str, buyer: Buyer, good_until: float) -> None:
        """Remember a token that just passed its check, good strictly before ``good_until``."""
        if self.limit <= 0:
            return
        self._tokens[token] = (buyer, good_until)
        self._tokens.move_to_end(token)
        while len(self._tokens) > self.limit:
            self._tokens.popitem(last=False)
