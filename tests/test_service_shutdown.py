"""A service process stops when told to: the once-a-second stats publisher, which app
shutdown cancels and then awaits, ends even when the cancel lands in the middle of a
Redis round trip (redis-py can swallow such a cancel; looping on hung shutdown forever)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis_mode import redis_from_url

from flashsale.service.admission import InFlight
from flashsale.service.metrics import ServiceMetrics


async def test_publisher_stops_whenever_it_is_cancelled(redis_client: Redis, redis_url: str) -> None:
    stuck = 0
    for attempt in range(30):
        redis = redis_from_url(redis_url)  # a cluster client on a cluster: its pipeline too
        try:
            publisher = asyncio.ensure_future(
                ServiceMetrics().publish_forever(redis, "fs", InFlight(1), interval_s=0.001)
            )
            # Cancel at varied moments, so some cancels land while a publish is in flight.
            await asyncio.sleep(0.002 + (attempt % 10) * 0.0003)
            publisher.cancel()
            done, _ = await asyncio.wait([publisher], timeout=0.5)
            if not done:
                stuck += 1
                while not publisher.done():  # stop it for good before the next attempt
                    publisher.cancel()
                    await asyncio.wait([publisher], timeout=0.1)
        finally:
            await redis.aclose()
    assert stuck == 0, f"{stuck} of 30 cancelled publishers kept running"
    # They do publish (a busy machine may cancel all 30 before the first publish lands):
    # one more runs until its publish is seen, then stops when cancelled.
    redis = redis_from_url(redis_url)
    try:
        publisher = asyncio.ensure_future(
            ServiceMetrics().publish_forever(redis, "fs", InFlight(1), interval_s=0.001)
        )
        while await redis_client.scard("fs:stats:procs") != 1:
            assert not publisher.done(), publisher
            await asyncio.sleep(0.01)
        publisher.cancel()
        done, _ = await asyncio.wait([publisher], timeout=5)
        assert done, "the publisher kept running after its cancel"
    finally:
        await redis.aclose()
