"""Replay lookups through SQLAlchemy's engine: the embedded default's SQLite (proxy.replays).

Imported by ``replays_for`` for SQLite only: Postgres runs the same queries as
plain SQL on asyncpg, and a sidecar there never loads SQLAlchemy for replays.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeAlias

from sqlalchemy import Select, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.messages import Replay
from proxy.replays import StoredObject, lookup_failed
from proxy.tables import data_object, run_data_request

if TYPE_CHECKING:
    # Only for mypy: SQLAlchemy 2.0 (our floor) types Select by one tuple, 2.1 by columns.
    Found: TypeAlias = Select[uuid.UUID, datetime, bytes]


def as_of(data_source_id: uuid.UUID, key: str, instant: datetime) -> Found:
    """The key's newest object created at or before ``instant``."""
    return (
        select(data_object.c.data_object_id, data_object.c.created_at, data_object.c.value)
        .where(
            data_object.c.data_source_id == data_source_id,
            data_object.c.key == key,
            data_object.c.created_at <= instant,
        )
        .order_by(data_object.c.created_at.desc())
        .limit(1)
    )


def of_run(data_source_id: uuid.UUID, key: str, run_id: uuid.UUID) -> Found:
    """The object the run's latest request for this key received."""
    return (
        select(data_object.c.data_object_id, data_object.c.created_at, data_object.c.value)
        .join(run_data_request, run_data_request.c.data_object_id == data_object.c.data_object_id)
        .where(
            run_data_request.c.run_id == run_id,
            run_data_request.c.data_source_id == data_source_id,
            data_object.c.data_source_id == data_source_id,
            data_object.c.key == key,
        )
        .order_by(run_data_request.c.created_at.desc())
        .limit(1)
    )


def _epoch(moment: datetime) -> float:
    # SQLite hands back the naive UTC time it was given.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class EngineReplays:
    """Through the SQLAlchemy engine (SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        # One read, no transaction: no BEGIN and ROLLBACK around it.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def find(
        self, data_source_id: uuid.UUID, key: str, replay: Replay
    ) -> StoredObject | None:
        if replay.as_of is not None:
            statement = as_of(data_source_id, key, replay.as_of)
        else:
            assert replay.run_id is not None
            statement = of_run(data_source_id, key, replay.run_id)
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(statement)).first()
        except (SQLAlchemyError, OSError) as exc:
            raise lookup_failed(exc) from exc
        if row is None:
            return None
        return StoredObject(str(row.data_object_id), _epoch(row.created_at), row.value)

    async def close(self) -> None:
        """The engine is the application's: closed by its owner."""
