"""Replay lookups: the stored DataObject a replayed request answers with.

The one read of the database on the broker's request path, and only for
replays: a backtest asks what a key's answer *was*, which Redis no longer
knows. Each lookup is one indexed statement: ``as_of`` walks
``(data_source_id, key, created_at)`` backwards from the instant; ``run_id``
goes through the run's audit rows (indexed by ``run_id``) to the object they
name. An object pruned or erased is not found (its audit row's reference is
cleared), so a replay misses rather than answering another object.

On Postgres the lookup runs on a small asyncpg pool of its own, opened at the
first replay: through SQLAlchemy (pool checkout, ping, execution) a lookup
cost ~1 ms of CPU, on asyncpg directly ~30 µs, and replays run at backtest
rates. SQLite (the embedded default) reads through the engine
(proxy.engine_replays, which alone imports SQLAlchemy); both run the same
query, and the tests run each replay on both.

Objects still in a sidecar's outbox (written within the last flush interval)
are not in the database yet: a replay does not see them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from proxy.database import Database, LazyPool
from proxy.errors import InternalError
from proxy.messages import Replay

logger = logging.getLogger("databroker.replay")


@dataclass(frozen=True, slots=True)
class StoredObject:
    data_object_id: str
    created_at: float
    value: bytes


# proxy.engine_replays' as_of and of_run, as Postgres runs them on the replay pool.
AS_OF_SQL = """
SELECT data_object_id, created_at, value FROM data_object
WHERE data_source_id = $1 AND key = $2 AND created_at <= $3
ORDER BY created_at DESC LIMIT 1
"""
OF_RUN_SQL = """
SELECT o.data_object_id, o.created_at, o.value
FROM run_data_request r JOIN data_object o ON o.data_object_id = r.data_object_id
WHERE r.run_id = $3 AND r.data_source_id = $1 AND o.data_source_id = $1 AND o.key = $2
ORDER BY r.created_at DESC LIMIT 1
"""
POOL_SIZE = 4


def lookup_failed(exc: BaseException) -> InternalError:
    """What either lookup raises when the database fails: never the statement or its values."""
    logger.warning("replay lookup failed: %s", type(exc).__name__)
    return InternalError("a replay reads the database, which failed; retry later")


class Replays(Protocol):
    async def find(
        self, data_source_id: uuid.UUID, key: str, replay: Replay
    ) -> StoredObject | None: ...

    async def close(self) -> None: ...


def replays_for(database: Database) -> Replays:
    if database.pooled:
        return PostgresReplays(database)
    # SQLAlchemy's queries, only for SQLite: its engine serves everything there anyway.
    from proxy.engine_replays import EngineReplays

    return EngineReplays(database.engine)


class _Reader(asyncpg.Connection):  # type: ignore[misc]
    """A replay connection only reads, outside transactions: nothing of its session to reset,
    so none of asyncpg's reset query (a round trip, half a lookup's cost) on its release."""

    async def reset(self, *, timeout: float | None = None) -> None:
        return None


class PostgresReplays:
    """On an asyncpg pool of its own (at most POOL_SIZE connections, opened on demand,
    idle ones closed after a minute), bounded by the database timeouts."""

    def __init__(self, database: Database) -> None:
        self._pool = LazyPool(
            database,
            min_size=0,
            max_size=POOL_SIZE,
            max_inactive_connection_lifetime=60,
            connection_class=_Reader,
        )

    async def find(
        self, data_source_id: uuid.UUID, key: str, replay: Replay
    ) -> StoredObject | None:
        sql, last = (
            (AS_OF_SQL, replay.as_of) if replay.as_of is not None else (OF_RUN_SQL, replay.run_id)
        )
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(sql, data_source_id, key, last)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # OSError: refused, reset; TimeoutError (connect, acquire, command) is one too.
            raise lookup_failed(exc) from exc
        if row is None:
            return None
        return StoredObject(str(row["data_object_id"]), row["created_at"].timestamp(), row["value"])

    async def close(self) -> None:
        await self._pool.close()
