"""Cache entries in Redis, expired by Redis itself (native TTL).

An entry holds everything a hit answers with — the DataObject id, its
creation time and the value already encoded as JSON — so a hit is one GET and
no database read, and the value is never decoded and re-encoded.

With ``stale_if_error`` an entry outlives its TTL by that many seconds: Redis
still expires it, and the broker tells fresh from stale by ``created_at``.

Given hot entries (``proxy.hotcache``), reads go to them first and what Redis
returns is copied there, with its remaining lifetime, for the next hit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.hotcache import HotEntries, Ticket
from proxy.keys import KeyLayout
from proxy.metrics import HOT_HITS

T = TypeVar("T")

RedisClient = Redis | RedisCluster


class CacheUnavailable(Exception):
    """Redis could not be reached; callers fall back to the upstream."""


async def call(command: Awaitable[T]) -> T:
    """``command``'s reply; a Redis failure becomes CacheUnavailable, where it enters."""
    try:
        return await command
    except RedisError as exc:
        raise CacheUnavailable(type(exc).__name__) from exc


def reply_bytes(value: bytes | str) -> bytes:
    """The client is made without decode_responses: replies are always bytes."""
    return value if isinstance(value, bytes) else value.encode()


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

    def within(self, max_age: float | None, arrival: float) -> bool:
        """Whether the entry was at most ``max_age`` seconds old when a request arrived.

        One stored after the arrival (a fetch in flight then) is younger than any max_age.
        """
        return max_age is None or arrival - self.created_at <= max_age


@dataclass(frozen=True, slots=True)
class Release:
    """A lock (``proxy.singleflight``'s) that a store lets go of: its name and the holder's
    token. On Redis Cluster the lock shares its entry's hash slot (``KeyLayout``)."""

    lock: str
    token: str


# SET (EX when given), then the lock's release as proxy.singleflight.RELEASE does it:
# only its holder's token lets go. One round trip where a miss spent two.
_STORE_AND_RELEASE = """
if ARGV[2] ~= '0' then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('set', KEYS[1], ARGV[1])
end
if redis.call('get', KEYS[2]) == ARGV[3] then redis.call('del', KEYS[2]) end
return 1
"""


# A GET and its PTTL as one command: a pipeline of the two costs the client ~65 µs more
# (redis-py's pipeline machinery), on every miss and every first read of a hot entry.
_GET_WITH_PTTL = "return {redis.call('get', KEYS[1]), redis.call('pttl', KEYS[1])}"


class RedisCache:
    def __init__(
        self, redis: RedisClient, layout: KeyLayout, hot: HotEntries[CacheEntry] | None = None
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.hot = hot

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
        raw = await call(self.redis.get(name))
        return None if raw is None else CacheEntry.decode(reply_bytes(raw))

    async def _get_and_keep(self, hot: HotEntries[CacheEntry], ticket: Ticket) -> CacheEntry | None:
        """GET with the name's PTTL in one round trip, the entry then kept hot."""
        try:
            raw, ttl_ms = await call(self.redis.eval(_GET_WITH_PTTL, 1, ticket.name))
        except BaseException:
            hot.forget(ticket)
            raise
        if raw is None:
            hot.forget(ticket)
            return None
        entry = CacheEntry.decode(reply_bytes(raw))
        hot.keep(ticket, entry, len(entry.value_json), ttl_ms)
        return entry

    async def put(
        self,
        data_source_id: uuid.UUID,
        key: str,
        entry: CacheEntry,
        ttl: int | None,
        stale_for: int = 0,
        release: Release | None = None,
    ) -> None:
        """Store an entry; ``ttl=None`` keeps it until flushed. Given ``release``, the lock
        it names is let go of in the same round trip (if that token still holds it)."""
        expiry = None if ttl is None else ttl + stale_for
        name = self.layout.cache_entry(data_source_id, key)
        if release is None:
            await call(self.redis.set(name, entry.encode(), ex=expiry))
        else:
            await call(
                self.redis.eval(
                    _STORE_AND_RELEASE, 2, name, release.lock, entry.encode(), expiry or 0,
                    release.token,
                )
            )  # fmt: skip
        if self.hot is not None:
            # Now, not when Redis's invalidation arrives: in between, a request of this
            # sidecar that refuses the old copy (max_age) would fetch the key again.
            self.hot.invalidate([name])

    async def remove(self, data_source_id: uuid.UUID, key: str) -> None:
        """Delete one entry (an erasure): here at once, on other sidecars by the invalidation."""
        name = self.layout.cache_entry(data_source_id, key)
        await call(self.redis.delete(name))
        if self.hot is not None:
            self.hot.invalidate([name])

    async def remove_older(
        self, data_source_id: uuid.UUID, keys: Iterable[str], before: float
    ) -> int:
        """Delete the entries of ``keys`` created before ``before`` (their objects were pruned:
        an entry without expiry would serve them for good); how many went.

        Race window: an entry rewritten between the GET and the DEL is deleted though
        new, which costs one upstream call; never an old entry kept.
        """
        names = [self.layout.cache_entry(data_source_id, key) for key in set(keys)]
        if not names:
            return 0
        # One MGET, not a GET each: a batch's thousand replies parsed as one on the event
        # loop that serves hits. One source's names share a hash slot on Cluster.
        replies = await call(self.redis.mget(names))
        old = [
            name
            for name, raw in zip(names, replies, strict=True)
            if raw is not None and CacheEntry.decode(reply_bytes(raw)).created_at < before
        ]
        if old:
            await call(self.redis.delete(*old))
            if self.hot is not None:
                self.hot.invalidate(old)
        return len(old)

    async def flush_source(self, data_source_id: uuid.UUID) -> int:
        """Unlink every entry of one source (what a draft replacement invalidates)."""
        removed = 0
        async for batch in _batches(self.redis, self.layout.cache_pattern(data_source_id)):
            removed += await call(self.redis.unlink(*batch))
        if self.hot is not None:
            # Now, not when Redis's invalidations arrive: this sidecar's next request must miss.
            self.hot.invalidate_prefix(self.layout.cache_entry(data_source_id, ""))
        return removed


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
