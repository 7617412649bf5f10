"""One subscription for every announcement channel (``proxy.announcements``), on the real
Redis: what each kind of follower runs, and when."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from proxy.announcements import Follower, listen
from tests.conftest import REDIS_URL
from tests.harness import async_wait_for


@asynccontextmanager
async def _listening(redis: Redis, followers: Sequence[Follower]) -> AsyncIterator[None]:
    task = asyncio.create_task(listen(redis, followers, retry_interval=0.05))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_messages_that_carry_work_are_taken_in_order(redis_prefix: str) -> None:
    taken: list[bytes] = []

    async def take(data: bytes) -> None:
        await asyncio.sleep(0)  # a handler that yields: the next message waits its turn
        taken.append(data)

    redis = Redis.from_url(REDIS_URL)
    channel = f"{redis_prefix}events:work"
    try:
        async with _listening(redis, [Follower("work", channel, on_message=take)]):
            await async_wait_for(lambda: _subscribers(redis, channel))
            for n in range(20):
                await redis.publish(channel, str(n))
            await async_wait_for(lambda: len(taken) == 20)
        assert taken == [str(n).encode() for n in range(20)]
    finally:
        await redis.aclose()


async def test_the_timer_runs_the_safety_check_and_a_message_the_resync(
    redis_prefix: str,
) -> None:
    runs: list[str] = []

    async def resync() -> None:
        runs.append("resync")

    async def check() -> None:
        runs.append("check")

    redis = Redis.from_url(REDIS_URL)
    channel = f"{redis_prefix}events:state"
    follower = Follower("state", channel, resync, safety_interval=0.05, safety_check=check)
    try:
        async with _listening(redis, [follower]):
            # The subscription's confirmation and the timer: the cheap look, no reread.
            await async_wait_for(lambda: runs.count("check") >= 3)
            assert "resync" not in runs
            await redis.publish(channel, "changed")
            await async_wait_for(lambda: "resync" in runs)
    finally:
        await redis.aclose()


async def _subscribers(redis: Redis, channel: str) -> bool:
    [(_, count)] = await redis.pubsub_numsub(channel)
    return bool(count)
