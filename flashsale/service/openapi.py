"""The OpenAPI 3 document of the service, served at ``/openapi.json``. Tests check that
every route is described, every described route exists, and (schemathesis) that nothing
a client can send gets a 5xx."""

from __future__ import annotations

from typing import Any

__all__ = ["document"]

_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}


#: /readyz's body. ``checks`` decide readiness ("ok" or why not); ``reported`` only tells.
_READINESS = {
    "type": "object",
    "required": ["ready", "checks", "reported"],
    "additionalProperties": False,
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {
            "type": "object",
            "required": ["redis", "scripts"],
            "additionalProperties": False,
            "properties": {
                "redis": {
                    "type": "string",
                    "description": "ok; not a primary: …; a Redis Cluster node addressed as one "
                    "server (…): set FLASHSALE_REDIS_CLUSTER=1; unreachable: …",
                },
                "scripts": {
                    "type": "string",
                    "description": "ok; unknown (Redis failed first); not loaded: …",
                },
            },
        },
        "reported": {
            "type": "object",
            "required": ["fence"],
            "additionalProperties": False,
            "properties": {
                "postgres": {
                    "type": "string",
                    "description": "ok; unreachable: … (absent without a database)",
                },
                "fence": {
                    "type": "string",
                    "description": "ok; off: <why> (not in this process: a Redis Cluster, no database…); "
                    "verifying: …; fenced: <sales>; "
                    "unverified: PostgreSQL does not answer",
                },
            },
        },
    },
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: str | dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _body(schema: str | dict[str, Any], required: bool = True) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"required": required, "content": {"application/json": {"schema": ref}}}


_AUTH_ERRORS = {"401": _err("missing, forged or expired token")}
#: Where a buyer stands in a waiting room (docs/waiting-room.md).
_ROOM_STATE = {"enum": ["pre", "waiting", "admitted", "used", "expired", "sold_out"]}
_BODY_ERRORS = {
    "400": _err("bad_content_encoding or malformed_body"),
    "408": _err("request_timeout: the request head or body did not arrive within FLASHSALE_READ_TIMEOUT"),
    "413": _err("body too large"),
    "422": _err("invalid request"),
}
#: A buyer's requests in progress past FLASHSALE_BUYER_IN_FLIGHT (every buyer endpoint).
_BUSY_BUYER = {"429": _err("too_many_in_progress (Retry-After)")}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def document() -> dict[str, Any]:
    from flashsale.service.warroom.routes import openapi_paths  # the war room describes its own routes

    doc = _document()
    doc["paths"].update(openapi_paths())
    return doc


