"""The ASGI application: the factory and the lifespan that owns every shared resource.

One database, one Redis client, one httpx client, one outbox: created
here at start-up, handed to routes as one ``Services`` object, and closed here
at shutdown, after the outbox had its last chance to reach the database.

Start-up either completes or fails with one line (``StartupError``): the
database must answer and be migrated, Redis must answer, and each wait is
bounded. Shutdown is bounded too: no close step, and no background task that
ignores its cancel, can hold the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import vendor_state
from proxy.announcements import Follower, listen
from proxy.broker import Broker, Limits
from proxy.cache import CacheEntry, RedisCache
from proxy.database import Database, describe, is_database_error, prepare
from proxy.egress import EgressPolicy
from proxy.erasure import Eraser
from proxy.errors import StartupError
from proxy.flushes import Flushes
from proxy.hotcache import HotEntries
from proxy.invalidation import follow_invalidations
from proxy.keys import KeyLayout
from proxy.metrics import HOT_BYTES, multiprocess_dir, sample
from proxy.outbox import Outbox
from proxy.pruner import Pruner, prune_in_background
from proxy.readiness import Dependencies
from proxy.redis_pool import create_redis, is_cluster, tracks_invalidations
from proxy.replays import replays_for
from proxy.request_ids import RequestIds
from proxy.routes import answers, health, internal
from proxy.routes.deferred import Deferred
from proxy.secrets import load_secret_box
from proxy.services import Services
from proxy.settings import Settings
from proxy.source_registry import Registry
from proxy.tokens import Tokens
from proxy.upstream import Upstream, create_client
from proxy.vendor_state import VendorState
from proxy.writer import OutboxWriter, sink_for

logger = logging.getLogger("databroker")

ADMIN_MODULES = (
    "proxy.routes.admin",
    "proxy.routes.analytics",
    "proxy.routes.credentials",
    "proxy.routes.erasure",
    "proxy.routes.objects",
    "proxy.routes.tryout",
    "proxy.openapi",
)
"""The admin routes' modules, imported at the first request for one (``proxy.routes.deferred``)."""
ADMIN_PREFIXES = ("/data-sources", "/analytics/", "/openapi.json")
"""Where every admin route's path starts."""
# How long one close step, or one background task's cancel, may take at shutdown.
CLOSE_TIMEOUT = 5.0
# How often the hot entries' gauges are sampled (seconds).
HOT_SAMPLE_INTERVAL = 1.0
# How long Redis has to answer its first PING (each connection attempt has its own 1 s).
REDIS_START_TIMEOUT = 10.0


def create_app(
    settings: Settings | None = None, started: Callable[[], None] | None = None
) -> ASGIApp:
    """The application; ``started`` runs once start-up has completed (``serve`` freezes
    the collector there: process-wide effects belong to the command, not the app)."""
    settings = settings or Settings()
    app = Starlette(
        routes=[
            *internal.routes,
            *health.routes,
            Deferred(ADMIN_PREFIXES, *ADMIN_MODULES),
        ],
        exception_handlers=answers.exception_handlers,
    )
    return RequestIds(internal.FrontDoor(Lifespan(app, settings, started)))


class Lifespan:
    """The ASGI lifespan protocol around ``app``, run here rather than by Starlette, whose
    lifespan reports a failed start-up to the server as the whole traceback."""

    def __init__(
        self, app: ASGIApp, settings: Settings, started: Callable[[], None] | None
    ) -> None:
        self.app = app
        self.settings = settings
        self.started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        failure: str | None = None
        async with contextlib.AsyncExitStack() as stack:
            try:
                with _one_line_failures():
                    scope["state"]["services"] = await _start(self.settings, stack)
            except StartupError as exc:
                failure = str(exc)
            if failure is None:
                if self.started is not None:
                    self.started()
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        # Reported once what start-up opened is closed again.
        if failure is not None:
            await send({"type": "lifespan.startup.failed", "message": failure})
        else:
            await send({"type": "lifespan.shutdown.complete"})


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


@contextlib.contextmanager
def _one_line_failures() -> Iterator[None]:
    """Any failure as a StartupError: an operator reads one line (the traceback at DEBUG)."""
    try:
        yield
    except StartupError:
        raise
    except Exception as exc:
        logger.debug("start-up failed", exc_info=True)
        raise StartupError(f"start-up failed: {_one_line(exc)}") from exc


async def check_services(settings: Settings) -> None:
    """What start-up needs from outside — complete settings, the secret key, a migrated
    database, Redis — checked, then released; StartupError otherwise. ``serve`` asks
    before starting workers: one line for any worker count, and an exit code it chooses."""
    with _one_line_failures():
        settings.check_serving()
        load_secret_box(settings)
        async with contextlib.AsyncExitStack() as stack:
            await _database(settings, stack)
            await _redis(settings, stack)


async def _database(settings: Settings, stack: contextlib.AsyncExitStack) -> Database:
    """The database, answering with this release's tables (the embedded default migrates
    itself)."""
    database = Database(
        settings.resolved_database_url,
        settings.database_connect_timeout,
        settings.database_command_timeout,
    )
    stack.push_async_callback(_bounded, "closing the database pools", database.close)
    await prepare(database, settings.embedded)
    return database


