"""One broker request, start to end: the seed's data flow as a single driver.

resolve → check params and variables → cache lookup → (on a miss, one caller
per key:) render → fetch → journal the DataObject → format → store → answer,
with the audit row journaled before the answer leaves. Pure steps live in
their modules; this module only orders them and does the I/O through thin
adapters. Every request that resolved a data source leaves exactly one audit
row, and every failure, whatever raised it, answers in the contract's shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

from proxy import messages, tracing
from proxy.auth import check_credentials, fetch_deadline
from proxy.cache import CacheEntry, CacheUnavailable, RedisCache
from proxy.errors import (
    AuditBacklogFull,
    BrokerError,
    DataSourceNotFound,
    InternalError,
    ReplayMiss,
)
from proxy.formats import charset_of, format_body
from proxy.keys import make_cache_key
from proxy.logs import bind_run_id
from proxy.metrics import UPSTREAM_SECONDS
from proxy.outage import Outage
from proxy.outbox import DataObjectRecord, Outbox, RunDataRequestRecord, new_id
from proxy.replays import Replays
from proxy.singleflight import Flights, Turn
from proxy.source_registry import Registry, Source
from proxy.source_spec import Money
from proxy.templates import RenderedRequest, check, render
from proxy.tokens import Tokens
from proxy.types import Origin
from proxy.upstream import Fetched, Upstream
from proxy.vendor_state import VendorState

logger = logging.getLogger("databroker.broker")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    # What the route counts it by (proxy.metrics.record_request): the source's name
    # ("" before one is resolved), the origin and the error code.
    source: str = ""
    origin: str = "NONE"
    code: str = "OK"
    retry_after: float | None = None
    """Sent as ``Retry-After`` (whole seconds): when asking again can succeed."""


@dataclass(frozen=True, slots=True)
class Limits:
    default_timeout: float
    max_response_bytes: int
    outbox_max_bytes: int
    """At this backlog new upstream calls are refused; at twice it, cache hits too."""


# Codes that say the upstream failed, as opposed to the request or the broker:
# only these let a stale entry stand in for a fresh one.
# An open breaker too: the contract lets a stale entry answer instead.
UPSTREAM_FAILURES = frozenset(
    {
        "TIMEOUT",
        "CONNECTION_ERROR",
        "HTTP_ERROR",
        "RESPONSE_TOO_LARGE",
        "PARSE_ERROR",
        "CIRCUIT_OPEN",
        "AUTH_ERROR",
    }
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
        replays: Replays,
        vendors: VendorState,
        tokens: Tokens,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.upstream = upstream
        self.outbox = outbox
        self.limits = limits
        self.default_project = default_project
        self.backlog = backlog
        self.replays = replays
        self.vendors = vendors
        self.tokens = tokens
        self.flights = Flights(cache)
        self._redis_outage = Outage(
            logger,
            "Redis unavailable (%s); answering from upstream",
            "Redis reachable again; cache in use",
        )
        self._slots: dict[tuple[uuid.UUID, int], asyncio.Semaphore] = {}

    async def handle(self, body: bytes) -> Answer:
        try:
            request = messages.parse_request(body)
            bind_run_id(request.run_id)
            project = request.project_id or self.default_project
            # Reloads the index for an unknown name: the database may be down, a
            # stored variable undecryptable: those answer INTERNAL like any failure.
            source = await self.registry.resolve_fresh(project, request.data_source_name)
        except BrokerError as exc:
            return self.refuse(exc)
        except Exception:
            logger.exception("could not resolve a data source")
            return self.refuse(InternalError("the broker could not resolve the data source"))
        if source is None:
            return self.refuse(
                DataSourceNotFound(f"no data source named {request.data_source_name!r}")
            )
        return await _Call(self, source, request).run()

    def refuse(self, error: BrokerError, source: str = "") -> Answer:
        """An error before a source was resolved (or its audit row could be): answered,
        not audited."""
        return Answer(
            error.status,
            messages.failure(error),
            source,
            "NONE",
            error.code,
            error.retry_after,
        )

    def outbox_full(self, for_hits: bool = False) -> bool:
        """At the outbox bound upstream calls are refused (and ``/readyz`` says "full");
        cache hits, whose rows are small, only at twice the bound."""
        return self.backlog() >= self.limits.outbox_max_bytes * (2 if for_hits else 1)

    async def cached(self, source: Source, key: str) -> CacheEntry | None:
        try:
            entry = await self.cache.get(source.data_source_id, key)
        except CacheUnavailable as exc:
            self._redis_outage.failed(str(exc))
            return None
        self._redis_outage.recovered()
        return entry

    async def keep(self, source: Source, turn: Turn, entry: CacheEntry) -> None:
        """A leader's fetched entry: shared with its waiters, stored for the source's TTL."""
        caching = source.caching
        try:
            await turn.keep(entry, caching.ttl_seconds, caching.stale_if_error or 0)
        except CacheUnavailable as exc:
            self._redis_outage.failed(str(exc))

    def timeout_of(self, source: Source) -> float:
        return source.http.timeout or self.limits.default_timeout

    async def send(
        self, source: Source, rendered: RenderedRequest, applied: list[str] | None = None
    ) -> Fetched:
        """One upstream call as every request makes it: the source's concurrency slot, its
        auth (a new token on a 401), timeout, retries, size cap, redirects and the egress
        policy (in the transport). Broker requests and ``POST …/test`` both call this;
        ``applied`` collects the auth credentials sent (``Tokens.send``)."""
        timeout = self.timeout_of(source)
        async with self.slot(source):
            return await self.tokens.send(
                source, rendered, timeout, partial(self._upstream, source, timeout), applied
            )

    async def _upstream(self, source: Source, timeout: float, rendered: RenderedRequest) -> Fetched:
        """One upstream call (its retries included) of an authenticated request."""
        with tracing.span("upstream"):
            return await self.upstream.fetch(
                tracing.propagate(rendered),
                timeout=timeout,
                retrying=source.retrying,
                max_bytes=source.http.max_response_bytes or self.limits.max_response_bytes,
                follow_redirects=bool(source.http.follow_redirects),
                source=source.name,
                throttled=partial(self.vendors.hold, source.data_source_id),
            )

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
        self.cost: Money | None = None
        """The source's price, once an upstream call was let through."""
        # max_age is measured from here.
        self.arrival = time.time()
        self.max_age = request.max_age
        # The creation time of the stored object a replay answered with.
        self.replayed_at: float | None = None

    async def run(self) -> Answer:
        try:
            value_json = await self._serve()
        except AuditBacklogFull as exc:
            # Not journaled: the journal is what is full. Counted in metrics instead.
            return self.broker.refuse(exc, self.source.name)
        except BrokerError as exc:
            return self._finish(exc)
        except Exception:
            logger.exception("unexpected failure serving %r", self.source.name)
            return self._finish(InternalError("the broker failed unexpectedly; see its log"))
        return self._finish(value_json)

    def _check_backlog(self, for_hits: bool = False) -> None:
        if self.broker.outbox_full(for_hits):
            raise AuditBacklogFull("the audit outbox is full; the database is not keeping up")

    async def _serve(self) -> bytes:
        source, params = self.source, self.request.configured_params
        check(source.compiled, params, source.values)
        check_credentials(source.http.auth, source.credentials)
        self.key = key = make_cache_key(source.data_source_id, params)
        if self.request.replay is not None:
            with tracing.span("replay"):
                replayed = await self._replay(self.request.replay)
            if replayed is not None:
                return replayed
            # hybrid, nothing stored: a fresh upstream call, as a request of today would make.
            self.max_age = 0
        if not source.caching.enabled:
            self._check_backlog()
            return (await self._fetch()).value_json
        with tracing.span("cache") as traced:
            entry = await self.broker.cached(source, key)
            if traced is not None:
                age = None if entry is None else round(self.arrival - entry.created_at, 3)
                tracing.annotate(traced, **{"cache.hit": entry is not None, "cache.age_s": age})
        if entry is not None and self._fresh(entry):
            self._check_backlog(for_hits=True)
            return self._from_cache(entry)
        self._check_backlog()
        deadline = fetch_deadline(
            source.http.auth, source.retrying.deadline(self._timeout()), self._timeout()
        )
        try:
            # One upstream call per key, whoever asks, in this process or another.
            async with tracing.waited(
                "lock", self.broker.flights.turn(source.data_source_id, key, deadline, self._fresh)
            ) as turn:
                if turn.received is not None:
                    return self._from_cache(turn.received)
                new = await self._fetch()
                with tracing.span("cache.store"):
                    await self.broker.keep(source, turn, new)
                return new.value_json
        except BrokerError as exc:
            if (
                entry is None
                or exc.code not in UPSTREAM_FAILURES
                or not entry.within(self.max_age, self.arrival)
            ):
                raise
            # stale-if-error: the entry outlived its TTL only because the source allows it.
            self.stale_because = exc
            return self._from_cache(entry)

    def _fresh(self, entry: CacheEntry) -> bool:
        """Within the source's TTL and the request's max_age (hot copies are judged the same)."""
        return entry.is_fresh(time.time(), self.source.caching.ttl_seconds) and entry.within(
            self.max_age, self.arrival
        )

    async def _replay(self, replay: messages.Replay) -> bytes | None:
        """The stored object's formatted value; None for a hybrid replay that found none."""
        assert self.key is not None
        self._check_backlog(for_hits=True)
        stored = await self.broker.replays.find(self.source.data_source_id, self.key, replay)
        if stored is None:
            if replay.mode == "strict":
                raise ReplayMiss(
                    "no stored DataObject for this key "
                    + ("as of that instant" if replay.as_of else "in that run")
                )
            return None
        self.origin, self.data_object_id = "CACHE", stored.data_object_id
        self.replayed_at = stored.created_at
        return format_body(stored.value, self.source.http.response_type)

    def _from_cache(self, entry: CacheEntry) -> bytes:
        self.origin, self.data_object_id = "CACHE", entry.data_object_id
        self.start_time = self.end_time = None
        return entry.value_json

    def _timeout(self) -> float:
        return self.broker.timeout_of(self.source)

    async def _fetch(self) -> CacheEntry:
        """Render and call the upstream, journal its raw bytes, format them: the entry."""
        broker, source = self.broker, self.source
        assert self.key is not None
        rendered = render(source.compiled, self.request.configured_params, source.values)
        # Budget, rate limit, breaker, pause: raises the refusal, or waits for a turn.
        with tracing.span("admission"):
            admission = await broker.vendors.before_call(source, self._timeout())
        self.cost = source.http.cost
        self.origin = "REQUEST"
        self.start_time = time.time()
        try:
            fetched = await broker.send(source, rendered)
        except BrokerError as exc:
            await broker.vendors.after_call(source, admission, exc)
            raise
        finally:
            self.end_time = time.time()
            UPSTREAM_SECONDS.observe(self.end_time - self.start_time)
        if admission is not None:
            await broker.vendors.after_call(source, admission, None)
        self.data_object_id = data_object_id = new_id()
        # Journaled before parsing: a body that fails to parse is kept for audit too.
        with tracing.span("outbox"):
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
            with tracing.span("outbox"):
                self.broker.outbox.append(self._audit(error or self.stale_because))
        except Exception:
            # The journal itself failed (disk full, outbox closed): answer anyway, loudly.
            logger.exception("could not journal the audit row of a request")
            error = InternalError("the broker could not record this request; see its log")
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
                self.source.name,
                self.origin or "NONE",
                error.code,
                error.retry_after,
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
                replayed_created_at=self.replayed_at,
            ),
            self.source.name,
            self.origin,
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
            cost_amount=None if self.cost is None else self.cost.amount,
            cost_currency=None if self.cost is None else self.cost.currency,
            replay=None if self.request.replay is None else self.request.replay.by,
        )