def _document() -> dict[str, Any]:
    buyer: list[dict[str, list[str]]] = [{"buyerToken": []}]
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    order_id = _path_param("order_id")
    sale = _path_param("sale")
    sku = _path_param("sku")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "flashsale order service",
            "version": "1",
            "description": "Stock is reserved atomically in Redis and never oversold; orders "
            'reach PostgreSQL through a stream. Errors are {"error": code, "message": text}.',
        },
        "components": {
            "securitySchemes": {
                "buyerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "user.expires.member.signature (flashsale token)",
                },
                "adminToken": {"type": "http", "scheme": "bearer", "description": "FLASHSALE_ADMIN_TOKEN"},
            },
            "schemas": {
                "Error": _ERROR,
                "Readiness": _READINESS,
                "Line": {
                    "type": "object",
                    "required": ["sku"],
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                },
                "OrderRequest": {
                    "type": "object",
                    "required": ["request_id"],
                    "properties": {
                        "request_id": _ID,
                        "lines": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Line"},
                            "minItems": 1,
                            "maxItems": 20,
                        },
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1},
                    },
                },
                "Order": {
                    "type": "object",
                    "required": ["order_id", "status", "sale", "lines", "pay_by", "pay_by_ms"],
                    "properties": {
                        "order_id": {"type": "string"},
                        "status": {"type": "string", "enum": ["held", "paid", "cancelled", "expired"]},
                        "sale": {"type": "string"},
                        "lines": {"type": "array", "items": {"$ref": "#/components/schemas/Line"}},
                        "pay_by": {"type": "string"},
                        "pay_by_ms": {"type": "integer"},
                        "created_ms": {"type": "integer"},
                        "request_id": {"type": "string"},
                        "replayed": {"type": "boolean"},
                    },
                },
                "OrderStatus": {
                    "type": "object",
                    "required": ["order_id", "status"],
                    "properties": {"order_id": {"type": "string"}, "status": {"type": "string"}},
                },
                "Sku": {
                    "type": "object",
                    "required": ["sku", "sale", "state", "available", "opens_at", "open"],
                    "properties": {
                        "sku": {"type": "string"},
                        "sale": {"type": "string"},
                        "state": {"type": "string", "enum": ["in_stock", "low", "sold_out"]},
                        "available": {"type": "integer"},
                        "opens_at": {"type": "string"},
                        "open": {"type": "boolean"},
                    },
                },
                "SaleRequest": {
                    "type": "object",
                    "required": ["sale", "skus"],
                    "properties": {
                        "sale": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,31}$"},
                        "opens_at": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                        "open": {"type": "boolean"},
                        "early_access_s": {"type": "integer", "minimum": 0},
                        "hold_ttl_s": {"type": "number", "minimum": 0.05},
                        "waiting_room": {
                            "oneOf": [{"type": "boolean"}, {"$ref": "#/components/schemas/RoomSettings"}],
                            "description": "put the sale behind a stock-aware waiting room (docs/waiting-room.md)",
                        },
                        "buckets": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 64,
                            "description": "split the stock over this many hash slots (hot SKUs on a Redis Cluster)",
                        },
                        "skus": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["sku", "stock"],
                                "properties": {
                                    "sku": {"type": "string"},
                                    "stock": {"type": "integer", "minimum": 0},
                                    "reserve": {"type": "integer", "minimum": 0},
                                    "limit_per_user": {"type": "integer", "minimum": 0},
                                    "low_stock_line": {"type": "integer", "minimum": 0},
                                },
                            },
                        },
                    },
                },
                "Sale": {"type": "object", "required": ["sale", "opens_at", "state", "skus"]},
                "RoomSettings": {
                    "type": "object",
                    "properties": {
                        "rate_per_s": {"type": "number", "minimum": 0.01, "maximum": 100000},
                        "oversubscribe": {"type": "number", "minimum": 0, "maximum": 100},
                        "ticket_ttl_s": {"type": "number", "minimum": 1, "maximum": 3600},
                        "seed": {"type": "integer", "minimum": 1, "maximum": 2147483646},
                    },
                },
                "RoomSwitch": {
                    "allOf": [
                        {"$ref": "#/components/schemas/RoomSettings"},
                        {"type": "object", "properties": {"on": {"type": "boolean"}}},
                    ]
                },
                "RoomJoin": {
                    "type": "object",
                    "required": ["skus"],
                    "properties": {
                        "skus": {"type": "array", "minItems": 1, "maxItems": 20, "items": {"type": "string"}}
                    },
                },
                "RoomStatus": {
                    "type": "object",
                    "required": ["sale", "state", "ahead", "waiting"],
                    "properties": {
                        "state": _ROOM_STATE,
                        "ahead": {"type": "integer"},
                        "waiting": {"type": "integer"},
                        "pre_queue": {"type": "integer"},
                        "eta_s": {"type": "number"},
                        "poll_after_ms": {"type": "integer"},
                        "ticket": {"type": "string"},
                        "ticket_header": {"type": "string"},
                        "ticket_expires_at": {"type": "string"},
                        "told_after_ms": {"type": "integer"},
                    },
                },
                "RoomRecord": {
                    "type": "object",
                    "description": "docs/waiting-room.md, 'Auditing a room': replay the shuffle from "
                    "seed and pre_queue; positions, admissions and tellings per buyer",
                    "required": ["sale", "on", "opens_at_ms", "seed", "shuffled", "pre_queue", "buyers"],
                    "properties": {
                        "sale": {"type": "string"},
                        "on": {"type": "boolean"},
                        "opens_at_ms": {"type": "integer"},
                        "rate_per_s": {"type": "number"},
                        "oversubscribe": {"type": "number"},
                        "ticket_ttl_ms": {"type": "integer"},
                        "seed": {"type": "integer"},
                        "shuffled": {"type": "boolean"},
                        "shuffled_n": {"type": "integer"},
                        "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "sold_out_seen_ms": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "sold_out_at_ms": {
                            "type": "object",
                            "nullable": True,
                            "additionalProperties": {"type": "integer"},
                        },
                        "pre_queue": {"type": "array", "items": {"type": "string"}},
                        "buyers": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "required": ["state", "skus", "joined_ms"],
                                "properties": {
                                    "state": _ROOM_STATE,
                                    "skus": {"type": "array", "items": {"type": "string"}},
                                    "joined_ms": {"type": "integer"},
                                    "position": {"type": "integer"},
                                    "admitted_ms": {"type": "integer"},
                                    "ticket_expires_ms": {"type": "integer"},
                                    "used_ms": {"type": "integer"},
                                    "request_id": {"type": "string"},
                                    "told_ms": {"type": "integer"},
                                    "told_after_ms": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "Units": {"type": "object", "properties": {"units": {"type": "integer", "minimum": 1}}},
                "Switches": {
                    "type": "object",
                    "properties": {"browse": {"type": "boolean"}, "order_lookup": {"type": "boolean"}},
                    "additionalProperties": False,
                },
                "TokenRequest": {
                    "type": "object",
                    "properties": {
                        "users": {"type": "array", "items": {"type": "string"}},
                        "prefix": {"type": "string"},
                        "count": {"type": "integer", "minimum": 1, "maximum": 100000},
                        "ttl_s": {"type": "integer", "minimum": 1},
                        "member": {"type": "boolean"},
                    },
                },
                "AuditRequest": {
                    "type": "object",
                    "properties": {
                        "acknowledged": {"type": "array", "items": {"type": "string"}},
                        "wait_s": {"type": "number", "minimum": 0, "maximum": 600},
                    },
                },
            },
        },
        "paths": {
            "/api/skus/{sku}": {
                "get": {
                    "summary": "Availability for the product page (cached for a fraction of a second)",
                    "parameters": [sku],
                    "responses": {
                        "200": _ok("the SKU", "Sku"),
                        "404": _err("unknown SKU"),
                        "503": _err("browsing switched off"),
                    },
                }
            },
            "/api/orders": {
                "post": {
                    "summary": "Reserve a cart (all or nothing); retry with the same request_id",
                    "security": buyer,
                    "parameters": [
                        {
                            "name": "X-Retry-Attempt",
                            "in": "header",
                            "required": False,
                            "description": "accepted and ignored: a retry is recognised by its request_id",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "X-Flashsale-Ticket",
                            "in": "header",
                            "required": False,
                            "description": "the waiting room's ticket, while the sale is behind its room",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": _body("OrderRequest"),
                    "responses": {
                        "201": _ok("order held until pay_by", "Order"),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "409": _err("sold_out, sale_not_open or sale_closed"),
                        "429": _err(
                            "limit_exceeded, rate_limited, too_many_in_progress or overloaded "
                            "(at capacity; Retry-After)"
                        ),
                        "503": _err("sale_fenced (Retry-After)"),
                        "504": _err("outcome_unknown: retry with the same request_id"),
                        "403": _err("ticket_not_yours, ticket_used or ticket_invalid (waiting room)"),
                    },
                }
            },
            "/api/orders/{order_id}": {
                "get": {
                    "summary": "One of your orders",
                    "security": buyer,
                    "parameters": [order_id],
                    "responses": {
                        "200": _ok("the order", "Order"),
                        **_AUTH_ERRORS,
                        "404": _err("no such order of yours"),
                        **_BUSY_BUYER,
                        "503": _err(
                            "degraded (lookup switched off) or archive_unavailable (PostgreSQL, "
                            "which keeps archived orders, did not answer in time; Retry-After)"
                        ),
                    },
                }
            },
            "/api/orders/{order_id}/pay": {
                "post": {
                    "summary": "Pay: the held units become sold (idempotent)",
                    "security": buyer,
                    "parameters": [order_id],
                    "responses": {
                        "200": _ok("paid", "OrderStatus"),
                        **_AUTH_ERRORS,
                        "404": _err("no such order"),
                        "409": _err("hold_expired or hold_cancelled"),
                        **_BUSY_BUYER,
                        "503": _err("sale_fenced (Retry-After)"),
                        "504": _err("outcome_unknown: pay again to learn it"),
                    },
                }
            },
            "/api/orders/{order_id}/cancel": {
                "post": {
                    "summary": "Cancel: the units go back on sale (idempotent)",
                    "security": buyer,
                    "parameters": [order_id],
                    "responses": {
                        "200": _ok("cancelled (or expired)", "OrderStatus"),
                        **_AUTH_ERRORS,
                        "404": _err("no such order"),
                        "409": _err("hold_paid"),
                        **_BUSY_BUYER,
                        "503": _err("sale_fenced (Retry-After)"),
                        "504": _err("outcome_unknown: cancel again to learn it"),
                    },
                }
            },
            "/api/sales/{sale}/room": {
                "post": {
                    "summary": "Join the sale's waiting room for some SKUs (again: a poll; nobody loses a place)",
                    "security": buyer,
                    "parameters": [sale],
                    "requestBody": _body("RoomJoin"),
                    "responses": {
                        "200": _ok("where you stand; a ticket once admitted", "RoomStatus"),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "404": _err("sale_not_found"),
                        "409": _err("room_off: order directly"),
                        "429": _err("poll_too_often"),
                        "503": _err("sale_fenced (Retry-After)"),
                    },
                },
                "get": {
                    "summary": "Where you stand in the waiting room; poll again after poll_after_ms",
                    "security": buyer,
                    "parameters": [sale],
                    "responses": {
                        "200": _ok("where you stand; a ticket once admitted", "RoomStatus"),
                        **_AUTH_ERRORS,
                        "404": _err("sale_not_found or not_in_room"),
                        "409": _err("room_off: order directly"),
                        "429": _err("poll_too_often"),
                        "503": _err("sale_fenced (Retry-After)"),
                    },
                },
            },
            "/api/admin/sales/{sale}/room": {
                "post": {
                    "summary": "Switch the sale's waiting room on or off, and set how it admits",
                    "security": admin,
                    "parameters": [sale],
                    "requestBody": _body("RoomSwitch"),
                    "responses": {
                        "200": _ok("the room's state and shuffle seed", {"type": "object"}),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "404": _err("sale_not_found"),
                    },
                },
                "get": {
                    "summary": "The room's record for an audit: seed, pre-queue in arrival order, every "
                    "buyer's position, admission and told times (read it after the peak)",
                    "security": admin,
                    "parameters": [sale],
                    "responses": {
                        "200": _ok("the room's record", "RoomRecord"),
                        **_AUTH_ERRORS,
                        "404": _err("sale_not_found or no_room"),
                    },
                },
            },
            "/api/admin/sales": {
                "post": {
                    "summary": "Create a sale",
                    "security": admin,
                    "requestBody": _body("SaleRequest"),
                    "responses": {
                        "201": _ok("the sale", "Sale"),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "409": _err("sale_exists, sku_taken, sale_keys_remain or sale_not_retired"),
                    },
                }
            },
            "/api/admin/sales/{sale}": {
                "get": {
                    "summary": "A sale and its SKUs",
                    "security": admin,
                    "parameters": [sale],
                    "responses": {
                        "200": _ok("the sale", "Sale"),
                        **_AUTH_ERRORS,
                        "404": _err("no such sale"),
                    },
                }
            },
            "/api/admin/sales/{sale}/open": {
                "post": {
                    "summary": "Open now",
                    "security": admin,
                    "parameters": [sale],
                    "responses": {
                        "200": _ok("the sale", {"type": "object"}),
                        **_AUTH_ERRORS,
                        "404": _err("no such sale"),
                    },
                }
            },
            "/api/admin/sales/{sale}/close": {
                "post": {
                    "summary": "Close",
                    "security": admin,
                    "parameters": [sale],
                    "responses": {
                        "200": _ok("the sale", {"type": "object"}),
                        **_AUTH_ERRORS,
                        "404": _err("no such sale"),
                    },
                }
            },
            "/api/admin/sales/{sale}/skus/{sku}/restock": {
                "post": {
                    "summary": "Add stock",
                    "security": admin,
                    "parameters": [sale, sku],
                    "requestBody": _body("Units"),
                    "responses": {
                        "200": _ok("the SKU", {"type": "object"}),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "404": _err("no such sale"),
                    },
                }
            },
            "/api/admin/sales/{sale}/skus/{sku}/release-reserve": {
                "post": {
                    "summary": "Release the reserve pool into sale",
                    "security": admin,
                    "parameters": [sale, sku],
                    "requestBody": _body("Units", required=False),
                    "responses": {
                        "200": _ok("the SKU", {"type": "object"}),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "404": _err("no such sale"),
                        "409": _err("insufficient_stock"),
                    },
                }
            },
            "/api/admin/switches": {
                "get": {
                    "summary": "Endpoint switches",
                    "security": admin,
                    "responses": {"200": _ok("switches", "Switches"), **_AUTH_ERRORS},
                },
                "post": {
                    "summary": "Switch non-essential endpoints off or on",
                    "security": admin,
                    "requestBody": _body("Switches"),
                    "responses": {"200": _ok("switches", "Switches"), **_AUTH_ERRORS, **_BODY_ERRORS},
                },
            },
            "/api/admin/tokens": {
                "post": {
                    "summary": "Mint buyer tokens for drills",
                    "security": admin,
                    "requestBody": _body("TokenRequest"),
                    "responses": {
                        "200": _ok("tokens by user", {"type": "object"}),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                    },
                }
            },
            "/api/admin/stats": {
                "get": {
                    "summary": "Live numbers of the whole deployment",
                    "security": admin,
                    "responses": {"200": _ok("stats", {"type": "object"}), **_AUTH_ERRORS},
                }
            },
            "/api/admin/audit": {
                "post": {
                    "summary": "Wait for the order queue to drain, then compare Redis and PostgreSQL",
                    "security": admin,
                    "requestBody": _body("AuditRequest", required=False),
                    "responses": {
                        "200": _ok("the audit report", {"type": "object"}),
                        **_AUTH_ERRORS,
                        **_BODY_ERRORS,
                        "409": _err("no database configured"),
                    },
                }
            },
            "/healthz": {
                "get": {"summary": "Process is up", "responses": {"200": _ok("ok", {"type": "object"})}}
            },
            "/readyz": {
                "get": {
                    "summary": "Can decide sales: Redis answers as a primary, scripts loaded",
                    "description": "Every check answers within a second. PostgreSQL and the fence "
                    "are reported, never a reason for 503: orders do not wait on them.",
                    "responses": {
                        "200": _ok("ready", "Readiness"),
                        "503": _ok("not ready: the checks say why", "Readiness"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _ok("OpenAPI 3", {"type": "object"})},
                }
            },
        },
    }
