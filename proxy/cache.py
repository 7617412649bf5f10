"""Cache entries and fetch locks in Redis, expired by Redis itself (native TTL).

An entry holds everything a hit answers with — the DataObject id, its
creation time and the value already encoded as JSON — so a hit is one GET and
no database read, and the value is never decoded and re-encoded.

With ``stale_if_error`` an entry outlives its TTL by that many seconds: Redis
still expires it, and the broker tells fresh from stale by ``created_at``.

Given hot entries (``proxy.hotcache``), reads go to them first and what Redis
returns is copied there, with its remaining lifetime, for the next hit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.hotcache import HotEntries, Ticket
from proxy.keys import KeyLayout
from proxy.metrics import HOT_HITS

T = TypeVar("T")

RedisClient = Redis | RedisCluster

# Compare-and-act on a lock: only the holder (who knows the token) may change it,
# so a holder whose lock expired cannot release or overwrite a successor's lock.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_MARK_FAILED = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) end return 0"
)
# Take a free lock, or one whose failure mark is older than the caller: a failure
# is shared with those who waited for it, never with those who came after it.
_ACQUIRE = """
local v = redis.call('get', KEYS[1])
if v then
  if string.sub(v, 1, 1) ~= '!' then return 0 end
  local at = tonumber(string.match(v, '^!(%d+) '))
  if at == nil or at >= tonumber(ARGV[3]) then return 0 end
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
FAILED_MARK = b"!"


class CacheUnavailable(Exception):
    """Redis could not be reached; callers fall back to the upstream."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    data_object_id: str
    created_at: float
    value_json: bytes

    def encode(self) -> bytes:
        """A one-line JSON header, a newline, then the value's JSON (which has no raw newline)."""
        header = orjson.dumps({"id": self.data_object_id, "c": self.created_at})
        return header + b"\n" + self.value_json

    @classmethod
    def decode(cls, raw: bytes) -> CacheEntry:
        header, _, value_json = raw.partition(b"\n")
        fields = orjson.loads(header)
        return cls(fields["id"], fields["c"], value_json)

    def is_fresh(self, now: float, ttl: int | None) -> bool:
        return ttl is None or now - self.created_at < ttl


@dataclass(frozen=True, slots=True)
class LockState:
    """What a waiter sees of another sidecar's fetch."""

    entry: CacheEntry | None
    held: bool
    failure: dict[str, Any] | None


class RedisCache:
    def __init__(
        self, redis: RedisClient, layout: KeyLayout, hot: HotEntries[CacheEntry] | None = None
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.hot = hot

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            return await command
        except RedisError as exc:
            raise CacheUnavailable(type(exc).__name__) from exc

    async def get(self, data_source_id: uuid.UUID, key: str) -> CacheEntry | None:
        name = self.layout.cache_entry(data_source_id, key)
        hot = self.hot
        if hot is not None:
            entry = hot.get(name)
            if entry is not None:
                HOT_HITS.inc()
                return entry
            ticket = hot.watch(name)
            if ticket is not None:
                return await self._get_and_keep(hot, ticket)
        raw = await self._call(self.redis.get(name))
        return None if raw is None else CacheEntry.decode(_bytes(raw))

    async def _get_and_keep(self, hot: HotEntries[CacheEntry], ticket: Ticket) -> CacheEntry | None:
        """GET with the name's PTTL in one round trip, the entry then kept hot."""
        try:
            async with self.redis.pipeline(transaction=False) as pipeline:
                pipeline.get(ticket.name)
                pipeline.pttl(ticket.name)
                raw, ttl_ms = await self._call(pipeline.execute())
        except BaseException:
            hot.forget(ticket)
            raise
        if raw is None:
            hot.forget(ticket)
            return None
        entry = CacheEntry.decode(_bytes(raw))
        hot.keep(ticket, entry, len(entry.value_json), ttl_ms)
        return entry

    async def put(
        self,
        data_source_id: uuid.UUID,
        key: str,
        entry: CacheEntry,
        ttl: int | None,
        stale_for: int = 0,
    ) -> None:
        """Store an entry; ``ttl=None`` keeps it until flushed."""
        expiry = None if ttl is None else ttl + stale_for
        await self._call(
            self.redis.set(self.layout.cache_entry(data_source_id, key), entry.encode(), ex=expiry)
        )

    async def flush_source(self, data_source_id: uuid.UUID) -> int:
        """Unlink every entry of one source (what a draft replacement invalidates)."""
        removed = 0
        async for batch in _batches(self.redis, self.layout.cache_pattern(data_source_id)):
            removed += await self._call(self.redis.unlink(*batch))
        if self.hot is not None:
            # Now, not when Redis's invalidations arrive: this sidecar's next request must miss.
            self.hot.invalidate_prefix(self.layout.cache_entry(data_source_id, ""))
        return removed

    async def acquire(
        self, data_source_id: uuid.UUID, key: str, token: str, ttl_ms: int, since_us: int
    ) -> bool:
        """Take the fetch lock of a key; it expires by itself if its holder dies.

        ``since_us`` is when the caller started: a failure marked before it does
        not hold the lock against this caller.
        """
        lock = self.layout.lock(data_source_id, key)
        return bool(await self._call(self.redis.eval(_ACQUIRE, 1, lock, token, ttl_ms, since_us)))

    async def release(self, data_source_id: uuid.UUID, key: str, token: str) -> None:
        lock = self.layout.lock(data_source_id, key)
        await self._call(self.redis.eval(_RELEASE, 1, lock, token))

    async def mark_failed(
        self, data_source_id: uuid.UUID, key: str, token: str, error: dict[str, Any], hold_ms: int
    ) -> None:
        """Leave the holder's failure for ``hold_ms`` so waiters share it instead of stampeding."""
        lock = self.layout.lock(data_source_id, key)
        # Microseconds: a caller arriving right after the failure must not share it.
        marker = b"%s%d %s" % (FAILED_MARK, time.time() * 1_000_000, orjson.dumps(error))
        await self._call(self.redis.eval(_MARK_FAILED, 1, lock, token, marker, hold_ms))

    async def lock_state(self, data_source_id: uuid.UUID, key: str, since_us: int) -> LockState:
        """The entry and the lock of a key in one round trip (one slot on a cluster).

        A failure marked before ``since_us`` is not this caller's to share.
        """
        entry_key = self.layout.cache_entry(data_source_id, key)
        lock_key = self.layout.lock(data_source_id, key)
        raw_entry, raw_lock = await self._call(self.redis.mget(entry_key, lock_key))
        entry = None if raw_entry is None else CacheEntry.decode(_bytes(raw_entry))
        if raw_lock is not None and _bytes(raw_lock).startswith(FAILED_MARK):
            failed_at, _, error = _bytes(raw_lock)[1:].partition(b" ")
            failure = orjson.loads(error) if int(failed_at) >= since_us else None
            return LockState(entry, held=False, failure=failure)
        return LockState(entry, held=raw_lock is not None, failure=None)


def _bytes(value: bytes | str) -> bytes:
    """The client is made without decode_responses: replies are always bytes."""
    return value if isinstance(value, bytes) else value.encode()


async def _batches(redis: RedisClient, pattern: str, size: int = 500) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    try:
        async for key in redis.scan_iter(match=pattern, count=size):
            batch.append(key)
            if len(batch) == size:
                yield batch
                batch = []
    except RedisError as exc:
        raise CacheUnavailable(type(exc).__name__) from exc
    if batch:
        yield batch
