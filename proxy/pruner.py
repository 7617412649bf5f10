"""Deletes the DataObjects and audit rows older than their source's retention (proxy.retention).

Rows go a batch at a time, each batch its own short transaction followed by a
pause: a long ``DELETE`` would hold SQLite's one write lock (the outbox writer
waits on it, and behind the writer the outbox fills) or, on Postgres, hold
locks and WAL for minutes. The cuts are read with plain SQL (``Database.read``);
the counts and deletes (proxy.prune_statements) load SQLAlchemy only when there
is a cut: a fleet that keeps every row never imports it (README "Footprint").

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
from typing import TYPE_CHECKING, Any

from proxy.cache import CacheUnavailable, RedisCache, RedisClient, call, reply_bytes
from proxy.database import Database
from proxy.metrics import ROWS_PRUNED
from proxy.outbox import new_id
from proxy.retention import Cut, SourceRetention, cuts
from proxy.source_rows import as_uuid

if TYPE_CHECKING:
    from proxy.prune_statements import Prunable

logger = logging.getLogger("databroker.pruner")

DELETED_SOURCE = "(deleted source)"
"""The name a deleted draft's rows are reported under."""

SOURCES = "SELECT data_source_id, name, retention_days FROM data_source"
# The tables whose rows name a source, for the sources a deleted draft left behind.
_SOURCE_NAMING = ("data_object", "run_data_request")


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows of a source's cut went (or, in a dry run, would go)."""

    cut: Cut
    objects: int
    requests: int


class Pruner:
    def __init__(
        self,
        database: Database,
        default_days: int | None,
        batch_size: int = 1000,
        pause: float = 0.05,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache: RedisCache | None = None,
    ) -> None:
        """``cache``: where the entries of pruned objects are deleted too (None: no Redis
        to reach, as for ``prune`` beside the embedded default's in-process one)."""
        self.database = database
        self.cache = cache
        self.default_days = default_days
        self.batch_size = batch_size
        self.pause = pause
        self.clock = clock

    async def cuts(self) -> list[Cut]:
        """Every source's cut now, archived sources included: their rows age too. A deleted
        draft's rows (their source row is gone) take the default retention."""
        walks = [] if self.default_days is None else [_source_ids(t) for t in _SOURCE_NAMING]
        rows, *named = await self.database.read(SOURCES, *walks)
        sources = [
            SourceRetention(_id(r["data_source_id"]), r["name"], r["retention_days"]) for r in rows
        ]
        known = {source.data_source_id for source in sources}
        orphans = {_id(row["s"]) for walked in named for row in walked} - known
        sources += [SourceRetention(orphan, DELETED_SOURCE, None) for orphan in sorted(orphans)]
        return cuts(sources, self.default_days, self.clock())

    async def run(
        self, dry_run: bool = False, after_batch: Callable[[], Awaitable[None]] | None = None
    ) -> list[Pruned]:
        """Prune (or, with ``dry_run``, count) every source's cut, one source after another."""
        found = await self.cuts()
        if not found:
            return []
        # Here, with a cut to prune: SQLAlchemy only in a sidecar that prunes.
        from proxy.prune_statements import prunables

        tables = prunables(self.database.engine)
        done = []
        for cut in found:
            if dry_run:
                objects, requests = [await table.count(cut) for table in tables]
            else:
                objects, requests = [
                    await self._delete(table, cut, after_batch) for table in tables
                ]
            done.append(Pruned(cut, objects, requests))
        return done

    async def _delete(
        self, table: Prunable, cut: Cut, after_batch: Callable[[], Awaitable[None]] | None
    ) -> int:
        deleted = 0
        while True:
            returned = await table.delete_batch(cut, self.batch_size)
            count = len(returned)
            deleted += count
            if self.cache is not None and table.returns_keys:
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


def _source_ids(table: str) -> str:
    """The distinct source ids of a table, one index probe each (a loose index scan: Postgres
    would otherwise read the whole index to find a handful)."""
    return f"""
        WITH RECURSIVE seen(s) AS (
            SELECT (SELECT data_source_id FROM {table} ORDER BY data_source_id LIMIT 1)
            UNION ALL
            SELECT (SELECT data_source_id FROM {table} WHERE data_source_id > seen.s
                    ORDER BY data_source_id LIMIT 1)
            FROM seen WHERE seen.s IS NOT NULL
        )
        SELECT s FROM seen WHERE s IS NOT NULL
        """


def _id(value: Any) -> uuid.UUID:
    """A source id as read (SQLite's is hex text); never NULL: each column read is NOT NULL."""
    found = as_uuid(value)
    assert found is not None
    return found


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
