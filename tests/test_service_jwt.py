"""Identity a real shop can use: standard JWT bearer tokens from an identity provider
(HS256 with a secret, RS256 with a PEM public key, ES256 from a JWKS file), beside
flashsale's own HMAC tokens. A good token's user and member flag are what the service acts
on; a forged, expired, wrong-audience, wrong-issuer or wrong-algorithm token is 401 JSON
(never 500) and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis.asyncio import Redis
from service_support import (
    Service,
    ServiceFactory,
    dump_redis,
    new_id,
    now_ms,
    sale_keys,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.identity import JwtVerifier
from flashsale.settings import Settings, SettingsError

ISSUER, AUDIENCE = "https://id.shop.example", "flashsale"
HS_SECRET = "shop-idp-secret-0123456789abcdef"  # 32 bytes: PyJWT's minimum for HS256
LEEWAY_S = 5  # the clock skew flashsale.service.identity allows past exp


def _claims(user: str = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, **extra}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An RSA key pair (PEM public key file) and an EC key pair (in a JWKS file)."""
    folder = tmp_path_factory.mktemp("jwt")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / "rsa.pem").write_bytes(rsa_pem)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (folder / "jwks.json").write_text(
        json.dumps({"keys": [{**jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"}]})
    )
    return {"rsa": rsa_key, "rsa_pem": rsa_pem, "ec": ec_key, "folder": folder}


async def _jwt_service(start: ServiceFactory, keys: dict[str, Any]) -> Service:
    folder: Path = keys["folder"]
    return await start(
        jwt_secret=HS_SECRET,
        jwt_public_key=str(folder / "rsa.pem"),
        jwt_jwks=str(folder / "jwks.json"),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_algorithms="HS256,RS256,ES256",
    )


async def _order(service: Service, token: str | bytes, sku: str) -> tuple[int, dict[str, Any]]:
    raw = token if isinstance(token, bytes) else token.encode()
    status, body = await service.raw(
        "POST",
        "/api/orders",
        {"Authorization": b"Bearer " + raw, "Content-Type": b"application/json"},
        json.dumps({"request_id": new_id("r"), "sku": sku, "qty": 1}).encode(),
    )
    return status, body


async def test_good_jwts_of_each_kind_place_orders_as_their_user(
    start_service: ServiceFactory, keys: dict[str, Any], redis_client: Redis
) -> None:
    service = await _jwt_service(start_service, keys)
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10, "limit_per_user": 1}])
    tokens = {
        "hs256": jwt.encode(_claims("hs-user"), HS_SECRET, algorithm="HS256"),
        "rs256": jwt.encode(_claims("rs-user"), keys["rsa"], algorithm="RS256"),
        "es256": jwt.encode(_claims("es-user"), keys["ec"], algorithm="ES256", headers={"kid": "ec-1"}),
    }
    for kind, token in tokens.items():
        status, body = await _order(service, token, sku)
        assert status == 201, (kind, body)
        hold = json.loads(await redis_client.hget(sale_keys(body["sale"]).holds, body["order_id"]) or "{}")
        assert hold.get("u") == f"{kind[:2]}-user", (kind, hold)
    # flashsale's own tokens still work beside them
    resp = await service.order("own-token-user", sku)
    assert resp.status == 201, await resp.text()


async def test_the_member_claim_is_what_the_service_acts_on(
    start_service: ServiceFactory, keys: dict[str, Any]
) -> None:
    """Members' early access: before T0 a member's JWT orders, a non-member's is refused."""
    service = await _jwt_service(start_service, keys)
    sku = new_id("sku")
    await service.create_sale({sku: 5}, opens_at=now_ms() + 60_000, early_access_s=120)
    member = jwt.encode(_claims("vip", member=True), HS_SECRET, algorithm="HS256")
    plain = jwt.encode(_claims("walk-in", member=False), HS_SECRET, algorithm="HS256")
    status, body = await _order(service, plain, sku)
    assert (status, body["error"]) == (409, "sale_not_open"), body
    status, body = await _order(service, member, sku)
    assert status == 201, body


def _bad_tokens(keys: dict[str, Any]) -> list[tuple[str, str | bytes]]:
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    good_hs = jwt.encode(_claims(), HS_SECRET, algorithm="HS256")
    header, payload, _sig = good_hs.split(".")
    return [
        (
            "forged: HS256 with another secret",
            jwt.encode(_claims(), "not-the-shop-secret-0123456789abcd", "HS256"),
        ),
        ("forged: RS256 with another key", jwt.encode(_claims(), other_rsa, algorithm="RS256")),
        (
            "forged: ES256 with another key",
            jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), "ES256"),
        ),
        ("expired", jwt.encode(_claims(exp=now - 60), HS_SECRET, algorithm="HS256")),
        ("wrong audience", jwt.encode(_claims(aud="another-service"), HS_SECRET, algorithm="HS256")),
        ("wrong issuer", jwt.encode(_claims(iss="https://evil.example"), HS_SECRET, algorithm="HS256")),
        ("no exp", jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, HS_SECRET, "HS256")),
        ("no user claim", jwt.encode({k: v for k, v in _claims().items() if k != "sub"}, HS_SECRET, "HS256")),
        ("user id flashsale refuses", jwt.encode(_claims("al ice/../x"), HS_SECRET, algorithm="HS256")),
        ("user id not text", jwt.encode({**_claims(), "sub": 42}, HS_SECRET, algorithm="HS256")),
        ("alg none", jwt.encode(_claims(), None, algorithm="none")),
        ("wrong algorithm: HS512 not accepted", jwt.encode(_claims(), HS_SECRET * 2, algorithm="HS512")),
        (
            "algorithm confusion: HS256 signed with the RSA public key",
            _hs256_with_key(keys["rsa_pem"], _claims()),
        ),
        ("tampered payload", f"{header}.{_b64(json.dumps(_claims('mallory')).encode())}.{_sig}"),
        ("header not JSON", f"{_b64(b'not json')}.{payload}.{_sig}"),
        ("three empty parts", ".."),
        ("not base64", "@@@.@@@.@@@"),
        ("bytes that are not UTF-8", b"\xff\xfe.\xfa.\xfb"),
    ]


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256_with_key(secret: bytes, claims: dict[str, Any]) -> str:
    """What PyJWT refuses to make: an HS256 token whose secret is a PEM public key."""
    import hashlib
    import hmac

    signing = (
        f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}"
    )
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"


