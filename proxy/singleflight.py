"""One upstream call per key: in one process, and across sidecars sharing Redis.

A caller takes its turn at a key, and either leads or receives::

    async with flights.turn(data_source_id, key, deadline, is_fresh) as turn:
        if turn.received is not None:
            ...  # another caller fetched it: answer from turn.received
        entry = ...  # this caller leads: fetch,
        await turn.keep(entry, ttl, stale_for)  # store it, hand it to those who waited

A failure of the leader's block is raised to every caller that waited for it.

In a process, concurrent callers of a key share one ``asyncio.Future``: the
first leads, the others wait for its outcome. Across processes, the leaders
contend for ``{prefix}lock:{sid}:{key}`` (``SET NX PX``, expiring a little
after the fetch's deadline, so a holder that crashes blocks nobody): the holder
fetches and stores the entry; the others poll entry and lock in one round trip
until the entry appears, the holder leaves its failure, or their deadline
passes. When Redis is unreachable the cross-process step is skipped: each
process still makes at most one call per key.

A leader's miss costs two round trips past its first GET: one script looks for
the entry (another sidecar may have stored it since that GET) and takes the lock
if there is none; one stores the entry and lets go of the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from enum import Enum

import orjson

from proxy.cache import CacheEntry, CacheUnavailable, RedisCache, Release, call, reply_bytes
from proxy.errors import BrokerError, InternalError, RelayedError, UpstreamTimeout
from proxy.outbox import new_id

FAILURE_HOLD_MS = 2000
"""How long a holder's failure is shown to waiters: long enough for them to see
it, short enough that the next request tries the upstream again."""

SLACK = 1.0
"""Seconds past a fetch's deadline for its holder to store the entry and let go."""

POLL_START = 0.005
POLL_MAX = 0.05

# Compare-and-act on a lock: only the holder (who knows the token) may change it,
# so a holder whose lock expired cannot release or overwrite a successor's lock.
# Shared with proxy.tokens, whose token-request lock follows the same pattern.
RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
MARK_FAILED = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) end return 0"
)
# One turn of contending, one round trip: {taken, entry, failure}. With ARGV[4] = '1' an
# entry answers by itself (the lock is left alone). Otherwise take a free lock, or one
# whose failure mark is older than the caller (a failure is shared with those who waited
# for it, never with those who came after it); a lock not taken shows its failure, if any.
_CONTEND = """
local entry = redis.call('get', KEYS[2])
if entry and ARGV[4] == '1' then return {0, entry} end
local v = redis.call('get', KEYS[1])
if v then
  if string.sub(v, 1, 1) ~= '!' then return {0, entry} end
  local at = tonumber(string.match(v, '^!(%d+) '))
  if at == nil or at >= tonumber(ARGV[3]) then return {0, entry, v} end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, entry}
"""
FAILED_MARK = b"!"


Store = Callable[[CacheEntry, int | None, int], Awaitable[None]]
"""Stores an entry with a TTL (None: none) and a stale_if_error; raises CacheUnavailable."""


class Turn:
    """One caller's turn at a key: ``received`` is another caller's entry, or None
    when this caller leads and must ``keep`` the entry it fetched."""

    __slots__ = ("_store", "received", "shared")

    def __init__(self, received: CacheEntry | None = None, store: Store | None = None) -> None:
        self.received = received
        self.shared: CacheEntry | None = None
        self._store = store

    async def keep(self, entry: CacheEntry, ttl: int | None, stale_for: int = 0) -> None:
        """Hand the fetched entry to those who wait for it, and store it (letting go of the
        Redis lock in the same round trip); CacheUnavailable if Redis did not take it,
        which leaves it shared in this process all the same."""
        self.shared = entry
        if self._store is None:
            raise InternalError("only the leader of a fetch keeps its entry")
        await self._store(entry, ttl, stale_for)


class Flights:
    """The fetches in flight in this process, and the Redis locks across sidecars."""

    def __init__(self, cache: RedisCache) -> None:
        self.cache = cache
        self._inflight: dict[Hashable, asyncio.Future[CacheEntry]] = {}

    @contextlib.asynccontextmanager
    async def turn(
        self,
        data_source_id: uuid.UUID,
        key: str,
        deadline: float,
        is_fresh: Callable[[CacheEntry], bool],
    ) -> AsyncIterator[Turn]:
        """Lead the fetch of ``key`` or receive its outcome; ``deadline`` bounds the fetch.

        ``is_fresh`` tells whether an entry found in Redis may be answered.
        """
        name = (data_source_id, key)
        leader = self._inflight.get(name)
        if leader is not None:
            yield Turn(await _follow(leader, deadline))
            return
        future = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            lock = _Lock(self.cache, data_source_id, key)
            async with self._across(lock, deadline, is_fresh) as turn:
                yield turn
            entry = turn.received or turn.shared
            if entry is None:
                raise InternalError("the fetch of this key ended without an entry")
            future.set_result(entry)
        except BaseException as exc:
            # A leader cancelled (shutdown) is not its followers' failure to re-raise as theirs.
            relayed = (
                exc if isinstance(exc, Exception) else InternalError("the fetch was cancelled")
            )
            future.set_exception(relayed)
            future.exception()  # marked retrieved: a leader without followers is not an error
            raise
        finally:
            del self._inflight[name]

    @contextlib.asynccontextmanager
    async def _across(
        self, lock: _Lock, deadline: float, is_fresh: Callable[[CacheEntry], bool]
    ) -> AsyncIterator[Turn]:
        """Hold the key's Redis lock while the caller fetches, or wait for the sidecar that does."""
        contended = await _contend(lock, deadline, is_fresh)
        if isinstance(contended, CacheEntry):
            yield Turn(contended)
            return
        if contended is _Contended.UNREACHABLE:
            # Redis is unreachable: fetch without the lock (storing tries, and fails quietly).
            yield Turn(store=lock.store_unlocked)
            return
        failed: BrokerError | None = None
        try:
            yield Turn(store=lock.store)
        except BrokerError as exc:
            failed = exc
            raise
        finally:
            # If this fails too the lock simply expires; the caller's entry is stored either way.
            if failed is not None or not lock.released:
                with contextlib.suppress(CacheUnavailable):
                    await (lock.release() if failed is None else lock.fail(failed))


