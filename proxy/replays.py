"""Replay lookups: the stored DataObject a replayed request answers with.

The one read of the database on the broker's request path, and only for
replays: a backtest asks what a key's answer *was*, which Redis no longer
knows. Each lookup is one indexed statement: ``as_of`` walks
``(data_source_id, key, created_at)`` backwards from the instant; ``run_id``
goes through the run's audit rows (indexed by ``run_id``) to the object they
name. An object pruned or erased is not found (its audit row's reference is
cleared), so a replay misses rather than answering another object.

Objects still in a sidecar's outbox (written within the last flush interval)
are not in the database yet: a replay does not see them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeAlias

from sqlalchemy import Select, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.errors import InternalError
from proxy.messages import Replay
from proxy.tables import DataObject, RunDataRequest

logger = logging.getLogger("databroker.replay")


if TYPE_CHECKING:
    # Only for mypy: SQLAlchemy 2.0 (our floor) types Select by one tuple, 2.1 by columns.
    Found: TypeAlias = Select[uuid.UUID, datetime, bytes]


@dataclass(frozen=True, slots=True)
class StoredObject:
    data_object_id: str
    created_at: float
    value: bytes


def as_of(data_source_id: uuid.UUID, key: str, instant: datetime) -> Found:
    """The key's newest object created at or before ``instant``."""
    return (
        select(DataObject.data_object_id, DataObject.created_at, DataObject.value)
        .where(
            DataObject.data_source_id == data_source_id,
            DataObject.key == key,
            DataObject.created_at <= instant,
        )
        .order_by(DataObject.created_at.desc())
        .limit(1)
    )


def of_run(data_source_id: uuid.UUID, key: str, run_id: uuid.UUID) -> Found:
    """The object the run's latest request for this key received."""
    return (
        select(DataObject.data_object_id, DataObject.created_at, DataObject.value)
        .join(RunDataRequest, RunDataRequest.data_object_id == DataObject.data_object_id)
        .where(
            RunDataRequest.run_id == run_id,
            RunDataRequest.data_source_id == data_source_id,
            DataObject.data_source_id == data_source_id,
            DataObject.key == key,
        )
        .order_by(RunDataRequest.created_at.desc())
        .limit(1)
    )


def _epoch(moment: datetime) -> float:
    # SQLite hands back the naive UTC time it was given.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class Replays:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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
            logger.warning("replay lookup failed: %s", type(exc).__name__)
            raise InternalError("a replay reads the database, which failed; retry later") from exc
        if row is None:
            return None
        return StoredObject(str(row.data_object_id), _epoch(row.created_at), row.value)
