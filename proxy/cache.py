"""Cache entries in Redis, expired by Redis itself (native TTL).

An entry holds everything a hit answers with — the DataObject id, its
creation time and the value already encoded as JSON — so a hit is one GET and
no database read, and the value is never decoded and re-encoded.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.keys import KeyLayout


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


class RedisCache:
    def __init__(self, redis: Redis, layout: KeyLayout) -> None:
        self.redis = redis
        self.layout = layout

    async def get(self, data_source_id: uuid.UUID, key: str) -> CacheEntry | None:
        try:
            raw = await self.redis.get(self.layout.cache_entry(data_source_id, key))
        except RedisError as exc:
            raise CacheUnavailable(type(exc).__name__) from exc
        # The client is made without decode_responses: values are always bytes.
        return None if raw is None else CacheEntry.decode(raw)  # type: ignore[arg-type]

    async def put(
        self, data_source_id: uuid.UUID, key: str, entry: CacheEntry, ttl: int | None
    ) -> None:
        """Store an entry; ``ttl=None`` keeps it until flushed."""
        try:
            await self.redis.set(
                self.layout.cache_entry(data_source_id, key), entry.encode(), ex=ttl
            )
        except RedisError as exc:
            raise CacheUnavailable(type(exc).__name__) from exc

    async def flush_source(self, data_source_id: uuid.UUID) -> int:
        """Unlink every entry of one source (what a draft replacement invalidates)."""
        removed = 0
        try:
            async for batch in _batches(self.redis, self.layout.cache_pattern(data_source_id)):
                removed += await self.redis.unlink(*batch)
        except RedisError as exc:
            raise CacheUnavailable(type(exc).__name__) from exc
        return removed


async def _batches(redis: Redis, pattern: str, size: int = 500) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=size):
        batch.append(key)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
