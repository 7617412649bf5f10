"""proxy.singleflight: one upstream call per key, in a process and across sidecars (real Redis).

A ``Flights`` is one sidecar: callers of one instance coalesce in process, callers of
separate instances only through the Redis lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import InternalError, RelayedError, UpstreamHTTPError, UpstreamTimeout
from proxy.keys import KeyLayout
from proxy.singleflight import Flights
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


async def take_turn(
    flights: Flights, upstream: Upstream, deadline: float = 5
) -> tuple[CacheEntry, bool]:
    """A caller as the broker is one: lead (fetch, store, share) or receive; whether it led."""
    async with flights.turn(SOURCE, "k", deadline, lambda e: True) as turn:
        if turn.received is not None:
            return turn.received, False
        fetched = await upstream.fetch()
        # As the broker's store: a cache that cannot be written is not an error.
        with contextlib.suppress(CacheUnavailable):
            await turn.keep(fetched, ttl=60)
        return fetched, True


def callers(
    flights: Flights | RedisCache, upstream: Upstream, count: int, deadline: float = 5
) -> list[asyncio.Task[tuple[CacheEntry, bool]]]:
    """``count`` callers in one sidecar (given its Flights) or each in its own (given a cache)."""
    return [
        asyncio.create_task(
            take_turn(
                flights if isinstance(flights, Flights) else Flights(flights), upstream, deadline
            )
        )
        for _ in range(count)
    ]


@pytest.fixture
async def cache(redis_prefix: str) -> AsyncIterator[RedisCache]:
    redis = Redis.from_url(REDIS_URL)
    yield RedisCache(redis, KeyLayout(redis_prefix))
    await redis.aclose()


@pytest.fixture
async def unreachable() -> AsyncIterator[RedisCache]:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    yield RedisCache(redis, KeyLayout("x:"))
    await redis.aclose()


async def lock_held(cache: RedisCache) -> bool:
    return bool(await cache.redis.exists(cache.layout.lock(SOURCE, "k")))


async def holder_inside(upstream: Upstream) -> bool:
    await asyncio.sleep(0.02)  # a poll interval: lets the waiters reach their loop too
    return upstream.calls == 1


async def one_call(sidecars: Flights | RedisCache, upstream: Upstream, count: int) -> list[Any]:
    """``count`` callers at once, the upstream answering once they all wait: one call made.
    Each caller's ``(entry, led)``, or what it raised."""
    tasks = callers(sidecars, upstream, count)
    await async_wait_for(lambda: holder_inside(upstream))
    upstream.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert upstream.calls == 1
    return results


# --- in one process ----------------------------------------------------------------------


async def test_in_process_followers_share_the_leaders_fetch(cache: RedisCache) -> None:
    results = await one_call(Flights(cache), Upstream(), 50)
    assert sum(led for _, led in results) == 1
    assert len({e.data_object_id for e, _ in results}) == 1
    assert not await lock_held(cache)


async def test_in_process_failure_reaches_every_waiter_once(cache: RedisCache) -> None:
    results = await one_call(Flights(cache), Upstream(fail=True), 10)
    assert all(isinstance(r, UpstreamHTTPError) for r in results)


async def test_a_waiter_times_out_without_cancelling_the_leader(cache: RedisCache) -> None:
    flights, upstream = Flights(cache), Upstream()
    [leader] = callers(flights, upstream, 1)
    await async_wait_for(lambda: upstream.calls == 1)
    with pytest.raises(UpstreamTimeout, match="in flight"):
        await take_turn(flights, upstream, deadline=0.01)
    upstream.release.set()
    assert (await leader)[1]


async def test_a_leader_that_shares_nothing_fails_its_followers(cache: RedisCache) -> None:
    flights, release = Flights(cache), asyncio.Event()

    async def forgetful() -> None:
        async with flights.turn(SOURCE, "k", 5, lambda e: True):
            await release.wait()

    leader = asyncio.create_task(forgetful())
    await async_wait_for(lambda: lock_held(cache))
    follower = asyncio.create_task(take_turn(flights, Upstream()))
    await asyncio.sleep(0)  # the follower reaches the flight before it lands
    release.set()
    for task in (leader, follower):
        with pytest.raises(InternalError):
            await task


# --- across sidecars ---------------------------------------------------------------------


async def test_across_sidecars_one_call_and_everyone_gets_the_entry(cache: RedisCache) -> None:
    results = await one_call(cache, Upstream(), 20)
    assert sum(led for _, led in results) == 1
    assert len({e.data_object_id for e, _ in results}) == 1
    assert await cache.get(SOURCE, "k") == results[0][0]
    assert not await lock_held(cache)


async def test_holders_failure_goes_to_its_waiters_not_to_later_callers(cache: RedisCache) -> None:
    results = await one_call(cache, Upstream(fail=True), 5)
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
    assert (await take_turn(Flights(cache), later))[1]
    assert later.calls == 1


async def test_the_holder_looks_again_before_it_fetches(cache: RedisCache) -> None:
    """The previous holder may store and release between a caller's miss and its lock."""
    stored = entry()
    await cache.put(SOURCE, "k", stored, ttl=60)
    upstream = Upstream()
    assert await take_turn(Flights(cache), upstream) == (stored, False)
    assert upstream.calls == 0
    assert not await lock_held(cache)


async def test_a_holder_that_breaks_lets_go_of_the_lock(cache: RedisCache) -> None:
    with pytest.raises(RuntimeError):
        async with Flights(cache).turn(SOURCE, "k", 5, lambda e: True):
            raise RuntimeError("a bug, not an upstream failure")
    assert not await lock_held(cache)


async def test_a_crashed_holder_blocks_nobody_past_its_lock_expiry(cache: RedisCache) -> None:
    await cache.redis.set(cache.layout.lock(SOURCE, "k"), b"dead-holder", px=200)
    upstream = Upstream()
    upstream.release.set()
    assert (await take_turn(Flights(cache), upstream))[1]
    assert upstream.calls == 1


async def test_waiters_time_out_cleanly(cache: RedisCache) -> None:
    await cache.redis.set(cache.layout.lock(SOURCE, "k"), b"slow-holder", px=10_000)
    upstream = Upstream()
    with pytest.raises(UpstreamTimeout, match="another sidecar"):
        await take_turn(Flights(cache), upstream, deadline=0.2)
    assert upstream.calls == 0


# --- without Redis -----------------------------------------------------------------------


async def test_without_redis_each_sidecar_fetches_alone(unreachable: RedisCache) -> None:
    upstream = Upstream()
    upstream.release.set()
    results = await asyncio.gather(*callers(unreachable, upstream, 2))
    assert all(led for _, led in results) and upstream.calls == 2


async def test_without_redis_a_sidecar_still_makes_one_call_per_key(
    unreachable: RedisCache,
) -> None:
    results = await one_call(Flights(unreachable), Upstream(), 10)
    assert sum(led for _, led in results) == 1
