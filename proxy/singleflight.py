"""One upstream call per key: in one process, and across sidecars sharing Redis.

In a process, concurrent misses of a key share one ``asyncio.Future``: the
first caller leads, the others await its outcome. Across processes, the
leaders contend for a Redis lock with an expiry (``SET NX PX``): the holder
fetches and stores the cache entry; the others poll entry and lock in one
round trip until the entry appears, the holder leaves its failure, or their
deadline passes. A holder that crashes cannot block anyone: its lock expires.

When Redis is unreachable the cross-process step is skipped: each process
still makes at most one call per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import BrokerError, RelayedError, UpstreamTimeout

FAILURE_HOLD_MS = 2000
"""How long a holder's failure is shown to waiters: long enough for them to see
it, short enough that the next request tries the upstream again."""

POLL_START = 0.005
POLL_MAX = 0.05


@dataclass(frozen=True, slots=True)
class Shared:
    """The outcome a caller receives: the entry, and whether this caller fetched it."""

    entry: CacheEntry
    fetched_here: bool


class Flights:
    """In-process coalescing: one call per key, its outcome shared by every waiter."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Shared]] = {}

    async def run(
        self, key: Hashable, fetch: Callable[[], Awaitable[Shared]], wait: float
    ) -> Shared:
        """The leader gets ``fetch()``'s outcome as is; a follower gets its entry as not fetched here."""
        future = self._inflight.get(key)
        if future is not None:
            try:
                # shield: a waiter that gives up must not cancel the leader's fetch.
                shared = await asyncio.wait_for(asyncio.shield(future), wait)
            except TimeoutError:
                raise UpstreamTimeout(
                    "timed out waiting for the fetch in flight for this key"
                ) from None
            return Shared(shared.entry, False)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            shared = await fetch()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: a leader without followers is not an error
            raise
        else:
            future.set_result(shared)
            return shared
        finally:
            del self._inflight[key]


async def across_sidecars(
    cache: RedisCache,
    data_source_id: uuid.UUID,
    key: str,
    fetch: Callable[[], Awaitable[CacheEntry]],
    store: Callable[[CacheEntry], Awaitable[None]],
    is_fresh: Callable[[CacheEntry], bool],
    deadline: float,
) -> Shared:
    """Fetch under the key's Redis lock, or wait for the sidecar that holds it.

    ``deadline`` bounds the holder's fetch (it is the lock's expiry) and the
    waiters' patience.
    """
    token = uuid.uuid4().hex
    since_us = int(time.time() * 1_000_000)
    give_up = time.monotonic() + deadline
    delay = POLL_START
    while True:
        try:
            acquired = await cache.acquire(
                data_source_id, key, token, int(deadline * 1000) + 1000, since_us
            )
        except CacheUnavailable:
            return await _alone(fetch, store)
        if acquired:
            return await _hold(cache, data_source_id, key, token, fetch, store, is_fresh)
        try:
            state = await cache.lock_state(data_source_id, key, since_us)
        except CacheUnavailable:
            return await _alone(fetch, store)
        if state.entry is not None and is_fresh(state.entry):
            return Shared(state.entry, False)
        if state.failure is not None:
            raise RelayedError(state.failure)
        if time.monotonic() + delay > give_up:
            raise UpstreamTimeout("timed out waiting for another sidecar's fetch of this key")
        # Not held and no entry: the holder released without storing (or its lock
        # expired); the next turn of the loop contends for the lock again.
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)


async def _alone(
    fetch: Callable[[], Awaitable[CacheEntry]], store: Callable[[CacheEntry], Awaitable[None]]
) -> Shared:
    """Redis is unreachable: fetch without the lock (store tries, and fails quietly)."""
    entry = await fetch()
    await store(entry)
    return Shared(entry, True)


async def _hold(
    cache: RedisCache,
    data_source_id: uuid.UUID,
    key: str,
    token: str,
    fetch: Callable[[], Awaitable[CacheEntry]],
    store: Callable[[CacheEntry], Awaitable[None]],
    is_fresh: Callable[[CacheEntry], bool],
) -> Shared:
    # Race window: the previous holder may have stored the entry and released
    # between our miss and our lock. Looking once more costs one GET, not a call.
    with contextlib.suppress(CacheUnavailable):
        existing = await cache.get(data_source_id, key)
        if existing is not None and is_fresh(existing):
            await cache.release(data_source_id, key, token)
            return Shared(existing, False)
    try:
        entry = await fetch()
    except BrokerError as exc:
        with contextlib.suppress(CacheUnavailable):
            failure = {**exc.to_dict(), "status": exc.status}
            await cache.mark_failed(data_source_id, key, token, failure, FAILURE_HOLD_MS)
        raise
    # If anything below fails the lock simply expires; the entry is ours either way.
    await store(entry)
    with contextlib.suppress(CacheUnavailable):
        await cache.release(data_source_id, key, token)
    return Shared(entry, True)
