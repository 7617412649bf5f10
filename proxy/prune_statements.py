"""The pruner's counts and batched deletes (proxy.pruner), as SQLAlchemy Core statements.

Imported only by a pruner with a cut to prune: a fleet that keeps every row never
loads SQLAlchemy for pruning (README "Footprint"). A batch is chosen by the
(source, created_at) indexes and deleted by primary key, the same statement on
both databases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, ColumnElement, Table, and_, delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.retention import Cut
from proxy.tables import data_object, run_data_request


@dataclass(frozen=True, slots=True)
class Prunable:
    """A table whose rows age out: its primary key, and what a delete returns (an object's
    cache key, whose entry may outlive it; an audit row's id, only counted)."""

    engine: AsyncEngine
    table: Table
    id_column: str
    returned_column: str

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def returns_keys(self) -> bool:
        """Whether a delete returns cache keys."""
        return self.returned_column == "key"

    def _older(self, cut: Cut) -> ColumnElement[bool]:
        return and_(
            self.table.c.data_source_id == cut.data_source_id,
            self.table.c.created_at < cut.before,
        )

    async def count(self, cut: Cut) -> int:
        query = select(func.count()).where(self._older(cut))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def delete_batch(self, cut: Cut, size: int) -> list[Any]:
        """Up to ``size`` of the cut's rows deleted in one transaction; what each returned."""
        key: Column[object] = self.table.c[self.id_column]
        batch = select(key).where(self._older(cut)).limit(size).scalar_subquery()
        statement = (
            delete(self.table).where(key.in_(batch)).returning(self.table.c[self.returned_column])
        )
        async with self.engine.begin() as conn:
            return list((await conn.execute(statement)).scalars().all())


def prunables(engine: AsyncEngine) -> tuple[Prunable, Prunable]:
    """The DataObjects, then the audit rows."""
    return (
        Prunable(engine, data_object, "data_object_id", "key"),
        Prunable(engine, run_data_request, "run_data_request_id", "run_data_request_id"),
    )
