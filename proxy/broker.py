"""One broker request, start to end: the seed's data flow as a single driver.

resolve → check params and variables → cache lookup → render → fetch →
format → journal → cache store → answer. Pure steps live in their modules;
this module only orders them and does the I/O through thin adapters.
Every request that resolved a data source leaves exactly one audit row.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass

from proxy import messages
from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import (
    BrokerError,
    DataSourceNotFound,
    InternalError,
    MissingParams,
    MissingVariables,
    ParseError,
    UnknownParams,
)
from proxy.formats import charset_of, format_body
from proxy.keys import make_cache_key
from proxy.metrics import BROKER_REQUESTS, UPSTREAM_SECONDS
from proxy.outbox import DataObjectRecord, Outbox, Record, RunDataRequestRecord
from proxy.registry import Registry, Source
from proxy.templates import render
from proxy.types import Origin
from proxy.upstream import Upstream

logger = logging.getLogger("databroker.broker")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    default_timeout: float
    max_response_bytes: int


class Broker:
    def __init__(
        self,
        registry: Registry,
        cache: RedisCache,
        upstream: Upstream,
        outbox: Outbox,
        limits: Limits,
        default_project: uuid.UUID | None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.upstream = upstream
        self.outbox = outbox
        self.limits = limits
        self.default_project = default_project
        self._cache_down = False
        self._slots: dict[tuple[uuid.UUID, int], asyncio.Semaphore] = {}

    async def handle(self, body: bytes) -> Answer:
        try:
            request = messages.parse_request(body)
        except BrokerError as exc:
            return self._refuse(exc)
        project = request.project_id or self.default_project
        source = await self.registry.resolve_fresh(project, request.data_source_name)
        if source is None:
            return self._refuse(
                DataSourceNotFound(f"no data source named {request.data_source_name!r}")
            )
        return await _Call(self, source, request).run()

    def _refuse(self, error: BrokerError) -> Answer:
        """An error before a source was resolved: answered, not audited."""
        BROKER_REQUESTS.labels(origin="NONE", code=error.code).inc()
        return Answer(error.status, messages.failure(error))

    async def cached(self, source: Source, key: str) -> CacheEntry | None:
        try:
            entry = await self.cache.get(source.data_source_id, key)
        except CacheUnavailable as exc:
            self._cache_failed(exc)
            return None
        self._cache_recovered()
        return entry

    async def store(self, source: Source, key: str, entry: CacheEntry) -> None:
        try:
            await self.cache.put(source.data_source_id, key, entry, source.caching.ttl_seconds)
        except CacheUnavailable as exc:
            self._cache_failed(exc)

    def _cache_failed(self, exc: CacheUnavailable) -> None:
        # Logged once per outage: at full load a log line per request would be its own outage.
        if not self._cache_down:
            logger.warning("Redis unavailable (%s); answering from upstream", exc)
            self._cache_down = True

    def _cache_recovered(self) -> None:
        if self._cache_down:
            logger.warning("Redis reachable again; cache in use")
            self._cache_down = False

    def slot(self, source: Source) -> AbstractAsyncContextManager[object]:
        """The source's concurrency limit (waits for a free slot), if it declares one."""
        limit = source.http.max_concurrency
        if limit is None:
            return nullcontext()
        semaphore = self._slots.get((source.data_source_id, limit))
        if semaphore is None:
            semaphore = self._slots[(source.data_source_id, limit)] = asyncio.Semaphore(limit)
        return semaphore


