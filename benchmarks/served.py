"""The HTTP servers a benchmark drives, as processes of their own: the trivial endpoint
(``benchmarks.hello_app``) and the order service (``flashsale serve --workers 1``), each
started the way it is deployed, awaited until it answers, and always stopped.

Also what the service needs before it can take orders — a sale open now with one SKU
stocked deep enough never to sell out, and buyer tokens — made through its admin API
over HTTP (the benchmarks do not reach into the service's modules), and the removal of
every Redis key the service wrote under the run's prefix.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .servers import Servers

__all__ = ["HOT_SKU", "OrderService", "Served", "free_port", "forget_prefix", "hello_app", "order_service"]

ROOT = Path(__file__).resolve().parent.parent
#: The one SKU every benchmark order asks for.
HOT_SKU = "hot"
_DEEP_STOCK = 1_000_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    """A server process of this run: started, awaited until it answers, always stopped."""

    def __init__(
        self, command: list[str], env: dict[str, str], ready_path: str, log: Path, *, ready_s: float = 60.0
    ) -> None:
        self.port = free_port()
        self._ready_s = ready_s
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [*command, "--port", str(self.port)]
        self._env = env
        self._ready_path = ready_path
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    async def __aenter__(self) -> Served:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._command,
                env=self._env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self._ready_s
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(self._command[:4])} exited with {self.proc.returncode}:\n{self._tail()}"
                    )
                try:
                    async with session.get(self.url + self._ready_path) as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{' '.join(self._command)} did not become ready in {self._ready_s:g} s:\n{self._tail()}"
                    )
                await asyncio.sleep(0.1)

    async def __aexit__(self, *_exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)

    def _tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


def hello_app(workdir: Path) -> Served:
    """The HTTP ceiling: the trivial endpoint, one process, served as the service is."""
    return Served(
        [sys.executable, "-m", "benchmarks.hello_app"], dict(os.environ), "/healthz", workdir / "hello.log"
    )


@dataclass(frozen=True)
class OrderService:
    """The settings of one service process this run starts, and its admin calls."""

    servers: Servers
    #: Prefixes every Redis key the service writes; removed by :func:`forget_prefix`.
    prefix: str
    sale: str
    admin_token: str
    token_secret: str

    @classmethod
    def for_run(cls, servers: Servers, what: str) -> OrderService:
        return cls(
            servers=servers,
            prefix=f"bench{servers.token}{what}",
            sale=f"bench-{servers.token}-{what}",
            admin_token=secrets.token_hex(16),
            token_secret=secrets.token_hex(16),
        )

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLASHSALE_REDIS_URL": self.servers.redis_url,
            "FLASHSALE_DATABASE_URL": self.servers.database_url,
            "FLASHSALE_TOKEN_SECRET": self.token_secret,
            "FLASHSALE_ADMIN_TOKEN": self.admin_token,
            "FLASHSALE_KEY_PREFIX": self.prefix,
            "FLASHSALE_LOG_LEVEL": "WARNING",
            "FLASHSALE_ACCESS_LOG": "0",
        }

    async def _admin(self, url: str, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, url + path, json=body, headers={"Authorization": f"Bearer {self.admin_token}"}
            ) as resp,
        ):
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {(await resp.text())[:300]}")
            return await resp.json()

    async def open_sale(self, url: str) -> None:
        """The benchmark's sale, open now, one SKU that never sells out."""
        await self._admin(
            url,
            "POST",
            "/api/admin/sales",
            {
                "sale": self.sale,
                "opens_at": int(time.time() * 1000) - 1000,
                "open": True,
                "skus": [{"sku": HOT_SKU, "stock": _DEEP_STOCK}],
            },
        )

    async def buyer_tokens(self, url: str, prefix: str, count: int) -> list[str]:
        """Tokens of ``count`` distinct buyers named ``<prefix>0`` …, in that order."""
        body = await self._admin(url, "POST", "/api/admin/tokens", {"prefix": prefix, "count": count})
        tokens: dict[str, str] = body["tokens"]
        return [tokens[f"{prefix}{i}"] for i in range(count)]

    async def held(self, url: str) -> int:
        """Units of the hot SKU held now."""
        body = await self._admin(url, "GET", f"/api/admin/sales/{self.sale}")
        return int(body["skus"][HOT_SKU]["held"])


def order_service(service: OrderService, workdir: Path) -> Served:
    """``flashsale serve`` with one process, against the run's Redis and PostgreSQL."""
    return Served(
        [sys.executable, "-m", "flashsale", "serve", "--workers", "1"],
        service.environ(),
        "/readyz",
        workdir / f"service-{service.prefix}.log",
    )


async def forget_prefix(servers: Servers, prefix: str) -> None:
    """Remove every key written under ``prefix`` (the run's own keys only)."""
    redis = servers.redis()
    try:
        batch: list[Any] = []
        async for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
    finally:
        await redis.aclose()
