"""The OpenAPI document is kept true: it describes exactly the routes the app serves, and
schemathesis, driven by the document the live app serves, finds no 5xx and no answer the
document does not allow (undocumented status, wrong content type, body or headers off
schema, a 405 without Allow) — its deterministic coverage phase (boundary values, every
required field missing, undeclared methods…) and then random valid and invalid cases."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

import hypothesis.errors
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from service_support import (
    ADMIN,
    Service,
    ServiceFactory,
    buyer,
    expect_json,
    start_service,  # noqa: F401  (fixture)
)

from flashsale.service.openapi import document

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
]
#: Random cases per operation and mode (valid, invalid) after the coverage phase. Bounded
#: so the whole run stays well under a minute on two busy cores.
RANDOM_EXAMPLES = 25
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def _served_routes(service: Service) -> set[tuple[str, str]]:
    routes = set()
    for route in service.app.router.routes():
        if route.method == "HEAD" or route.resource is None:  # HEAD: aiohttp's automatic twin of GET
            continue
        routes.add((route.method, route.resource.canonical))
    return routes


def _documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
    return {
        (method.upper(), path) for path, item in doc["paths"].items() for method in item if method in methods
    }


async def test_document_describes_exactly_the_served_routes(start_service: ServiceFactory) -> None:
    service = await start_service()
    served = await expect_json(await service.client.get("/openapi.json"), 200)
    assert served == document()
    await asyncio.to_thread(schemathesis.openapi.from_dict(served).validate)  # a valid OpenAPI 3 document
    routes, documented = _served_routes(service), _documented_routes(served)
    assert routes - documented == set(), "served but not in /openapi.json"
    assert documented - routes == set(), "in /openapi.json but not served"


def _credentials(path: str) -> dict[str, str]:
    return ADMIN if path.startswith("/api/admin") else buyer("fuzzer")


def _fuzz(
    doc: dict[str, Any], base_url: str, *, random_examples: int, only: Callable[[str], bool] = lambda _: True
) -> list[str]:
    """Run schemathesis against ``base_url``; the distinct failures, as reports."""
    schema = schemathesis.openapi.from_dict(doc)
    failures: dict[str, str] = {}
    with requests.Session() as session:

        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=base_url,
                session=session,
                headers=_credentials(case.operation.path),
                checks=CHECKS,
                timeout=10,
            )

        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]  # an Err would raise: the document is ours
            if not only(operation.label):
                continue
            coverage = schema.iter_coverage_cases(
                operation,
                generation_modes=MODES,
                generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
            )
            for case in coverage:
                try:
                    call(case)
                except FailureGroup as exc:
                    failures.setdefault(f"{operation.label} (coverage): {exc.exceptions[0].title}", str(exc))
            for mode in MODES if random_examples else []:

                @settings(
                    max_examples=random_examples,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                    print_blob=False,
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    call(case)

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    pass  # nothing in this operation can be made invalid (no parameters, no body)
                except FailureGroup as exc:
                    failures.setdefault(
                        f"{operation.label} ({mode.value}): {exc.exceptions[0].title}", str(exc)
                    )
    return [f"{title}\n{report}" for title, report in failures.items()]


@pytest.mark.timeout(900)  # a busy 2-core machine takes minutes; nothing here waits on a clock
async def test_schemathesis_finds_nothing(start_service: ServiceFactory, redis_client: Redis) -> None:
    # No per-buyer rate limit, so fuzzed orders reach the stock instead of being throttled.
    service = await start_service(user_rate=0.0)
    await service.create_sale(
        [{"sku": "phone", "stock": 1000, "reserve": 10, "limit_per_user": 3}], sale="fuzz"
    )
    doc = await expect_json(await service.client.get("/openapi.json"), 200)
    failures = await asyncio.to_thread(_fuzz, doc, service.url.rstrip("/"), random_examples=RANDOM_EXAMPLES)
    assert not failures, "\n\n".join(failures)
    # The fuzzing did not break the service for real buyers.
    order = await service.client.post(
        "/api/orders", json={"request_id": "after", "sku": "phone"}, headers=buyer("alice")
    )
    assert order.status in (201, 409), await order.text()  # 409: the fuzzer may have closed the sale


async def test_the_fuzz_run_would_report_an_undocumented_answer(start_service: ServiceFactory) -> None:
    """The harness can fail: with 422 left out of the document, the coverage phase (which
    sends orders missing required fields) reports the 422 the service rightly gives."""
    service = await start_service()
    doc = copy.deepcopy(await expect_json(await service.client.get("/openapi.json"), 200))
    del doc["paths"]["/api/orders"]["post"]["responses"]["422"]
    failures = await asyncio.to_thread(
        _fuzz, doc, service.url.rstrip("/"), random_examples=0, only=lambda label: label == "POST /api/orders"
    )
    assert any("Undocumented" in failure and "422" in failure for failure in failures), failures
