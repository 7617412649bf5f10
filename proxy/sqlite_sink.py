"""The embedded default's outbox sink: records decoded here, then multi-row inserts.

SQLite has no ``COPY`` and no ``RETURNING`` of an upsert's own rows, so the audit
rows a batch adds to the rollup are the ids not present before (``_present``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Table, Uuid, bindparam, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy import rollup
from proxy.outbox import DataObjectRecord, Record, RunDataRequestRecord, complete_lines, decode
from proxy.tables import data_object, run_data_request

# Lines decoded between two yields to the event loop.
YIELD_EVERY = 256
_T = TypeVar("_T")


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class SqliteSink:
    """The embedded default's: records decoded here, then multi-row inserts of ``batch_size``."""

    def __init__(self, engine: AsyncEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size

    async def write(self, segment: bytes) -> int:
        records = await _decode(segment)
        objects = [r for r in records if isinstance(r, DataObjectRecord)]
        requests = [r for r in records if isinstance(r, RunDataRequestRecord)]
        async with self.engine.begin() as conn:
            # Objects first: the transaction holds SQLite's write lock before it reads.
            await self._insert(conn, data_object, objects, DataObjectRecord)
            ids = [uuid.UUID(str(r.run_data_request_id)) for r in requests]
            present = await self._present(conn, ids)
            await self._insert(conn, run_data_request, requests, RunDataRequestRecord)
            fresh = [i for i in ids if i not in present]
            for chunk in self._chunks(fresh):
                await conn.execute(_FOLD_FRESH, {"ids": chunk})
        return len(records)

    def _chunks(self, items: Sequence[_T]) -> Iterator[Sequence[_T]]:
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    async def _insert(
        self, conn: AsyncConnection, table: Table, rows: Sequence[Record], kind: type[Record]
    ) -> None:
        # The columns a record carries; others (erased_at) start as NULL.
        columns = [c.name for c in table.columns if c.name in kind.__slots__]
        for chunk in self._chunks(rows):
            stmt = sqlite.insert(table).on_conflict_do_nothing()
            await conn.execute(
                stmt, [dict(zip(columns, _values(r, columns), strict=True)) for r in chunk]
            )

    async def _present(self, conn: AsyncConnection, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of ``ids`` are already written: a replayed segment's rows are not folded again."""
        column = run_data_request.c.run_data_request_id
        present: set[uuid.UUID] = set()
        for chunk in self._chunks(ids):
            present.update((await conn.execute(select(column).where(column.in_(chunk)))).scalars())
        return present


_FOLD_FRESH = text(
    rollup.fold(
        "sqlite",
        "inserted",
        "inserted AS (SELECT * FROM run_data_request WHERE run_data_request_id IN :ids)",
    )
).bindparams(bindparam("ids", expanding=True, type_=Uuid))


def _values(record: Record, columns: list[str]) -> tuple[Any, ...]:
    """A record's row in column order: records name their fields after the columns.

    ``error`` stays a Python value (None is SQL NULL: "error IS NULL" finds the
    successes); ``created_at`` becomes a timestamp, ``cost_amount`` a Decimal.
    """
    return tuple(_value(record, column) for column in columns)


def _value(record: Record, column: str) -> Any:
    value = getattr(record, column)
    if column == "created_at":
        return _ts(value)
    if column == "cost_amount" and value is not None:
        return Decimal(value)
    return value


async def _decode(data: bytes) -> list[Record]:
    """A segment's records, decoded on the event loop a chunk at a time.

    Not in a thread: decoding is pure Python, and a thread holding the GIL stalls
    the loop for whole switch intervals (5 ms), which is the hit path's tail.
    """
    lines = complete_lines(data)
    records: list[Record] = []
    for start in range(0, len(lines), YIELD_EVERY):
        records.extend(decode(line) for line in lines[start : start + YIELD_EVERY])
        await asyncio.sleep(0)
    return records