class _Contended(Enum):
    HELD = "this caller holds the lock"
    UNREACHABLE = "Redis did not answer"


async def _contend(
    lock: _Lock, deadline: float, is_fresh: Callable[[CacheEntry], bool]
) -> CacheEntry | _Contended:
    """The entry another sidecar stored, or how contending ended without one; raises the
    holder's failure, or a timeout past ``deadline``."""
    give_up = time.monotonic() + deadline
    delay = POLL_START
    # The first look takes an entry stored since the caller's miss (by the previous holder,
    # between that GET and now) as the answer; one that is not fresh enough does not stop
    # the next look from taking the lock.
    entry_answers = True
    while True:
        try:
            taken, entry, failure = await lock.contend(deadline + SLACK, entry_answers)
        except CacheUnavailable:
            return _Contended.UNREACHABLE
        if entry is not None and is_fresh(entry):
            if taken:
                with contextlib.suppress(CacheUnavailable):
                    await lock.release()
            return entry
        if taken:
            return _Contended.HELD
        if entry is not None and entry_answers:
            entry_answers = False
            continue
        if failure is not None:
            raise failure
        if time.monotonic() + delay > give_up:
            raise UpstreamTimeout("timed out waiting for another sidecar's fetch of this key")
        # Not held and no entry: the holder released without storing (or its lock
        # expired); the next turn of the loop contends for the lock again.
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)


async def _follow(leader: asyncio.Future[CacheEntry], deadline: float) -> CacheEntry:
    """The in-process leader's entry (or its failure, raised here)."""
    # The leader may wait for another sidecar (up to one deadline), then fetch (up to another).
    try:
        # shield: a follower that gives up must not cancel the leader's fetch.
        return await asyncio.wait_for(asyncio.shield(leader), 2 * deadline + SLACK)
    except TimeoutError:
        raise UpstreamTimeout("timed out waiting for the fetch in flight for this key") from None


class _Lock:
    """This caller's side of a key's fetch lock in Redis."""

    def __init__(self, cache: RedisCache, data_source_id: uuid.UUID, key: str) -> None:
        self._cache = cache
        self._source_key = (data_source_id, key)
        self._redis = cache.redis
        self._name = cache.layout.lock(data_source_id, key)
        self._entry_name = cache.layout.cache_entry(data_source_id, key)
        self._token = new_id()
        # Microseconds: a caller arriving right after a failure must not share it.
        self._since_us = int(time.time() * 1_000_000)
        self.released = False
        """Let go of by the store of the entry (``store``)."""

    async def contend(
        self, expiry: float, entry_answers: bool
    ) -> tuple[bool, CacheEntry | None, RelayedError | None]:
        """Whether this caller took the lock (for ``expiry`` seconds; it expires by itself if
        its holder dies), the key's entry, and the holder's failure if this caller waited
        for it: one round trip (one slot on a cluster). ``entry_answers``: an entry found
        leaves the lock alone."""
        reply = await call(
            self._redis.eval(
                _CONTEND, 2, self._name, self._entry_name, self._token, int(expiry * 1000),
                self._since_us, "1" if entry_answers else "0",
            )
        )  # fmt: skip
        raw_entry = reply[1] if len(reply) > 1 else None
        entry = None if raw_entry is None else CacheEntry.decode(reply_bytes(raw_entry))
        raw_lock = reply[2] if len(reply) > 2 else None
        return bool(reply[0]), entry, None if raw_lock is None else self._failure(raw_lock)

    async def store(self, entry: CacheEntry, ttl: int | None, stale_for: int) -> None:
        """Store the key's entry and let go of the lock, in one round trip."""
        await self._cache.put(
            *self._source_key, entry, ttl, stale_for, Release(self._name, self._token)
        )
        self.released = True

    async def store_unlocked(self, entry: CacheEntry, ttl: int | None, stale_for: int) -> None:
        """Store the key's entry, no lock held (Redis did not answer the contention)."""
        await self._cache.put(*self._source_key, entry, ttl, stale_for)

    async def release(self) -> None:
        await call(self._redis.eval(RELEASE, 1, self._name, self._token))

    async def fail(self, error: BrokerError) -> None:
        """Leave the holder's failure on the lock so its waiters share it instead of stampeding."""
        failure = orjson.dumps({**error.to_dict(), "status": error.status})
        marker = b"%s%d %s" % (FAILED_MARK, time.time() * 1_000_000, failure)
        await call(
            self._redis.eval(MARK_FAILED, 1, self._name, self._token, marker, FAILURE_HOLD_MS)
        )

    def _failure(self, raw_lock: bytes | str) -> RelayedError | None:
        """The holder's failure a lock's value shows, if this caller waited for it."""
        mark = reply_bytes(raw_lock)
        if not mark.startswith(FAILED_MARK):
            return None
        failed_at, _, error = mark[1:].partition(b" ")
        # A failure marked before this caller arrived is not its to share.
        return RelayedError(orjson.loads(error)) if int(failed_at) >= self._since_us else None
