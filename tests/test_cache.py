"""proxy.cache on the real Redis: entries, their keys, native expiry, flushing, Redis down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.keys import KeyLayout
from tests.conftest import REDIS_URL
from tests.harness import async_wait_for, free_port

KEY = "e465f2acfb33f03ef426739839a3e75c"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def cache(redis: Redis, redis_prefix: str) -> RedisCache:
    return RedisCache(redis, KeyLayout(redis_prefix))


def entry(value_json: bytes = b'{"a":1}') -> CacheEntry:
    return CacheEntry(str(uuid.uuid4()), 1_700_000_000.25, value_json)


async def keys_under(redis: Redis, prefix: str) -> set[bytes]:
    return {key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)}


@pytest.mark.parametrize(
    "value_json",
    [
        b'{"a":[1,2.5,"\xc3\xa9\\u00e9"],"b":null,"c":{"d":true}}',
        b'"plain text"',
        b"null",
        b'{\n  "pretty": "json with newlines"\n}',
        b"[]",
    ],
)
async def test_put_then_get_round_trips(cache: RedisCache, value_json: bytes) -> None:
    sid = uuid.uuid4()
    stored = entry(value_json)
    await cache.put(sid, KEY, stored, ttl=60)
    got = await cache.get(sid, KEY)
    assert got == stored
    assert got is not None and got.value_json == value_json  # bytes unchanged


async def test_get_of_a_missing_entry_is_none(cache: RedisCache) -> None:
    assert await cache.get(uuid.uuid4(), KEY) is None


async def test_entry_key_is_the_contract_layout(
    cache: RedisCache, redis: Redis, redis_prefix: str
) -> None:
    sid = uuid.uuid4()
    await cache.put(sid, KEY, entry(), ttl=60)
    assert await keys_under(redis, redis_prefix) == {f"{redis_prefix}cache:{sid}:{KEY}".encode()}


async def test_entries_are_per_source_and_key(cache: RedisCache) -> None:
    sid, other = uuid.uuid4(), uuid.uuid4()
    first, second = entry(b"1"), entry(b"2")
    await cache.put(sid, KEY, first, ttl=60)
    await cache.put(other, KEY, second, ttl=60)
    assert await cache.get(sid, KEY) == first
    assert await cache.get(other, KEY) == second
    assert await cache.get(sid, "0" * 32) is None


async def test_entry_expires_natively(cache: RedisCache, redis: Redis, redis_prefix: str) -> None:
    sid = uuid.uuid4()
    await cache.put(sid, KEY, entry(), ttl=1)
    ttl = await redis.ttl(f"{redis_prefix}cache:{sid}:{KEY}")
    assert 0 < ttl <= 1

    async def gone() -> bool:
        return await cache.get(sid, KEY) is None

    await async_wait_for(gone, timeout=5)


async def test_no_ttl_means_no_expiry(cache: RedisCache, redis: Redis, redis_prefix: str) -> None:
    sid = uuid.uuid4()
    await cache.put(sid, KEY, entry(), ttl=None)
    assert await redis.ttl(f"{redis_prefix}cache:{sid}:{KEY}") == -1


async def test_put_again_replaces_entry_and_ttl(
    cache: RedisCache, redis: Redis, redis_prefix: str
) -> None:
    sid = uuid.uuid4()
    await cache.put(sid, KEY, entry(b"1"), ttl=60)
    newer = entry(b"2")
    await cache.put(sid, KEY, newer, ttl=None)
    assert await cache.get(sid, KEY) == newer
    assert await redis.ttl(f"{redis_prefix}cache:{sid}:{KEY}") == -1


async def test_flush_source_removes_only_that_source(
    cache: RedisCache, redis: Redis, redis_prefix: str
) -> None:
    sid, other = uuid.uuid4(), uuid.uuid4()
    kept = entry(b"kept")
    for n in range(3):
        await cache.put(sid, f"{n:032x}", entry(), ttl=60)
    await cache.put(other, KEY, kept, ttl=60)
    await redis.set(f"{redis_prefix}lock:{sid}", b"x")  # another family, beside cache:

    assert await cache.flush_source(sid) == 3
    assert [await cache.get(sid, f"{n:032x}") for n in range(3)] == [None, None, None]
    assert await cache.get(other, KEY) == kept
    assert await keys_under(redis, redis_prefix) == {
        f"{redis_prefix}cache:{other}:{KEY}".encode(),
        f"{redis_prefix}lock:{sid}".encode(),
    }


async def test_flush_source_with_nothing_cached(cache: RedisCache) -> None:
    assert await cache.flush_source(uuid.uuid4()) == 0


async def test_flush_source_of_many_entries(
    cache: RedisCache, redis: Redis, redis_prefix: str
) -> None:
    sid = uuid.uuid4()
    layout = KeyLayout(redis_prefix)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(1201):  # more than two of flush_source's batches
            pipe.set(layout.cache_entry(sid, f"{n:032x}"), entry().encode(), ex=60)
        await pipe.execute()
    assert await cache.flush_source(sid) == 1201
    assert await keys_under(redis, redis_prefix) == set()


async def test_flush_source_leaves_other_prefixes_alone(redis: Redis, redis_prefix: str) -> None:
    sid = uuid.uuid4()
    ours = RedisCache(redis, KeyLayout(f"{redis_prefix}a:"))
    theirs = RedisCache(redis, KeyLayout(f"{redis_prefix}b:"))
    await ours.put(sid, KEY, entry(), ttl=60)
    await theirs.put(sid, KEY, entry(), ttl=60)
    assert await ours.flush_source(sid) == 1
    assert await theirs.get(sid, KEY) is not None


async def test_flush_source_with_glob_characters_in_the_prefix(
    redis: Redis, redis_prefix: str
) -> None:
    """A prefix is a name, not a pattern: ``a?[x]*:`` flushes its own keys, not ``abx-other:``'s."""
    sid = uuid.uuid4()
    globby = RedisCache(redis, KeyLayout(f"{redis_prefix}a?[x]*:"))
    lookalike = RedisCache(redis, KeyLayout(f"{redis_prefix}abx-other:"))
    await globby.put(sid, KEY, entry(), ttl=60)
    await lookalike.put(sid, KEY, entry(), ttl=60)
    assert await globby.flush_source(sid) == 1
    assert await globby.get(sid, KEY) is None
    assert await lookalike.get(sid, KEY) is not None


# --- Redis down ----------------------------------------------------------------------------


@pytest.fixture
async def down_cache(redis_prefix: str) -> AsyncIterator[RedisCache]:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    yield RedisCache(client, KeyLayout(redis_prefix))
    await client.aclose()


async def test_get_raises_cache_unavailable_when_redis_is_down(down_cache: RedisCache) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(CacheUnavailable):
            await down_cache.get(uuid.uuid4(), KEY)


async def test_put_raises_cache_unavailable_when_redis_is_down(down_cache: RedisCache) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(CacheUnavailable):
            await down_cache.put(uuid.uuid4(), KEY, entry(), ttl=60)


async def test_flush_raises_cache_unavailable_when_redis_is_down(down_cache: RedisCache) -> None:
    async with asyncio.timeout(5):
        with pytest.raises(CacheUnavailable):
            await down_cache.flush_source(uuid.uuid4())


# --- CacheEntry ----------------------------------------------------------------------------


def test_entry_encoding_is_a_header_line_then_the_value() -> None:
    stored = CacheEntry("id-1", 12.5, b'{"x":"y"}')
    assert stored.encode() == b'{"id":"id-1","c":12.5}\n{"x":"y"}'
    assert CacheEntry.decode(stored.encode()) == stored
