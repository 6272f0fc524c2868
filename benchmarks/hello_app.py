"""The HTTP ceiling: a trivial aiohttp endpoint served the way the order service is served
(one process, uvloop, ``web.run_app`` with the same backlog, no access log).

``POST /api/orders`` reads and parses the JSON body and answers 201 with a small JSON
object, so it takes the same requests as the service and does none of its work. Whatever
the service loses against it is the price of the order path itself.

    python -m benchmarks.hello_app --port 8081
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

__all__ = ["create_app"]


async def _order(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {"order_id": "hello", "status": "held", "request_id": body.get("request_id")}, status=201
    )


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/orders", _order)
    app.router.add_get("/healthz", _healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    args = parser.parse_args()
    try:  # as flashsale.service.serve does: uvloop in the entry point only
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
