"""What the war-room tests share: a factory that runs the real app (``create_app``) with
the war-room routes mounted the way ``flashsale.service.app`` mounts them, on a real loopback
port (a browser has to reach it), plus a client and the page's data endpoint.

Test modules import the fixture they use from here (``from warroom_support import
start_warroom``); pytest finds a fixture wherever the test module's namespace has it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientSession, web
from redis.asyncio import Redis
from service_support import ADMIN, buyer, expect_json, new_id, service_settings

from flashsale.service.app import create_app
from flashsale.service.transport import ServiceRunner
from flashsale.settings import Settings


@dataclass
class WarRoom:
    """One running service process with the war room, and a plain HTTP client for it."""

    base_url: str
    http: ClientSession
    settings: Settings

    async def data(self) -> dict[str, Any]:
        return await expect_json(await self.http.get("/api/admin/warroom", headers=ADMIN), 200)  # type: ignore[no-any-return]

    async def data_until(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll the data endpoint (as the page does) until ``check`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            data = await self.data()
            if check(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"war-room data never satisfied the check within {timeout} s; last: {data}"
                )
            await asyncio.sleep(0.2)

    async def create_sale(self, skus: list[dict[str, Any]], **fields: Any) -> str:
        body = {"sale": new_id("sale"), "skus": skus, **fields}
        if "opens_at" not in fields:
            body.setdefault("open", True)
        await expect_json(await self.http.post("/api/admin/sales", json=body, headers=ADMIN), 201)
        return str(body["sale"])

    async def order(self, user: str, sku: str, qty: int = 1) -> int:
        body = {"request_id": new_id("r"), "sku": sku, "qty": qty}
        async with self.http.post("/api/orders", json=body, headers=buyer(user)) as resp:
            await resp.read()
            return resp.status


WarRoomFactory = Callable[..., Awaitable[WarRoom]]


@pytest.fixture
async def start_warroom(redis_client: Redis, redis_url: str) -> AsyncIterator[WarRoomFactory]:
    """``await start_warroom(database_url=..., **settings_overrides)``: the service (which
    mounts the war room), served by the service's ``ServiceRunner`` + ``TCPSite`` on
    127.0.0.1 and a free port, on the suite's (freshly flushed) Redis."""
    runners: list[ServiceRunner] = []
    clients: list[ClientSession] = []

    async def start(**overrides: Any) -> WarRoom:
        settings = service_settings(redis_url, **overrides)
        app = create_app(settings)
        runner = ServiceRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base_url = f"http://127.0.0.1:{port}"
        http = ClientSession(base_url=base_url)
        clients.append(http)
        return WarRoom(base_url, http, settings)

    try:
        yield start
    finally:
        for http in clients:
            await http.close()
        for runner in reversed(runners):
            await runner.cleanup()
