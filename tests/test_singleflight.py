"""proxy.singleflight: one upstream call per key, in a process and across sidecars (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import RelayedError, UpstreamHTTPError, UpstreamTimeout
from proxy.keys import KeyLayout
from proxy.singleflight import Flights, Shared, across_sidecars
from tests.conftest import REDIS_URL
from tests.harness import async_wait_for, free_port

SOURCE = uuid.uuid4()


def entry(value: bytes = b"[1]") -> CacheEntry:
    return CacheEntry(str(uuid.uuid4()), 1.0, value)


class Upstream:
    """Counts calls; each call waits until released, so callers pile up behind it."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.release = asyncio.Event()

    async def fetch(self) -> CacheEntry:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise UpstreamHTTPError(503)
        return entry()


async def test_in_process_followers_share_the_leaders_fetch() -> None:
    flights, upstream = Flights(), Upstream()

    async def lead() -> Shared:
        return Shared(await upstream.fetch(), True)

    tasks = [asyncio.create_task(flights.run("k", lead, wait=5)) for _ in range(50)]
    await asyncio.sleep(0)  # let every task reach the flight before it lands
    upstream.release.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert sum(r.fetched_here for r in results) == 1
    assert len({r.entry.data_object_id for r in results}) == 1


async def test_in_process_failure_reaches_every_waiter_once() -> None:
    flights, upstream = Flights(), Upstream(fail=True)

    async def lead() -> Shared:
        return Shared(await upstream.fetch(), True)

    tasks = [asyncio.create_task(flights.run("k", lead, wait=5)) for _ in range(10)]
    await asyncio.sleep(0)
    upstream.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert upstream.calls == 1
    assert all(isinstance(r, UpstreamHTTPError) for r in results)


async def test_a_waiter_times_out_without_cancelling_the_leader() -> None:
    flights, upstream = Flights(), Upstream()

    async def lead() -> Shared:
        return Shared(await upstream.fetch(), True)

    leader = asyncio.create_task(flights.run("k", lead, wait=5))
    await asyncio.sleep(0)
    with pytest.raises(UpstreamTimeout):
        await flights.run("k", lead, wait=0.05)
    upstream.release.set()
    assert (await leader).fetched_here


@pytest.fixture
async def cache(redis_prefix: str) -> AsyncIterator[RedisCache]:
    redis = Redis.from_url(REDIS_URL)
    yield RedisCache(redis, KeyLayout(redis_prefix))
    await redis.aclose()


async def holder_inside(upstream: Upstream) -> bool:
    await asyncio.sleep(0.02)  # a poll interval: lets the waiters reach their loop too
    return upstream.calls == 1


def sidecar_call(
    cache: RedisCache, upstream: Upstream, deadline: float = 5
) -> asyncio.Task[Shared]:
    """One sidecar's leader: its own Flights are irrelevant across processes, so call directly."""

    async def store(e: CacheEntry) -> None:
        # As the broker's store: a cache that cannot be written is not an error.
        with contextlib.suppress(CacheUnavailable):
            await cache.put(SOURCE, "k", e, ttl=60)

    return asyncio.create_task(
        across_sidecars(cache, SOURCE, "k", upstream.fetch, store, lambda e: True, deadline)
    )


async def test_across_sidecars_one_call_and_everyone_gets_the_entry(cache: RedisCache) -> None:
    upstream = Upstream()
    calls = [sidecar_call(cache, upstream) for _ in range(20)]
    await async_wait_for(lambda: holder_inside(upstream))
    upstream.release.set()
    results = await asyncio.gather(*calls)
    assert upstream.calls == 1
    assert sum(r.fetched_here for r in results) == 1
    assert len({r.entry.data_object_id for r in results}) == 1
    assert await cache.get(SOURCE, "k") == results[0].entry
    assert not await cache.redis.exists(cache.layout.lock(SOURCE, "k"))


async def test_holders_failure_goes_to_its_waiters_not_to_later_callers(cache: RedisCache) -> None:
    upstream = Upstream(fail=True)
    calls = [sidecar_call(cache, upstream) for _ in range(5)]
    await async_wait_for(lambda: holder_inside(upstream))
    upstream.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert upstream.calls == 1
    codes = sorted(type(r).__name__ for r in results)
    assert codes == ["RelayedError"] * 4 + ["UpstreamHTTPError"]
    relayed = next(r for r in results if isinstance(r, RelayedError))
    assert (relayed.code, relayed.status, relayed.extra["upstream_status"]) == (
        "HTTP_ERROR",
        502,
        503,
    )
    # A caller arriving after the failure tries the upstream itself.
    later = Upstream()
    later.release.set()
    assert (await sidecar_call(cache, later)).fetched_here
    assert later.calls == 1


async def test_a_crashed_holder_blocks_nobody_past_its_lock_expiry(cache: RedisCache) -> None:
    assert await cache.acquire(SOURCE, "k", "dead-holder", ttl_ms=200, since_us=0)
    upstream = Upstream()
    upstream.release.set()
    shared = await sidecar_call(cache, upstream)
    assert shared.fetched_here and upstream.calls == 1


async def test_waiters_time_out_cleanly(cache: RedisCache) -> None:
    assert await cache.acquire(SOURCE, "k", "slow-holder", ttl_ms=10_000, since_us=0)
    upstream = Upstream()
    with pytest.raises(UpstreamTimeout, match="another sidecar"):
        await sidecar_call(cache, upstream, deadline=0.2)
    assert upstream.calls == 0


async def test_without_redis_each_caller_fetches_alone() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    cache = RedisCache(redis, KeyLayout("x:"))
    upstream = Upstream()
    upstream.release.set()
    shared = await sidecar_call(cache, upstream)
    assert shared.fetched_here and upstream.calls == 1
    await redis.aclose()