class _Call:
    """The state of one resolved request, so every exit writes the same audit row."""

    def __init__(self, broker: Broker, source: Source, request: messages.BrokerRequest) -> None:
        self.broker = broker
        self.source = source
        self.request = request
        self.key: str | None = None
        self.data_object_id: str | None = None
        self.origin: Origin | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None

    async def run(self) -> Answer:
        try:
            return await self._serve()
        except BrokerError as exc:
            return self._fail(exc)
        except Exception:
            logger.exception("unexpected failure serving %r", self.source.name)
            return self._fail(InternalError("the broker failed unexpectedly; see its log"))

    def _fail(self, error: BrokerError, *records: Record) -> Answer:
        try:
            self.broker.outbox.append(*records, self._audit(error))
        except Exception:
            # The journal itself failed (disk full, outbox closed): answer anyway, loudly.
            logger.exception("could not journal the audit row of a failed request")
            error = InternalError("the broker could not record this request; see its log")
        BROKER_REQUESTS.labels(origin=self.origin or "NONE", code=error.code).inc()
        return Answer(
            error.status,
            messages.failure(
                error,
                data_object_id=self.data_object_id,
                origin=self.origin,
                key=self.key,
                start_time=self.start_time,
                end_time=self.end_time,
            ),
        )

    async def _serve(self) -> Answer:
        source, params = self.source, self.request.configured_params
        missing = sorted(source.runtime_params - params.keys())
        if missing:
            raise MissingParams(missing)
        unknown = sorted(params.keys() - source.runtime_params)
        if unknown:
            raise UnknownParams(unknown)
        unset = [name for name in source.variables if name not in source.values]
        if unset:
            raise MissingVariables(unset)
        self.key = make_cache_key(source.data_source_id, params)
        if source.caching.enabled:
            entry = await self.broker.cached(source, self.key)
            if entry is not None:
                return self._hit(entry)
        return await self._fetch()

    def _hit(self, entry: CacheEntry) -> Answer:
        self.origin, self.data_object_id = "CACHE", entry.data_object_id
        self.broker.outbox.append(self._audit(None))
        return self._succeed(entry.value_json)

    async def _fetch(self) -> Answer:
        broker, source = self.broker, self.source
        assert self.key is not None
        rendered = render(source.compiled, self.request.configured_params, source.values)
        self.origin = "REQUEST"
        self.start_time = time.time()
        try:
            async with broker.slot(source):
                fetched = await broker.upstream.fetch(
                    rendered,
                    timeout=source.http.timeout or broker.limits.default_timeout,
                    retrying=source.retrying,
                    max_bytes=source.http.max_response_bytes or broker.limits.max_response_bytes,
                )
        finally:
            self.end_time = time.time()
            UPSTREAM_SECONDS.observe(self.end_time - self.start_time)
        data_object_id = uuid.uuid4()
        self.data_object_id = str(data_object_id)
        data_object = DataObjectRecord(
            data_object_id, source.data_source_id, self.key, fetched.content, self.end_time
        )
        try:
            value_json = format_body(
                fetched.content, source.http.response_type, charset_of(fetched.content_type)
            )
        except ParseError as exc:
            # The raw bytes are kept for audit, but nothing is cached.
            return self._fail(exc, data_object)
        broker.outbox.append(data_object, self._audit(None))
        if source.caching.enabled:
            await broker.store(
                source, self.key, CacheEntry(self.data_object_id, self.end_time, value_json)
            )
        return self._succeed(value_json)

    def _succeed(self, value_json: bytes) -> Answer:
        assert self.origin is not None and self.key is not None and self.data_object_id is not None
        BROKER_REQUESTS.labels(origin=self.origin, code="OK").inc()
        return Answer(
            200,
            messages.success(
                data_object_id=self.data_object_id,
                origin=self.origin,
                key=self.key,
                value_json=value_json,
                start_time=self.start_time,
                end_time=self.end_time,
            ),
        )

    def _audit(self, error: BrokerError | None) -> RunDataRequestRecord:
        return RunDataRequestRecord(
            run_data_request_id=uuid.uuid4(),
            run_id=self.request.run_id,
            data_object_id=None if self.data_object_id is None else uuid.UUID(self.data_object_id),
            data_source_id=self.source.data_source_id,
            data_origin=self.origin,
            start_time=self.start_time,
            end_time=self.end_time,
            error=None if error is None else error.to_dict(),
            created_at=time.time(),
        )
