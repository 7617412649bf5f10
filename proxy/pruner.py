"""Deletes the DataObjects and audit rows older than their source's retention (proxy.retention).

Rows go a batch at a time, each batch its own short transaction followed by a
pause: a long ``DELETE`` would hold SQLite's one write lock (the outbox writer
waits on it, and behind the writer the outbox fills) or, on Postgres, hold
locks and WAL for minutes. A batch is chosen by the (source, created_at)
indexes and deleted by primary key, the same statement on both databases.

In the serving process, one sidecar of the fleet prunes per interval: the one
that takes ``{prefix}prune`` in Redis (SET NX with the interval as expiry,
renewed after every batch while it prunes, never released: the next round
starts when it expires). Redis away: nobody prunes that round, which costs
nothing but the round.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Column, ColumnElement, Table, Uuid, and_, column, delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.cache import CacheUnavailable, RedisCache, RedisClient, call, reply_bytes
from proxy.metrics import ROWS_PRUNED
from proxy.outbox import new_id
from proxy.retention import Cut, SourceRetention, cuts
from proxy.tables import data_object, data_source, run_data_request

logger = logging.getLogger("databroker.pruner")

DELETED_SOURCE = "(deleted source)"
"""The name a deleted draft's rows are reported under."""

# Each table, its primary key, and what a delete returns: an object's cache key (its entry
# may outlive it), an audit row's id (only counted).
_TABLES = (
    (data_object, "data_object_id", "key"),
    (run_data_request, "run_data_request_id", "run_data_request_id"),
)


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows of a source's cut went (or, in a dry run, would go)."""

    cut: Cut
    objects: int
    requests: int


class Pruner:
    def __init__(
        self,
        engine: AsyncEngine,
        default_days: int | None,
        batch_size: int = 1000,
        pause: float = 0.05,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache: RedisCache | None = None,
    ) -> None:
        """``cache``: where the entries of pruned objects are deleted too (None: no Redis
        to reach, as for ``prune`` beside the embedded default's in-process one)."""
        self.engine = engine
        self.cache = cache
        self.default_days = default_days
        self.batch_size = batch_size
        self.pause = pause
        self.clock = clock

    async def cuts(self) -> list[Cut]:
        """Every source's cut now, archived sources included: their rows age too. A deleted
        draft's rows (their source row is gone) take the default retention."""
        query = select(
            data_source.c.data_source_id, data_source.c.name, data_source.c.retention_days
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            sources = [SourceRetention(r.data_source_id, r.name, r.retention_days) for r in rows]
            if self.default_days is not None:
                known = {source.data_source_id for source in sources}
                named: set[uuid.UUID] = set()
                for table, *_ in _TABLES:
                    named.update(await _source_ids(conn, table))
                sources += [
                    SourceRetention(orphan, DELETED_SOURCE, None)
                    for orphan in sorted(named - known)
                ]
        return cuts(sources, self.default_days, self.clock())

    async def run(
        self, dry_run: bool = False, after_batch: Callable[[], Awaitable[None]] | None = None
    ) -> list[Pruned]:
        """Prune (or, with ``dry_run``, count) every source's cut, one source after another."""
        done = []
        for cut in await self.cuts():
            if dry_run:
                objects, requests = [await self._count(table, cut) for table, *_ in _TABLES]
            else:
                objects, requests = [
                    await self._delete(table, id_column, returned, cut, after_batch)
                    for table, id_column, returned in _TABLES
                ]
            done.append(Pruned(cut, objects, requests))
        return done

    async def _count(self, table: Table, cut: Cut) -> int:
        query = select(func.count()).where(_older(table, cut))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def _delete(
        self,
        table: Table,
        id_column: str,
        returned_column: str,
        cut: Cut,
        after_batch: Callable[[], Awaitable[None]] | None,
    ) -> int:
        key: Column[object] = table.c[id_column]
        batch = select(key).where(_older(table, cut)).limit(self.batch_size).scalar_subquery()
        statement = delete(table).where(key.in_(batch)).returning(table.c[returned_column])
        deleted = 0
        while True:
            async with self.engine.begin() as conn:
                returned = (await conn.execute(statement)).scalars().all()
            count = len(returned)
            deleted += count
            if self.cache is not None and returned_column == "key":
                # Race window: Redis failing here leaves these entries (their objects are
                # gone, so no later round finds their keys); entries with a TTL still expire.
                await self.cache.remove_older(
                    cut.data_source_id, map(str, returned), cut.before.timestamp()
                )
            ROWS_PRUNED.labels(table=table.name).inc(count)
            if count < self.batch_size:
                return deleted
            if after_batch is not None:
                await after_batch()
            await asyncio.sleep(self.pause)


async def _source_ids(conn: AsyncConnection, table: Table) -> list[uuid.UUID]:
    """The distinct source ids of a table, one index probe each (a loose index scan: Postgres
    would otherwise read the whole index to find a handful)."""
    walk = text(
        f"""
        WITH RECURSIVE seen(s) AS (
            SELECT (SELECT data_source_id FROM {table.name} ORDER BY data_source_id LIMIT 1)
            UNION ALL
            SELECT (SELECT data_source_id FROM {table.name} WHERE data_source_id > seen.s
                    ORDER BY data_source_id LIMIT 1)
            FROM seen WHERE seen.s IS NOT NULL
        )
        SELECT s FROM seen WHERE s IS NOT NULL
        """
    ).columns(column("s", Uuid))
    return list((await conn.execute(walk)).scalars().all())


def _older(table: Table, cut: Cut) -> ColumnElement[bool]:
    return and_(table.c.data_source_id == cut.data_source_id, table.c.created_at < cut.before)


async def prune_round(
    pruner: Pruner, redis: RedisClient, lock: str, token: str, interval: float
) -> list[Pruned] | None:
    """Prune if this sidecar takes ``lock`` for ``interval``; None if another sidecar holds it."""
    expiry_ms = max(1, int(interval * 1000))
    if not await call(redis.set(lock, token, nx=True, px=expiry_ms)):
        return None

    async def renew() -> None:
        # Race window: the lock may expire between the GET and the PEXPIRE, and another
        # sidecar take it; both then prune for a while, which deletes nothing twice.
        owner: bytes | str | None = await call(redis.get(lock))
        if owner is not None and reply_bytes(owner) == token.encode():
            await call(redis.pexpire(lock, expiry_ms))

    return await pruner.run(after_batch=renew)


async def prune_in_background(
    pruner: Pruner, redis: RedisClient, lock: str, interval: float
) -> None:
    """A round every ``interval`` (see the module's docstring); runs until cancelled,
    through any Redis or database outage."""
    token = new_id()
    while True:
        try:
            for pruned in await prune_round(pruner, redis, lock, token, interval) or ():
                if pruned.objects or pruned.requests:
                    logger.info(
                        "pruned %s: %d DataObjects and %d audit rows older than %d days",
                        pruned.cut.name,
                        pruned.objects,
                        pruned.requests,
                        pruned.cut.days,
                    )
        except CacheUnavailable as exc:
            logger.warning("no prune this round: Redis unavailable (%s)", exc)
        except Exception:
            # The database away or too slow: the next round tries again.
            logger.exception("prune failed; trying again in %.0f s", interval)
        await asyncio.sleep(interval)
