"""Erasure (GDPR/LGPD right to erasure): a key's DataObjects and cache entry removed everywhere.

Where an erased body can be, and how each place is emptied, in this order:

1. Redis's cache entry: deleted; this sidecar's hot copy is dropped at once,
   every other sidecar's by the invalidation Redis sends for the delete.
2. This sidecar's outbox: shipped first (sealed and written), so the copies it
   journaled reach the table, and their segment files are removed.
3. The tables, in one transaction: audit rows naming the key's objects get
   ``data_object_id`` NULL and ``erased_at`` (the trail still counts the call);
   the objects are deleted.
4. Other sidecars' outboxes: an announcement on ``{prefix}events:erasure``
   makes each sidecar ship its outbox and repeat step 3 for the objects created
   up to the erasure, and for the audit rows naming the objects already erased:
   a copy journaled there before the erasure and shipped after it does not
   survive it.

Race window: a sidecar cut from Redis during the announcement misses it, and
what its outbox held for the key is written when it ships; erase again after
such an outage. Objects created after the erasure (a new request for the same
params) are new data and stay.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson
from redis.exceptions import RedisError

from proxy.cache import CacheUnavailable, RedisCache
from proxy.database import Database
from proxy.errors import DatabaseUnavailable, RedisUnavailable
from proxy.writer import OutboxWriter

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("databroker.erasure")


@dataclass(frozen=True, slots=True)
class Erased:
    """What one erasure did in the tables."""

    data_object_ids: list[uuid.UUID]
    audit_rows: int


async def erase_rows(
    database: Database,
    data_source_id: uuid.UUID,
    key: str,
    at: datetime,
    known_ids: Sequence[uuid.UUID] = (),
) -> Erased:
    """Delete the key's objects created up to ``at``; mark the audit rows naming them, or
    naming ``known_ids`` (objects an earlier pass erased), with ``erased_at = at``. One
    transaction. Every sidecar repeats an erasure (step 4): on Postgres it runs on the
    serving pool, so that an erasure does not load SQLAlchemy across the fleet."""
    if not database.pooled:
        return await _erase_through_engine(database.engine, data_source_id, key, at, known_ids)
    async with database.connection() as conn, conn.transaction():
        ids = [r[0] for r in await conn.fetch(_FOUND, data_source_id, key, at)]
        named = list({*ids, *known_ids})
        marked = 0
        if named:
            status = await conn.execute(_MARK, named, at)
            marked = int(status.split()[-1])  # "UPDATE n"
        if ids:
            await conn.execute(_DELETE, ids)
    return Erased(ids, marked)


_FOUND = (
    "SELECT data_object_id FROM data_object"
    " WHERE data_source_id = $1 AND key = $2 AND created_at <= $3"
)
_MARK = (
    "UPDATE run_data_request SET data_object_id = NULL, erased_at = $2"
    " WHERE data_object_id = ANY($1::uuid[])"
)
_DELETE = "DELETE FROM data_object WHERE data_object_id = ANY($1::uuid[])"


async def _erase_through_engine(
    engine: AsyncEngine,
    data_source_id: uuid.UUID,
    key: str,
    at: datetime,
    known_ids: Sequence[uuid.UUID],
) -> Erased:
    """``erase_rows`` on SQLite, the embedded default, which serves through the engine."""
    from sqlalchemy import delete, select, update

    from proxy.tables import data_object, run_data_request

    found = (
        select(data_object.c.data_object_id)
        .where(data_object.c.data_source_id == data_source_id)
        .where(data_object.c.key == key, data_object.c.created_at <= at)
    )
    async with engine.begin() as conn:
        ids = list((await conn.execute(found)).scalars().all())
        named = list({*ids, *known_ids})
        marked = 0
        if named:
            result = await conn.execute(
                update(run_data_request)
                .where(run_data_request.c.data_object_id.in_(named))
                .values(data_object_id=None, erased_at=at)
            )
            marked = result.rowcount
        if ids:
            await conn.execute(delete(data_object).where(data_object.c.data_object_id.in_(ids)))
    return Erased(ids, marked)


class Eraser:
    def __init__(
        self, database: Database, cache: RedisCache, writer: OutboxWriter, channel: str
    ) -> None:
        self.database = database
        self.cache = cache
        self.writer = writer
        self.channel = channel

    async def erase(self, data_source_id: uuid.UUID, key: str) -> Erased:
        """Steps 1 to 4 of the module's docstring; RedisUnavailable or DatabaseUnavailable
        if a step could not be done (what was done stays done: erase again)."""
        at = datetime.now(UTC)
        try:
            await self.cache.remove(data_source_id, key)
        except CacheUnavailable as exc:
            raise RedisUnavailable(f"the cache entry could not be deleted ({exc}); retry") from exc
        await self._ship()
        erased = await erase_rows(self.database, data_source_id, key, at)
        # Never the key: it stands for the subject whose data this removed.
        logger.info(
            "erased %d DataObjects of data source %s; %d audit rows marked",
            len(erased.data_object_ids),
            data_source_id,
            erased.audit_rows,
        )
        announcement = {
            "s": str(data_source_id),
            "k": key,
            "at": at.isoformat(),
            "ids": [str(i) for i in erased.data_object_ids],
        }
        try:
            await self.cache.redis.publish(self.channel, orjson.dumps(announcement))
        except RedisError as exc:
            raise RedisUnavailable(
                f"erased here, but the other sidecars could not be told ({type(exc).__name__}); "
                "retry"
            ) from exc
        return erased

    async def _ship(self) -> None:
        if not await self.writer.flush():
            raise DatabaseUnavailable("the outbox could not be written to the database; retry")

    async def repeat(self, data: bytes) -> None:
        """Repeat an erasure another sidecar announced (step 4): ``proxy.announcements``
        hands each message of the erasure channel here."""
        fields = orjson.loads(data)
        try:
            await self._ship()
            await erase_rows(
                self.database,
                uuid.UUID(fields["s"]),
                fields["k"],
                datetime.fromisoformat(fields["at"]),
                [uuid.UUID(i) for i in fields["ids"]],
            )
        except Exception:
            # The database away: the objects this outbox holds are written when it is back.
            logger.exception("an announced erasure could not be repeated here; erase again")
