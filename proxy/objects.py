"""A source's stored DataObjects, read for the admin API: newest first, a page at a time.

Reads the table the outbox writer fills (Postgres or the embedded SQLite) through the
index ``(data_source_id, created_at)``. A page ends where the next one starts: ``before``
names the last object of the previous page, and ties on ``created_at`` (many objects in
one microsecond) are broken by id, so paging neither skips nor repeats an object.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.tables import data_object

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Metadata:
    data_object_id: uuid.UUID
    key: str
    created_at: datetime


class UnknownCursor(LookupError):
    """``before`` names no object of this source (never stored, erased or pruned)."""


async def page(
    conn: AsyncConnection, data_source_id: uuid.UUID, limit: int, before: uuid.UUID | None
) -> list[Metadata]:
    """Up to ``limit`` objects of the source, newest first, older than ``before`` if given."""
    query = select(data_object.c.data_object_id, data_object.c.key, data_object.c.created_at).where(
        data_object.c.data_source_id == data_source_id
    )
    if before is not None:
        created = await conn.scalar(
            select(data_object.c.created_at).where(
                data_object.c.data_source_id == data_source_id,
                data_object.c.data_object_id == before,
            )
        )
        if created is None:
            raise UnknownCursor(str(before))
        query = query.where(
            or_(
                data_object.c.created_at < created,
                and_(data_object.c.created_at == created, data_object.c.data_object_id < before),
            )
        )
    query = query.order_by(data_object.c.created_at.desc(), data_object.c.data_object_id.desc())
    rows = await conn.execute(query.limit(limit))
    return [Metadata(r.data_object_id, r.key, r.created_at) for r in rows]


async def one(
    conn: AsyncConnection, data_source_id: uuid.UUID, data_object_id: uuid.UUID
) -> tuple[Metadata, bytes] | None:
    """The object and its raw bytes, if the source has it."""
    found = (
        await conn.execute(
            select(data_object.c.key, data_object.c.created_at, data_object.c.value).where(
                data_object.c.data_source_id == data_source_id,
                data_object.c.data_object_id == data_object_id,
            )
        )
    ).first()
    if found is None:
        return None
    return Metadata(data_object_id, found.key, found.created_at), found.value
