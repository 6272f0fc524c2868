"""Buyer identity: every buyer endpoint answers 401 JSON (with WWW-Authenticate) to a
missing, malformed, forged or expired token and touches nothing; a valid token's user
and member flag are what the service acts on."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import pytest
from redis.asyncio import Redis
from service_support import (
    TOKEN_SECRET,
    Service,
    buyer,
    changed_keys,
    dump_redis,
    expect_json,
    new_id,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.identity import Identity
from flashsale.service.tokens import InvalidToken, VerifiedTokens, mint, verify


def _signed(payload: str, secret: str = TOKEN_SECRET) -> str:
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def _bad_tokens() -> list[tuple[str, bytes | str | None]]:
    """(what is wrong, the Authorization header) — None: no header at all."""
    future = int(time.time()) + 3600
    alice = mint(TOKEN_SECRET, "alice")
    user, expires, member, signature = alice.split(".")
    return [
        ("missing header", None),
        ("empty header", b""),
        ("scheme only", b"Bearer"),
        ("other scheme", b"Basic " + alice.encode()),
        ("three parts", f"Bearer {user}.{expires}.{signature}".encode()),
        ("five parts", f"Bearer {alice}.x".encode()),
        ("expiry not a number", f"Bearer {_signed(f'alice.soon.{member}')}".encode()),
        ("expiry in other digits", "Bearer " + _signed(f"alice.\u0661\u0662.{member}")),
        ("member flag not 0/1", f"Bearer {_signed(f'alice.{future}.2')}".encode()),
        ("user with a space", f"Bearer {_signed(f'al ice.{future}.0')}".encode()),
        ("forged: signed with another secret", f"Bearer {_signed(f'alice.{future}.0', 'guess')}".encode()),
        ("tampered user", f"Bearer mallory.{expires}.{member}.{signature}".encode()),
        ("tampered expiry", f"Bearer {user}.{int(expires) + 1}.{member}.{signature}".encode()),
        ("tampered member flag", f"Bearer {user}.{expires}.1.{signature}".encode()),
        (
            "signature of another token",
            f"Bearer {user}.{expires}.{member}.{mint(TOKEN_SECRET, 'bob').split('.')[3]}".encode(),
        ),
        ("expired", f"Bearer {mint(TOKEN_SECRET, 'alice', ttl_s=-5)}".encode()),
        ("non-ASCII signature", f"Bearer {user}.{expires}.{member}.{signature[:-1]}\u00e9".encode()),
        ("bytes that are not UTF-8", f"Bearer {user}.{expires}.{member}.".encode() + b"\xff\xfe"),
        ("over-long", b"Bearer " + b"a" * 4000),
    ]


BAD_TOKENS = _bad_tokens()


@pytest.mark.parametrize(("label", "header"), BAD_TOKENS, ids=[label for label, _ in BAD_TOKENS])
async def test_every_buyer_endpoint_answers_401_and_touches_nothing(
    service: Service, redis_client: Redis, label: str, header: bytes | str | None
) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    order = await expect_json(await service.order("alice", sku), 201)
    order_id = order["order_id"]
    raw_header = header.encode() if isinstance(header, str) else header
    headers = {} if raw_header is None else {"Authorization": raw_header}
    before = await dump_redis(redis_client)
    body = f'{{"request_id": "r-{label.replace(" ", "-")[:40]}", "sku": "{sku}", "qty": 1}}'.encode()
    for method, path in [
        ("POST", "/api/orders"),
        ("GET", f"/api/orders/{order_id}"),
        ("POST", f"/api/orders/{order_id}/pay"),
        ("POST", f"/api/orders/{order_id}/cancel"),
    ]:
        status, reply = await service.raw(
            method, path, {**headers, "Content-Type": b"application/json"}, body
        )
        assert (status, reply.get("error")) == (401, "unauthorized"), (
            f"{method} {path} with {label}: {status} {reply}"
        )
        assert reply["message"]
    assert changed_keys(before, await dump_redis(redis_client)) == []


async def test_401_says_bearer_and_what_to_do(service: Service) -> None:
    resp = await service.client.post("/api/orders", json={"request_id": "r", "sku": "x"})
    body = await expect_json(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert "Bearer" in body["message"]
    expired = await service.client.get(
        "/api/orders/a.b", headers={"Authorization": f"Bearer {mint(TOKEN_SECRET, 'a', ttl_s=-1)}"}
    )
    body = await expect_json(expired, 401, "unauthorized")
    assert "expired" in body["message"] and "new token" in body["message"]


async def test_the_token_decides_who_orders(service: Service) -> None:
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    order = await expect_json(await service.order("alice", sku), 201)
    # The body cannot name another buyer: the order belongs to the token's user.
    resp = await service.client.post(
        "/api/orders", json={"request_id": "r-x", "sku": sku, "user": "alice"}, headers=buyer("bob")
    )
    bobs = await expect_json(resp, 201)
    await expect_json(await service.client.get(f"/api/orders/{bobs['order_id']}", headers=buyer("bob")), 200)
    await expect_json(
        await service.client.get(f"/api/orders/{bobs['order_id']}", headers=buyer("alice")), 404
    )
    await expect_json(
        await service.client.get(f"/api/orders/{order['order_id']}", headers=buyer("alice")), 200
    )


async def test_a_token_signed_with_another_services_secret_is_refused(start_service: object) -> None:
    other = await start_service(token_secret="another-secret")  # type: ignore[operator]
    resp = await other.client.post(
        "/api/orders", json={"request_id": "r", "sku": "x"}, headers=buyer("alice")
    )
    await expect_json(resp, 401, "unauthorized")


async def _until_past(instant: float) -> None:
    """Wait for the clock itself to pass ``instant`` (a condition, not a guessed sleep)."""
    while time.time() <= instant:
        await asyncio.sleep(0.05)


async def test_a_remembered_token_is_refused_once_it_expires(service: Service) -> None:
    """The service remembers tokens it checked; one that expires is refused from the
    instant it would have been without that memory."""
    sku = new_id("sku")
    await service.create_sale({sku: 5})
    # A token's expiry is a whole second (mint truncates), so a TTL of n s leaves it n-1 to
    # n s: with ttl_s=1 it could lapse before the first answer on a busy machine (it did, in
    # CI: 401 "token expired" for the first order). At least 2 s is left with 3.
    token = mint(TOKEN_SECRET, "brief", ttl_s=3)
    headers = {"Authorization": f"Bearer {token}"}
    resp = await service.client.post("/api/orders", json={"request_id": "r-1", "sku": sku}, headers=headers)
    await expect_json(resp, 201)
    await _until_past(int(token.split(".")[1]))
    resp = await service.client.post("/api/orders", json={"request_id": "r-2", "sku": sku}, headers=headers)
    body = await expect_json(resp, 401, "unauthorized")
    assert "expired" in body["message"]


def test_remembered_tokens_are_bounded_and_never_stand_in_for_a_check() -> None:
    identity = Identity(TOKEN_SECRET, verified=VerifiedTokens(limit=3))
    tokens = [mint(TOKEN_SECRET, f"buyer{i}") for i in range(10)]
    for _ in range(2):
        assert [identity.buyer(t).user for t in tokens] == [f"buyer{i}" for i in range(10)]
        assert len(identity.verified) == 3
    # The remembered token, one character changed, is checked (and refused), not recalled.
    user, expires, member, signature = tokens[-1].split(".")
    with pytest.raises(InvalidToken):
        identity.buyer(f"{user}.{expires}.{member}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}")
    # Past its expiry a remembered token is not recalled: the check decides, and refuses.
    buyer = identity.verified.get(tokens[-1])
    assert buyer is not None
    assert identity.verified.get(tokens[-1], now=buyer.expires) is None
    assert len(identity.verified) == 2


def test_signatures_start_afresh_for_every_token_and_secret() -> None:
    """Each secret's key is prepared once and every signature starts from a copy of it: a
    signature never carries a previous token's bytes, nor another secret's key."""
    secrets_ = [TOKEN_SECRET, "another-secret", TOKEN_SECRET]
    now = time.time()
    for n, secret in enumerate(secrets_ * 3):
        payload = f"buyer{n}.{int(now + 3600)}.{n % 2}"
        token = mint(secret, f"buyer{n}", member=bool(n % 2), now=now)
        assert token == _signed(payload, secret)
        assert verify(secret, token).user == f"buyer{n}"
        for other in {TOKEN_SECRET, "another-secret"} - {secret}:
            with pytest.raises(InvalidToken, match="bad signature"):
                verify(other, token)