async def _redis(settings: Settings, stack: contextlib.AsyncExitStack) -> Redis | RedisCluster:
    redis = create_redis(settings)
    stack.push_async_callback(_bounded, "closing the Redis client", redis.aclose)
    try:
        async with asyncio.timeout(REDIS_START_TIMEOUT):
            await redis.ping()
    except (RedisError, OSError) as exc:
        raise StartupError(
            f"Redis at DATABROKER_REDIS_URL does not answer: {_one_line(exc)}"
        ) from exc
    return redis


async def _start(settings: Settings, stack: contextlib.AsyncExitStack) -> Services:
    """Open every resource, registering its close on ``stack`` (closed in reverse order)."""
    settings.check_serving()
    box = load_secret_box(settings)
    database = await _database(settings, stack)
    redis = await _redis(settings, stack)

    layout = KeyLayout(settings.redis_prefix, cluster=is_cluster(settings))
    registry = Registry(database, box, redis, layout)
    try:
        await registry.load()
    except Exception as exc:
        if not is_database_error(exc):
            raise
        raise StartupError(describe(exc)) from exc

    cache = RedisCache(redis, layout, _hot_entries(settings, redis, layout, stack))
    client = create_client(EgressPolicy.from_settings(settings))
    stack.push_async_callback(_bounded, "closing the HTTP client", client.aclose)

    outbox = Outbox(settings.resolved_outbox_dir)
    outbox.open()
    writer = OutboxWriter(
        outbox, sink_for(database, settings.outbox_batch_size), settings.outbox_flush_interval
    )
    # Replays what a previous process left behind before taking new traffic.
    await writer.flush()
    stack.push_async_callback(
        _bounded,
        "the last outbox flush",
        writer.stop,
        settings.shutdown_grace,
        timeout=settings.shutdown_grace + CLOSE_TIMEOUT,
    )
    _background(stack, writer.run(), "outbox writer")
    flushes = Flushes(cache)
    _background(stack, flushes.run(), "cache flush retries")
    pruner = Pruner(
        database,
        settings.retention_days,
        settings.prune_batch_size,
        settings.prune_pause,
        cache=cache,
    )
    _background(
        stack,
        prune_in_background(pruner, redis, layout.prune_lock, settings.prune_interval),
        "pruner",
    )

    replays = replays_for(database)
    stack.push_async_callback(_bounded, "closing the replay pool", replays.close)
    vendors = VendorState(redis, layout)
    broker = Broker(
        registry,
        cache,
        Upstream(client),
        outbox,
        Limits(settings.default_timeout, settings.max_response_bytes, settings.outbox_max_bytes),
        settings.project_id,
        backlog=lambda: writer.backlog_bytes,
        replays=replays,
        vendors=vendors,
        tokens=Tokens(redis, layout, box, client),
    )
    dependencies = Dependencies(
        {"redis": redis.ping, "database": database.ping},
        settings.dependency_check_interval,
    )
    stack.push_async_callback(dependencies.close)
    if multiprocess_dir() is not None:
        # A scrape reaches one worker, and the gauge combines every worker's last check:
        # each keeps its own fresh, not only when a probe or a scrape reaches it.
        _background(stack, dependencies.run(), "dependency checks")
    eraser = Eraser(database, cache, writer, layout.erasure_channel)
    followers = [
        Follower(
            "registry",
            layout.registry_channel,
            registry.reload_logged,
            settings.registry_refresh_interval,
            safety_check=registry.reload_if_changed,
        ),
        Follower(
            "vendor state", layout.vendor_channel, vendors.resync, vendor_state.SAFETY_INTERVAL
        ),
        Follower("erasures", layout.erasure_channel, on_message=eraser.repeat),
    ]
    _background(stack, listen(redis, followers), "announcements")
    return Services(
        settings,
        database,
        box,
        redis,
        cache,
        registry,
        writer,
        broker,
        flushes,
        dependencies,
        eraser,
    )


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
    gauges = [(HOT_BYTES, lambda: float(hot.bytes))]
    _background(stack, sample(HOT_SAMPLE_INTERVAL, gauges), "hot entry gauges")
    _background(stack, follow_invalidations(redis, layout.cache_family, hot), "invalidation link")
    return hot


async def _bounded(
    what: str, close: Callable[..., Awaitable[object]], *args: Any, timeout: float = CLOSE_TIMEOUT
) -> None:
    """One close step, waited for ``timeout`` at most and never raising: shutdown goes on."""
    task = asyncio.ensure_future(close(*args))
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        logger.warning("%s did not finish within %.0f s; left behind", what, timeout)
    elif not task.cancelled() and task.exception() is not None:
        logger.warning("%s failed: %s", what, _one_line(task.exception()))  # type: ignore[arg-type]


def _background(
    stack: contextlib.AsyncExitStack, coro: Coroutine[Any, Any, None], name: str
) -> None:
    task = asyncio.create_task(coro, name=name)
    stack.push_async_callback(_cancel, task)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it — for CLOSE_TIMEOUT at most, cancelling again meanwhile.

    One cancel is not always enough: redis-py's reads run under a timeout, and a
    cancel that lands as that timeout expires comes back as a timeout, which the
    invalidation link treats as a quiet connection and reads on (seen under uvloop:
    start-up that failed then waited on that task for good, deaf to SIGTERM).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_TIMEOUT
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        logger.warning(
            "%s ignored its cancel for %.0f s; left behind", task.get_name(), CLOSE_TIMEOUT
        )
