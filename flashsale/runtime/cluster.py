"""An embedded Redis Cluster: three masters on loopback, from the same engine the single
embedded server runs (``FLASHSALE_REDIS_ENGINE``, Valkey by default; see
:mod:`flashsale.runtime.engines`), or the ``binary`` given.

For tests and local scale-out rehearsals only: no replicas (a cluster of three masters
shows every cross-slot mistake, which is what it is for), slots split evenly, and the
cluster is ready when every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from flashsale.runtime.embedded import RedisServer, ServerError
from flashsale.runtime.engines import Engine

__all__ = ["RedisClusterServer", "CLUSTER_SLOTS"]

CLUSTER_SLOTS = 16384


def _free_cluster_port() -> int:
    """A free port p with p + 10000 free too: Redis Cluster's bus listens there, so the
    usual ephemeral range (above 55535) will not do."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise ServerError("found no free port pair for an embedded Redis Cluster node")


class RedisClusterServer:
    """``masters`` real server processes of one engine joined into one cluster."""

    def __init__(
        self, *, masters: int = 3, binary: Path | str | None = None, start_timeout: float = 30.0
    ) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self.start_timeout = start_timeout
        self.nodes: list[RedisServer] = []
        # Resolved once, so every node runs the same binary whatever the environment does meanwhile.
        self.engine: Engine = RedisServer(binary=binary).engine

    @property
    def url(self) -> str:
        """A URL for ``redis.asyncio.RedisCluster.from_url`` (any node; it discovers the rest)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> Self:
        try:
            for _ in range(self.masters):
                node = RedisServer(
                    port=_free_cluster_port(),
                    binary=self.engine.binary,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ),
                )
                node.start()
                self.nodes.append(node)
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        clients = [redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes]
        try:
            share = CLUSTER_SLOTS // self.masters
            for i, client in enumerate(clients):
                first = i * share
                last = CLUSTER_SLOTS - 1 if i == self.masters - 1 else first + share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))  # type: ignore[no-untyped-call]
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + self.start_timeout
            while True:
                infos = [c.cluster("INFO") for c in clients]
                if all(
                    str(i.get("cluster_state")) == "ok"
                    and int(i.get("cluster_known_nodes", 0)) == self.masters
                    for i in infos
                ):
                    return
                if time.monotonic() > deadline:
                    raise ServerError(f"the embedded cluster did not become ready: {infos[0]}")
                time.sleep(0.1)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