async def test_bad_jwts_are_401_json_and_change_nothing(
    start_service: ServiceFactory, keys: dict[str, Any], redis_client: Redis
) -> None:
    service = await _jwt_service(start_service, keys)
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10, "limit_per_user": 1}])
    before = await dump_redis(redis_client)
    for what, token in _bad_tokens(keys):
        status, body = await _order(service, token, sku)
        assert status == 401, (what, status, body)
        assert body["error"] == "unauthorized" and body["message"], (what, body)
    assert await dump_redis(redis_client) == before


async def test_without_jwt_settings_a_jwt_is_refused(start_service: ServiceFactory) -> None:
    """A service that trusts no identity provider accepts no JWT, however well made."""
    service = await start_service()
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10}])
    status, body = await _order(service, jwt.encode(_claims(), HS_SECRET, algorithm="HS256"), sku)
    assert status == 401 and body["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"jwt_public_key": "/nonexistent/key.pem"}, "cannot read the JWT key"),
        ({"jwt_secret": HS_SECRET, "jwt_algorithms": "HS256,XX999"}, "XX999"),
        ({"jwt_secret": HS_SECRET, "jwt_algorithms": "RS256"}, "FLASHSALE_JWT_PUBLIC_KEY"),
    ],
)
def test_unusable_jwt_settings_are_a_clear_settings_error(overrides: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        JwtVerifier.from_settings(Settings(token_secret="x", admin_token="y", **overrides))  # type: ignore[arg-type]


async def test_a_remembered_jwt_is_refused_once_past_its_leeway(
    start_service: ServiceFactory, keys: dict[str, Any]
) -> None:
    """A JWT a few seconds past ``exp`` is still inside PyJWT's leeway, so it is accepted
    (and remembered); it is refused from the instant PyJWT would refuse it."""
    service = await _jwt_service(start_service, keys)
    sku = new_id("sku")
    await service.create_sale([{"sku": sku, "stock": 10}])
    exp = int(time.time()) - 3
    token = jwt.encode(_claims("late", exp=exp), HS_SECRET, algorithm="HS256")
    status, body = await _order(service, token, sku)
    assert status == 201, body
    while time.time() <= exp + LEEWAY_S:  # the clock itself passing the instant, not a guessed sleep
        await asyncio.sleep(0.05)
    status, body = await _order(service, token, sku)
    assert (status, body["error"]) == (401, "unauthorized") and "expired" in body["message"], body
