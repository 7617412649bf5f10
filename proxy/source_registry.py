"""What the broker serves from: the in-memory index of data sources and their variables,
read from the database (``proxy.source_rows``) and compiled once.

The hot path reads only this index (and Redis). It is rebuilt from the
database and swapped in one assignment, so a reader never sees half an update:
at start, after an admin change in this process, when another process
announces a change on the registry channel (``proxy.announcements``), when the
safety net finds a change it missed (``reload_if_changed``), and when a name is not
found (at once if Redis counts a change this index has not seen, else at most once a
second).

Callers share reloads: one runs at a time, and a caller whose need a reload in
flight meets waits for that one instead of starting another. A reload compiles
only the sources that changed since the last one (``last_updated_at``, status
and stored variables): the others are reused as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import RedisError

from proxy.cache import RedisClient
from proxy.database import Database
from proxy.keys import KeyLayout
from proxy.retry import Retrying
from proxy.secrets import SecretBox, Secrets
from proxy.source_rows import SourceRow, read_all, spec_of
from proxy.source_spec import CachingOptions, HTTPSource
from proxy.templates import CompiledSource, compile_source
from proxy.types import Status

logger = logging.getLogger("databroker.registry")

MISS_RELOAD_INTERVAL = 1.0
FULL_RELOAD_INTERVAL = 600.0
"""The longest the safety net goes without reading the database (``reload_if_changed``)."""

_Stored = tuple[tuple[str, str], ...]
"""A source's stored variables (or credentials) as their ciphertexts: equal only if no
value changed."""


@dataclass(frozen=True, slots=True)
class Source:
    """A data source as the broker serves it: validated and compiled once."""

    data_source_id: uuid.UUID
    name: str
    project_id: uuid.UUID | None
    status: Status
    http: HTTPSource
    caching: CachingOptions
    compiled: CompiledSource
    retrying: Retrying
    updated_at: float
    values: Secrets
    """The decrypted variables, which ``repr`` shows by name only."""
    credentials: Secrets
    """The decrypted credentials (CLIENT_ID, …) ``source.auth`` uses, shown by name only."""

    @classmethod
    def from_row(
        cls, row: SourceRow, values: Secrets, credentials: Secrets | None = None
    ) -> Source:
        spec = spec_of(row)
        return cls(
            data_source_id=row.data_source_id,
            name=row.name,
            project_id=row.project_id,
            status=row.status,
            http=spec.source,
            caching=spec.caching,
            compiled=compile_source(spec.source, spec.runtime_params or (), spec.variables or ()),
            retrying=Retrying.from_policy(spec.source.retry, spec.source.method),
            updated_at=row.last_updated_at.timestamp(),
            values=values,
            credentials=credentials or Secrets(),
        )


def _index(sources: list[Source]) -> dict[tuple[uuid.UUID | None, str], Source]:
    """One source per (project, name): the live one, else the latest archived."""
    index: dict[tuple[uuid.UUID | None, str], Source] = {}
    for source in sorted(sources, key=lambda s: (s.status != "ARCHIVED", s.updated_at)):
        index[(source.project_id, source.name)] = source
    return index


class Registry:
    def __init__(
        self,
        database: Database,
        box: SecretBox,
        redis: RedisClient,
        layout: KeyLayout,
        full_reload_interval: float = FULL_RELOAD_INTERVAL,
    ) -> None:
        self._database = database
        self._full_reload_interval = full_reload_interval
        self._box = box
        self._redis = redis
        self._layout = layout
        self._by_name: dict[tuple[uuid.UUID | None, str], Source] = {}
        # Every source of the last reload, by id, with what it was built from.
        self._built: dict[uuid.UUID, tuple[tuple[float, str, _Stored, _Stored], Source]] = {}
        self._loaded_at = -float("inf")
        """When the reload that built the index started (monotonic): it shows the database
        as it was then, or later."""
        self._reload: asyncio.Task[None] | None = None
        self._reload_started = 0.0
        self._changes_seen = 0
        """The fleet's change count as of the index's reload (``_changes``)."""

    def resolve(self, project_id: uuid.UUID | None, name: str) -> Source | None:
        return self._by_name.get((project_id, name))

    async def by_id(self, data_source_id: uuid.UUID, updated_at: float) -> Source:
        """The source as built from its row of ``updated_at`` (or later): reloads the index
        once if it holds an older one, or none (a change another sidecar just made).
        Raises KeyError if the reload does not bring it (deleted meanwhile)."""
        built = self._built.get(data_source_id)
        if built is None or built[1].updated_at < updated_at:
            await self.load()
            built = self._built[data_source_id]
        return built[1]

    async def resolve_fresh(self, project_id: uuid.UUID | None, name: str) -> Source | None:
        """``resolve``; an unknown name first waits for an index that shows every change
        committed before this call if Redis counts one this index has not seen (a source
        just created through another worker or sidecar, whose announcement has not been
        heard here yet), else for an index at most a second old."""
        source = self.resolve(project_id, name)
        if source is None:
            changes = await self._changes()
            behind = changes is not None and changes > self._changes_seen
            await self.load(as_of=None if behind else time.monotonic() - MISS_RELOAD_INTERVAL)
            source = self.resolve(project_id, name)
        return source

    async def _changes(self) -> int | None:
        """How many changes the fleet has committed (``{prefix}registry:changes``); None if
        Redis does not say."""
        try:
            return int(await self._redis.get(self._layout.registry_changes) or 0)
        except (RedisError, OSError, ValueError):
            return None

    async def load(self, as_of: float | None = None) -> None:
        """Make the index show the database as of ``as_of`` (monotonic; default now) or later.

        A reload in flight that started by then is joined; one that started earlier is
        waited for, then a new one starts (shared by whoever arrives meanwhile). Raises
        what the reload raised; the previous index stays in place.
        """
        wanted = time.monotonic() if as_of is None else as_of
        while self._loaded_at < wanted:
            reload = self._reload
            if reload is None:
                self._reload_started = time.monotonic()
                reload = self._reload = asyncio.create_task(self._load_once(self._reload_started))
            elif self._reload_started < wanted:
                # Started before the change this caller must see: its outcome is not ours.
                await asyncio.wait([reload])
                continue
            # shield: a caller that leaves (cancelled) must not cancel the others' reload.
            await asyncio.shield(reload)

    async def _load_once(self, started: float) -> None:
        try:
            # Read before the database: the index shows at least these changes.
            changes = await self._changes()
            rows, env_vars, credentials = await read_all(self._database)
            stored: dict[uuid.UUID, list[tuple[str, str]]] = {}
            for var in env_vars:
                if var.value is not None:
                    stored.setdefault(var.data_source_id, []).append((var.name, var.value))
            held: dict[uuid.UUID, list[tuple[str, str]]] = {}
            for c in credentials:
                held.setdefault(c.data_source_id, []).append((c.credential_type, c.value))
            built = {}
            for row in rows:
                made_of = (
                    row.last_updated_at.timestamp(),
                    row.status,
                    tuple(sorted(stored.get(row.data_source_id, ()))),
                    tuple(sorted(held.get(row.data_source_id, ()))),
                )
                previous = self._built.get(row.data_source_id)
                if previous is not None and previous[0] == made_of:
                    built[row.data_source_id] = previous
                    continue
                values = Secrets({name: self._box.decrypt(token) for name, token in made_of[2]})
                secrets = Secrets({kind: self._box.decrypt(token) for kind, token in made_of[3]})
                built[row.data_source_id] = (made_of, Source.from_row(row, values, secrets))
                # Compiling is CPU on the event loop: let requests in between sources.
                await asyncio.sleep(0)
            self._by_name = _index([source for _, source in built.values()])
            self._built = built
            self._loaded_at = started
            self._changes_seen = max(self._changes_seen, changes or 0)
        finally:
            self._reload = None

    async def changed(self, data_source_id: uuid.UUID) -> None:
        """Count the change in Redis, reload here and tell the other sidecars sharing this
        Redis (and this sidecar's other workers).

        Counted before the admin answer leaves: from then on, any worker that meets the
        source's name unknown sees a count its index has not, and reloads before it
        answers (``resolve_fresh``), even if the announcement has not reached it yet.

        Never raises: the change is committed. If the reload fails, the announcement
        still goes out, and every follower (this process's too) reloads on it or on
        its timer.
        """
        announced = True
        try:
            await self._redis.incr(self._layout.registry_changes)
        except (RedisError, OSError):
            announced = False
        try:
            await self.load()
        except Exception:
            logger.exception("registry reload after a change failed; the follower catches up")
        try:
            await self._redis.publish(self._layout.registry_channel, str(data_source_id))
        except (RedisError, OSError):
            announced = False
        if not announced:
            logger.warning("could not announce a registry change; others reload on their timer")

    async def reload_if_changed(self) -> None:
        """The safety net's look (one Redis GET): reload if Redis counts a change this index
        has not seen (its announcement was missed), or if Redis does not answer, or if the
        last reload is ``full_reload_interval`` old (a change nobody counted: a release
        before the count, a row edited by hand)."""
        changes = await self._changes()
        stale = time.monotonic() - self._loaded_at >= self._full_reload_interval
        if changes is None or changes > self._changes_seen or stale:
            await self.reload_logged()

    async def reload_logged(self) -> None:
        """Reload, logging a failure instead of raising: what an announcement, a
        resubscription or the safety timer runs (``proxy.announcements``)."""
        try:
            await self.load()
        except Exception:
            logger.exception("registry reload failed; serving the previous index")
