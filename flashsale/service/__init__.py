"""The order service (aiohttp + uvloop): one process per core behind ``flashsale serve``.

- ``app``          the app factory ``create_app(settings)``: one cleanup context, middlewares;
- ``serve``        the supervisor: N processes sharing a port, restarts, shutdown;
- ``transport``    aiohttp's runner and protocol, answering even parser refusals as JSON;
- ``state``        what one process holds (clients, caches, counters), one typed AppKey;
- ``http``         the bearer token and the JSON body (under the read deadline), read the
                   same way by every handler;
- ``errors``       what turns failures into JSON errors with stable codes (the app's one middleware);
- ``deadlines``    deadlines of one length for many requests, on one timer;
- ``admission``    the cheap in-memory refusals (per-buyer turns, rate limit, in-flight cap,
                   sold-out cache) and shared loads;
- ``sales``        the sale book: settings, SKU index, degraded-site switches;
- ``tokens``       buyer identity (HMAC bearer tokens) and the tokens already verified;
- ``metrics``      Prometheus exposition and the published per-process counters;
- ``buyer_api``    product page, order (the hot path), lookup, pay, cancel;
- ``admin_api``    sales, tokens, switches, stats, audit for operators;
- ``probes``       /healthz, /readyz, /metrics, /openapi.json;
- ``openapi``      the OpenAPI document;
- ``fence_guard``  the fence in one process: refuse sales from a Redis that lost data;
- ``warroom/``     the operators' live page, its data endpoint and controls;
- ``cli``          ``flashsale serve`` and ``flashsale token``.

The service never imports the order writer: the pipeline wing runs in its own process.
"""
