"""The ASGI application: the factory and the lifespan that owns every shared resource.

One database engine, one Redis client, one httpx client, one outbox: created
here at start-up, handed to routes through the lifespan state, and closed here
at shutdown, after the outbox had its last chance to reach the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from proxy.broker import Broker, Limits
from proxy.cache import CacheEntry, RedisCache
from proxy.database import create_engine, migrate
from proxy.egress import EgressPolicy
from proxy.hotcache import HotEntries
from proxy.invalidation import follow_invalidations
from proxy.keys import KeyLayout
from proxy.metrics import HOT_BYTES, HOT_LIVE
from proxy.openapi import openapi
from proxy.outbox import Outbox
from proxy.redis_pool import create_redis, is_cluster, tracks_invalidations
from proxy.routes import admin, health, internal
from proxy.secrets import load_secret_box
from proxy.settings import Settings
from proxy.source_registry import Registry
from proxy.source_store import SourceStore
from proxy.upstream import Upstream, create_client
from proxy.writer import DatabaseSink, OutboxWriter

logger = logging.getLogger("databroker")


def create_app(settings: Settings | None = None) -> ASGIApp:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as stack:
            state = await _start(settings, stack)
            # What start-up allocated (modules, SQLAlchemy, pydantic…) lives as long
            # as the process: kept out of the collector, a full collection scans only
            # what requests allocate. Measured under hit load: the longest GC pause
            # went from 82 ms to 4 ms, the hit p99 from 64 ms to 6 ms.
            gc.freeze()
            try:
                yield state
            finally:
                gc.unfreeze()

    app = Starlette(
        routes=[
            *internal.routes,
            *admin.routes,
            *health.routes,
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return internal.FrontDoor(app)


async def _start(settings: Settings, stack: contextlib.AsyncExitStack) -> dict[str, Any]:
    """Open every resource, registering its close on ``stack`` (closed in reverse order)."""
    box = load_secret_box(settings)
    engine = create_engine(settings.resolved_database_url)
    stack.push_async_callback(engine.dispose)
    if settings.embedded:
        await migrate(engine)

    redis = create_redis(settings)
    stack.push_async_callback(redis.aclose)
    layout = KeyLayout(settings.redis_prefix, cluster=is_cluster(settings))
    cache = RedisCache(redis, layout, _hot_entries(settings, redis, layout, stack))

    client = create_client(EgressPolicy.from_settings(settings))
    stack.push_async_callback(client.aclose)

    sources = SourceStore(engine, box)
    registry = Registry(sources, box, redis, layout)
    await registry.load()

    outbox = Outbox(settings.resolved_outbox_dir)
    outbox.open()
    writer = OutboxWriter(
        outbox, DatabaseSink(engine, settings.outbox_batch_size), settings.outbox_flush_interval
    )
    # Replays what a previous process left behind before taking new traffic.
    await writer.flush()
    stack.push_async_callback(writer.stop, settings.shutdown_grace)
    _background(stack, writer.run(), "outbox writer")
    _background(stack, registry.follow(settings.registry_refresh_interval), "registry follower")

    broker = Broker(
        registry,
        cache,
        Upstream(client),
        outbox,
        Limits(settings.default_timeout, settings.max_response_bytes, settings.outbox_max_bytes),
        settings.project_id,
        backlog=lambda: writer.backlog_bytes,
    )
    return {
        "settings": settings,
        "engine": engine,
        "redis": redis,
        "cache": cache,
        "sources": sources,
        "registry": registry,
        "writer": writer,
        "broker": broker,
    }


def _hot_entries(
    settings: Settings,
    redis: Redis | RedisCluster,
    layout: KeyLayout,
    stack: contextlib.AsyncExitStack,
) -> HotEntries[CacheEntry] | None:
    """Hot entries and the invalidation link that keeps them correct, where Redis can feed one."""
    if not settings.hot_cache_max_bytes or not tracks_invalidations(settings):
        return None
    assert isinstance(redis, Redis)
    hot: HotEntries[CacheEntry] = HotEntries(settings.hot_cache_max_bytes)
    HOT_BYTES.set_function(lambda: hot.bytes)
    HOT_LIVE.set_function(lambda: int(hot.live))
    _background(stack, follow_invalidations(redis, layout.cache_family, hot), "invalidation link")
    return hot


def _background(stack: contextlib.AsyncExitStack, coro: Any, name: str) -> None:
    task = asyncio.create_task(coro, name=name)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)
