"""Who the buyer is: the bearer token of a buyer request, checked without a round trip.

Two kinds of token are accepted side by side:

* **flashsale's own HMAC tokens** (``<user>.<expires>.<member>.<signature>``, see
  :mod:`flashsale.service.tokens`): what ``flashsale token`` mints and the drills use;
* **standard JWTs from the shop's identity provider**, when configured: HS256 with a shared
  secret (``FLASHSALE_JWT_SECRET``), or RS256 / ES256 with a public key
  (``FLASHSALE_JWT_PUBLIC_KEY``, a PEM file) or a JWKS file (``FLASHSALE_JWT_JWKS``, keys
  picked by ``kid``). The issuer and audience are checked when configured; the user id and
  the member flag are read from configurable claims (``sub`` and ``member`` by default).

A JWT is accepted only with one of the configured algorithms, and only with a key of that
algorithm's family: an HS256 token signed with the RSA public key as its secret (the
classic algorithm confusion) or ``alg: none`` is refused. Every refusal is
:class:`~flashsale.service.tokens.InvalidToken` (401 at the HTTP edge), never an error.
PyJWT does the signature and claim checks: a well-kept library, not code to write again.

A token that passed is remembered (:class:`~flashsale.service.tokens.VerifiedTokens`) until
the instant its check would refuse it as expired: a buyer's next requests skip the
signature. Refusals are never remembered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from flashsale.service.tokens import USER_ID, Buyer, InvalidToken, VerifiedTokens, verify
from flashsale.settings import Settings, SettingsError

__all__ = ["Identity", "JwtVerifier"]

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"})
_LEEWAY_S = 5  # clocks of the identity provider and the service may differ by this much


def _member(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return False


@dataclass(frozen=True, slots=True)
class JwtVerifier:
    """Checks JWTs as configured (see the module docstring)."""

    algorithms: frozenset[str]
    secret: str | None = None
    public_key: Any = None  # a cryptography public key, for RS*/ES*/PS*
    jwks: jwt.PyJWKSet | None = None
    issuer: str | None = None
    audience: str | None = None
    user_claim: str = "sub"
    member_claim: str = "member"

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """None when no JWT key is configured; :class:`SettingsError` when one is unusable."""
        if not (settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks):
            return None
        public_key = jwks = None
        try:
            if settings.jwt_public_key:
                public_key = load_pem_public_key(Path(settings.jwt_public_key).read_bytes())
            if settings.jwt_jwks:
                jwks = jwt.PyJWKSet.from_dict(json.loads(Path(settings.jwt_jwks).read_text()))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise SettingsError(f"cannot read the JWT key: {exc}") from None
        if settings.jwt_algorithms:
            algorithms = frozenset(a.strip() for a in settings.jwt_algorithms.split(",") if a.strip())
        else:
            algorithms = frozenset(
                ({"HS256"} if settings.jwt_secret else set())
                | ({"RS256", "ES256"} if public_key is not None or jwks is not None else set())
            )
        unknown = algorithms - _HMAC_ALGORITHMS - _KEY_ALGORITHMS
        if unknown or not algorithms:
            raise SettingsError(
                f"FLASHSALE_JWT_ALGORITHMS: {', '.join(sorted(unknown)) or 'none given'} "
                "(use HS256, RS256, ES256 and their 384/512 forms)"
            )
        if algorithms & _HMAC_ALGORITHMS and not settings.jwt_secret:
            raise SettingsError("an HS* JWT algorithm needs FLASHSALE_JWT_SECRET")
        if algorithms & _KEY_ALGORITHMS and public_key is None and jwks is None:
            raise SettingsError(
                "an RS*/ES* JWT algorithm needs FLASHSALE_JWT_PUBLIC_KEY or FLASHSALE_JWT_JWKS"
            )
        return cls(
            algorithms=algorithms,
            secret=settings.jwt_secret,
            public_key=public_key,
            jwks=jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            user_claim=settings.jwt_user_claim,
            member_claim=settings.jwt_member_claim,
        )

    def _key(self, header: dict[str, Any]) -> Any:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken(f"JWT algorithm {str(alg)[:16]!r} is not accepted")
        if alg in _HMAC_ALGORITHMS:
            return self.secret
        if self.jwks is not None:
            kid = header.get("kid")
            for key in self.jwks.keys:
                if (kid is None or key.key_id == kid) and (key.algorithm_name in (None, alg)):
                    return key.key
            if self.public_key is None:
                raise InvalidToken("no JWKS key for this token")
        return self.public_key

    def buyer(self, token: str) -> Buyer:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self._key(header),
                algorithms=[header["alg"]],
                audience=self.audience,
                issuer=self.issuer,
                leeway=_LEEWAY_S,
                options={"require": ["exp", self.user_claim], "verify_aud": self.audience is not None},
            )
        except InvalidToken:
            raise
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            # Any JWT the library refuses: forged, wrong audience/issuer, malformed, a key of
            # the wrong family. The reason is the library's, without the token.
            raise InvalidToken(f"JWT refused: {type(exc).__name__}") from None
        user = claims.get(self.user_claim)
        if not isinstance(user, str) or not USER_ID.fullmatch(user):
            raise InvalidToken(f"JWT claim {self.user_claim!r} is not a user id flashsale accepts")
        try:
            expires = int(claims["exp"])
        except (TypeError, ValueError):
            raise InvalidToken("JWT 'exp' is not a number") from None
        return Buyer(user, _member(claims.get(self.member_claim)), expires)


@dataclass(frozen=True, slots=True)
class Identity:
    """The buyer behind a bearer token: flashsale's HMAC tokens, and JWTs when configured."""

    token_secret: str
    jwt: JwtVerifier | None = None
    verified: VerifiedTokens = field(default_factory=VerifiedTokens, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Identity:
        return cls(settings.token_secret or "", JwtVerifier.from_settings(settings))

    def buyer(self, token: str) -> Buyer:
        known = self.verified.get(token)
        if known is not None:
            return known
        if self.jwt is not None and token.count(".") == 2:  # header.payload.signature
            buyer = self.jwt.buyer(token)
            # PyJWT refuses once exp <= now - leeway (exp read as an int, as Buyer.expires is).
            self.verified.add(token, buyer, buyer.expires + _LEEWAY_S)
            return buyer
        if not self.token_secret:
            raise InvalidToken("unknown token")
        buyer = verify(self.token_secret, token)
        self.verified.add(token, buyer, buyer.expires)  # verify() refuses once expires < now
        return buyer
