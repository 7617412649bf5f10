"""What the broker serves from: the in-memory index of data sources and their variables,
built from ``source_store`` and compiled once.

The hot path reads only this index (and Redis). It is rebuilt whole from the
database and swapped in one assignment, so a reader never sees half an update:
at start, after an admin change in this process, when another process
announces a change on the registry channel, periodically as a safety net, and
— at most once a second — when a name is not found.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from proxy.cache import RedisClient
from proxy.keys import KeyLayout
from proxy.retry import Retrying
from proxy.secrets import SecretBox
from proxy.source_spec import CachingOptions, HTTPSource
from proxy.source_store import SourceStore, spec_of
from proxy.tables import DataSource
from proxy.templates import CompiledSource, compile_source
from proxy.types import Status

logger = logging.getLogger("databroker.registry")

MISS_RELOAD_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Source:
    """A data source as the broker serves it: validated and compiled once."""

    data_source_id: uuid.UUID
    name: str
    project_id: uuid.UUID | None
    status: Status
    http: HTTPSource
    caching: CachingOptions
    runtime_params: frozenset[str]
    variables: tuple[str, ...]
    compiled: CompiledSource
    retrying: Retrying
    updated_at: float
    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: DataSource, values: dict[str, Any]) -> Source:
        spec = spec_of(row)
        runtime_params = spec.runtime_params or []
        variables = spec.variables or []
        return cls(
            data_source_id=row.data_source_id,
            name=row.name,
            project_id=row.project_id,
            status=row.status,  # type: ignore[arg-type]
            http=spec.source,
            caching=spec.caching,
            runtime_params=frozenset(runtime_params),
            variables=tuple(variables),
            compiled=compile_source(spec.source, runtime_params, variables),
            retrying=Retrying.from_policy(spec.source.retry, spec.source.method),
            updated_at=row.last_updated_at.timestamp(),
            values=values,
        )


def _index(sources: list[Source]) -> dict[tuple[uuid.UUID | None, str], Source]:
    """One source per (project, name): the live one, else the latest archived."""
    index: dict[tuple[uuid.UUID | None, str], Source] = {}
    for source in sorted(sources, key=lambda s: (s.status != "ARCHIVED", s.updated_at)):
        index[(source.project_id, source.name)] = source
    return index


class Registry:
    def __init__(
        self, store: SourceStore, box: SecretBox, redis: RedisClient, layout: KeyLayout
    ) -> None:
        self._store = store
        self._box = box
        self._redis = redis
        self._layout = layout
        self._by_name: dict[tuple[uuid.UUID | None, str], Source] = {}
        self._last_load = 0.0
        self._lock = asyncio.Lock()

    def resolve(self, project_id: uuid.UUID | None, name: str) -> Source | None:
        return self._by_name.get((project_id, name))

    async def resolve_fresh(self, project_id: uuid.UUID | None, name: str) -> Source | None:
        """``resolve``, reloading first when the name is unknown and the index is over a second old."""
        source = self.resolve(project_id, name)
        if source is None and time.monotonic() - self._last_load > MISS_RELOAD_INTERVAL:
            await self.load()
            source = self.resolve(project_id, name)
        return source

    async def load(self) -> None:
        async with self._lock:
            rows, env_vars = await self._store.all_with_variables()
            values: dict[uuid.UUID, dict[str, Any]] = {}
            for var in env_vars:
                if var.value is not None:
                    values.setdefault(var.data_source_id, {})[var.name] = self._box.decrypt(
                        var.value
                    )
            sources = [Source.from_row(row, values.get(row.data_source_id, {})) for row in rows]
            self._by_name = _index(sources)
            self._last_load = time.monotonic()

    async def changed(self, data_source_id: uuid.UUID) -> None:
        """Reload here and tell the other sidecars sharing this Redis."""
        await self.load()
        try:
            await self._redis.publish(self._layout.registry_channel, str(data_source_id))
        except RedisError:
            logger.warning("could not announce a registry change; others reload on their timer")

    async def follow(self, interval: float) -> None:
        """Reload on announcements and every ``interval`` seconds; runs until cancelled."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._layout.registry_channel)
                    deadline = time.monotonic() + interval
                    while True:
                        timeout = max(deadline - time.monotonic(), 0.0)
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=timeout
                        )
                        if message is not None or time.monotonic() >= deadline:
                            await self._reload_logged()
                            deadline = time.monotonic() + interval
            except Exception as exc:
                # Redis is down (or the subscription broke): keep the periodic reload
                # going without it; this task must outlive anything Redis does.
                if not isinstance(exc, RedisError | OSError):
                    logger.warning("registry subscription failed: %s", type(exc).__name__)
                await asyncio.sleep(interval)
                await self._reload_logged()

    async def _reload_logged(self) -> None:
        try:
            await self.load()
        except Exception:
            logger.exception("registry reload failed; serving the previous index")
