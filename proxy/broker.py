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
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass

from proxy import messages
from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import (
    AuditBacklogFull,
    BrokerError,
    DataSourceNotFound,
    InternalError,
    MissingParams,
    MissingVariables,
    UnknownParams,
)
from proxy.formats import charset_of, format_body
from proxy.keys import make_cache_key
from proxy.metrics import UPSTREAM_SECONDS, requests_counter
from proxy.outbox import DataObjectRecord, Outbox, RunDataRequestRecord, new_id
from proxy.singleflight import Flights, Shared, across_sidecars
from proxy.source_registry import Registry, Source
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
    outbox_max_bytes: int
    """At this backlog new upstream calls are refused; at twice it, cache hits too."""


# Codes that say the upstream failed, as opposed to the request or the broker:
# only these let a stale entry stand in for a fresh one.
UPSTREAM_FAILURES = frozenset(
    {"TIMEOUT", "CONNECTION_ERROR", "HTTP_ERROR", "RESPONSE_TOO_LARGE", "PARSE_ERROR"}
)


class Broker:
    def __init__(
        self,
        registry: Registry,
        cache: RedisCache,
        upstream: Upstream,
        outbox: Outbox,
        limits: Limits,
        default_project: uuid.UUID | None,
        backlog: Callable[[], int],
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.upstream = upstream
        self.outbox = outbox
        self.limits = limits
        self.default_project = default_project
        self.backlog = backlog
        self.flights = Flights()
        self._cache_down = False
        self._slots: dict[tuple[uuid.UUID, int], asyncio.Semaphore] = {}

    async def handle(self, body: bytes) -> Answer:
        try:
            request = messages.parse_request(body)
        except BrokerError as exc:
            return self.refuse(exc)
        project = request.project_id or self.default_project
        source = await self.registry.resolve_fresh(project, request.data_source_name)
        if source is None:
            return self.refuse(
                DataSourceNotFound(f"no data source named {request.data_source_name!r}")
            )
        return await _Call(self, source, request).run()

    def refuse(self, error: BrokerError) -> Answer:
        """An error before a source was resolved: answered, not audited."""
        requests_counter("NONE", error.code).inc()
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
        caching = source.caching
        try:
            await self.cache.put(
                source.data_source_id, key, entry, caching.ttl_seconds, caching.stale_if_error or 0
            )
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
        self.stale_because: BrokerError | None = None

    async def run(self) -> Answer:
        try:
            value_json = await self._serve()
        except AuditBacklogFull as exc:
            # Not journaled: the journal is what is full. Counted in metrics instead.
            return self.broker.refuse(exc)
        except BrokerError as exc:
            return self._finish(exc)
        except Exception:
            logger.exception("unexpected failure serving %r", self.source.name)
            return self._finish(InternalError("the broker failed unexpectedly; see its log"))
        return self._finish(value_json)

    def _check_backlog(self, factor: int) -> None:
        if self.broker.backlog() >= factor * self.broker.limits.outbox_max_bytes:
            raise AuditBacklogFull("the audit outbox is full; the database is not keeping up")

    async def _serve(self) -> bytes:
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
        if not source.caching.enabled:
            self._check_backlog(1)
            return (await self._fetch()).value_json
        entry = await self.broker.cached(source, self.key)
        if entry is not None and self._fresh(entry):
            self._check_backlog(2)
            return self._from_cache(entry)
        self._check_backlog(1)
        try:
            shared = await self._fetch_shared()
        except BrokerError as exc:
            if entry is None or exc.code not in UPSTREAM_FAILURES:
                raise
            # stale-if-error: the entry outlived its TTL only because the source allows it.
            self.stale_because = exc
            return self._from_cache(entry)
        if not shared.fetched_here:
            return self._from_cache(shared.entry)
        return shared.entry.value_json

    def _fresh(self, entry: CacheEntry) -> bool:
        return entry.is_fresh(time.time(), self.source.caching.ttl_seconds)

    def _from_cache(self, entry: CacheEntry) -> bytes:
        self.origin, self.data_object_id = "CACHE", entry.data_object_id
        self.start_time = self.end_time = None
        return entry.value_json

    def _timeout(self) -> float:
        return self.source.http.timeout or self.broker.limits.default_timeout

    async def _fetch_shared(self) -> Shared:
        """One upstream call per key, whoever asks, in this process or another."""
        broker, source = self.broker, self.source
        assert self.key is not None
        key, deadline = self.key, source.retrying.deadline(self._timeout())

        async def store(entry: CacheEntry) -> None:
            await broker.store(source, key, entry)

        async def across() -> Shared:
            return await across_sidecars(
                broker.cache, source.data_source_id, key, self._fetch, store, self._fresh, deadline
            )

        # The in-process leader may itself wait for another sidecar (up to one
        # deadline) and then fetch (up to another): its followers wait that long.
        return await broker.flights.run((source.data_source_id, key), across, 2 * deadline + 1)

    async def _fetch(self) -> CacheEntry:
        """Call the upstream and journal its raw bytes; the formatted value as an entry."""
        broker, source = self.broker, self.source
        assert self.key is not None
        rendered = render(source.compiled, self.request.configured_params, source.values)
        self.origin = "REQUEST"
        self.start_time = time.time()
        try:
            async with broker.slot(source):
                fetched = await broker.upstream.fetch(
                    rendered,
                    timeout=self._timeout(),
                    retrying=source.retrying,
                    max_bytes=source.http.max_response_bytes or broker.limits.max_response_bytes,
                    follow_redirects=bool(source.http.follow_redirects),
                )
        finally:
            self.end_time = time.time()
            UPSTREAM_SECONDS.observe(self.end_time - self.start_time)
        data_object_id = uuid.uuid4()
        self.data_object_id = str(data_object_id)
        # Journaled before parsing: a body that fails to parse is kept for audit too.
        broker.outbox.append(
            DataObjectRecord(
                data_object_id, source.data_source_id, self.key, fetched.content, self.end_time
            )
        )
        value_json = format_body(
            fetched.content, source.http.response_type, charset_of(fetched.content_type)
        )
        return CacheEntry(self.data_object_id, self.end_time, value_json)

    def _finish(self, outcome: bytes | BrokerError) -> Answer:
        """Journal the audit row, then answer: the row is on disk before the answer leaves."""
        error = outcome if isinstance(outcome, BrokerError) else None
        try:
            self.broker.outbox.append(self._audit(error or self.stale_because))
        except Exception:
            # The journal itself failed (disk full, outbox closed): answer anyway, loudly.
            logger.exception("could not journal the audit row of a request")
            error = InternalError("the broker could not record this request; see its log")
        requests_counter(self.origin or "NONE", error.code if error else "OK").inc()
        if error is not None:
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
        assert self.origin is not None and self.key is not None and self.data_object_id is not None
        assert isinstance(outcome, bytes)
        return Answer(
            200,
            messages.success(
                data_object_id=self.data_object_id,
                origin=self.origin,
                key=self.key,
                value_json=outcome,
                start_time=self.start_time,
                end_time=self.end_time,
                stale=self.stale_because is not None,
            ),
        )

    def _audit(self, error: BrokerError | None) -> RunDataRequestRecord:
        recorded = None if error is None else error.to_dict()
        if recorded is not None and error is self.stale_because:
            recorded["served_stale"] = True
        return RunDataRequestRecord(
            run_data_request_id=new_id(),
            run_id=self.request.run_id,
            data_object_id=self.data_object_id,
            data_source_id=self.source.data_source_id,
            data_origin=self.origin,
            start_time=self.start_time,
            end_time=self.end_time,
            error=recorded,
            created_at=time.time(),
        )
