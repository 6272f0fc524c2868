"""The verified-token memory (flashsale.service.tokens.VerifiedTokens) at its edges, over
HTTP against a real service: a remembered token altered in any part is checked again and
refused; the memory at its bound under many buyers at once never hands one buyer's order
to another; the instant of expiry is the check's, never later; and a token is the buyer's
in every sale (tokens name a buyer, not a sale)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from service_support import (
    TOKEN_SECRET,
    Service,
    changed_keys,
    dump_redis,
    expect_json,
    service,  # noqa: F401  (fixture)
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.tokens import InvalidToken, VerifiedTokens, mint, verify


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tampered(token: str) -> dict[str, str]:
    """The token with one part changed each way an attacker would try, signature kept."""
    user, expires, member, signature = token.split(".")
    flip = "A" if signature[-1] != "A" else "B"
    return {
        "signature's last character": f"{user}.{expires}.{member}.{signature[:-1]}{flip}",
        "signature cut short": f"{user}.{expires}.{member}.{signature[:-1]}",
        "signature with padding": f"{user}.{expires}.{member}.{signature}=",
        "another user": f"mallory.{expires}.{member}.{signature}",
        "later expiry": f"{user}.{int(expires) + 3600}.{member}.{signature}",
        "member flag set": f"{user}.{expires}.1.{signature}",
        "user in capitals": f"{user.upper()}.{expires}.{member}.{signature}",
    }


async def test_a_remembered_token_altered_anywhere_is_refused_and_changes_nothing(
    service: Service, redis_client: Redis
) -> None:
    sku = "phone"
    await service.create_sale({sku: 5})
    token = mint(TOKEN_SECRET, "alice")
    await expect_json(
        await service.client.post(
            "/api/orders", json={"request_id": "r-1", "sku": sku}, headers=bearer(token)
        ),
        201,
    )
    assert service.state.identity.verified.get(token) is not None, "the token is remembered"
    before = await dump_redis(redis_client)
    for case, forged in tampered(token).items():
        resp = await service.client.post(
            "/api/orders", json={"request_id": f"r-{len(case)}", "sku": sku}, headers=bearer(forged)
        )
        await expect_json(resp, 401, "unauthorized")
        assert service.state.identity.verified.get(forged) is None, f"{case}: remembered"
    assert changed_keys(before, await dump_redis(redis_client)) == []
    resp = await service.client.post(
        "/api/orders", json={"request_id": "r-2", "sku": sku}, headers=bearer(token)
    )
    assert (await expect_json(resp, 201))["lines"] == [{"sku": sku, "qty": 1}]


async def test_the_memory_at_its_bound_under_many_buyers_at_once_keeps_each_order_its_buyers(
    service: Service,
) -> None:
    service.state.identity.verified.limit = 4  # far fewer than the buyers: every turn evicts
    sku = "phone"
    await service.create_sale({sku: 200})
    tokens = {f"buyer{i}": mint(TOKEN_SECRET, f"buyer{i}") for i in range(40)}

    async def order(user: str, round_: int) -> tuple[str, str]:
        resp = await service.client.post(
            "/api/orders", json={"request_id": f"r-{round_}", "sku": sku}, headers=bearer(tokens[user])
        )
        return user, (await expect_json(resp, 201))["order_id"]

    placed = []
    for round_ in range(2):
        placed += await asyncio.gather(*(order(user, round_) for user in tokens))
    assert len(service.state.identity.verified) <= 4
    assert len({order_id for _, order_id in placed}) == 80
    for user, order_id in placed:
        resp = await service.client.get(f"/api/orders/{order_id}", headers=bearer(tokens[user]))
        assert (await expect_json(resp, 200))["order_id"] == order_id


def test_at_its_expiry_a_remembered_token_goes_back_to_the_check_which_decides() -> None:
    """The memory trusts a token strictly before its ``expires`` second; the check accepts
    it through that second and refuses it after: past its expiry no path accepts it."""
    token = mint(TOKEN_SECRET, "alice", ttl_s=60, now=1_000_000)
    expires = 1_000_060
    buyer = verify(TOKEN_SECRET, token, now=expires)  # the last instant the check accepts
    memory = VerifiedTokens()
    memory.add(token, buyer, buyer.expires)
    assert memory.get(token, now=expires - 0.001) == buyer
    assert memory.get(token, now=expires) is None and len(memory) == 0
    with pytest.raises(InvalidToken, match="expired"):
        verify(TOKEN_SECRET, token, now=expires + 0.001)


async def test_a_token_is_its_buyers_in_every_sale(service: Service) -> None:
    skus = ["phone", "case"]
    for sku in skus:
        await service.create_sale({sku: 5})
    token = mint(TOKEN_SECRET, "alice")
    for sku in skus:
        resp = await service.client.post(
            "/api/orders", json={"request_id": "r-1", "sku": sku}, headers=bearer(token)
        )
        await expect_json(resp, 201)
