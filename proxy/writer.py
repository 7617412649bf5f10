"""Ships sealed outbox segments to the database in batches, idempotently.

Ids are made in the sidecar, and every insert is ``ON CONFLICT DO NOTHING``:
a segment replayed after a crash between commit and unlink writes nothing
twice. A segment is removed only after its rows are committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from sqlalchemy import Table
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.metrics import OUTBOX_BACKLOG_BYTES, RECORDS_WRITTEN
from proxy.outbox import (
    DataObjectRecord,
    Outbox,
    Record,
    RunDataRequestRecord,
    complete_lines,
    decode,
)
from proxy.tables import DataObject, RunDataRequest

logger = logging.getLogger("databroker.writer")


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class DatabaseSink:
    """Writes records so that rows already present are skipped (replays are harmless).

    Postgres gets a binary ``COPY`` into a per-session staging table, then one
    ``INSERT … SELECT … ON CONFLICT DO NOTHING``: asyncpg encodes the rows in C,
    so a shipment holds the event loop a fraction of what per-row parameter
    binding costs. Other databases get multi-row inserts.
    """

    def __init__(self, engine: AsyncEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._postgres = engine.dialect.name == "postgresql"

    async def write(self, records: Sequence[Record]) -> None:
        objects: list[Record] = [r for r in records if isinstance(r, DataObjectRecord)]
        requests: list[Record] = [r for r in records if isinstance(r, RunDataRequestRecord)]
        tables = ((_DATA_OBJECT, objects), (_RUN_DATA_REQUEST, requests))
        if self._postgres:
            await self._copy(tables)
            return
        async with self.engine.begin() as conn:
            for table, rows in tables:
                columns = [c.name for c in table.columns]
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    stmt = sqlite.insert(table).on_conflict_do_nothing()
                    await conn.execute(
                        stmt, [dict(zip(columns, _values(r, columns), strict=True)) for r in chunk]
                    )

    async def _copy(self, tables: Sequence[tuple[Table, list[Record]]]) -> None:
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection  # the asyncpg connection
            async with driver.transaction():
                for table, records in tables:
                    if not records:
                        continue
                    columns = [c.name for c in table.columns]
                    rows = await _copy_rows(records, columns)
                    stage = f"_stage_{table.name}"
                    await driver.execute(
                        f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name}) "
                        "ON COMMIT DELETE ROWS"
                    )
                    await driver.copy_records_to_table(stage, records=rows, columns=columns)
                    await driver.execute(
                        f"INSERT INTO {table.name} ({', '.join(columns)}) "
                        f"SELECT {', '.join(columns)} FROM {stage} ON CONFLICT DO NOTHING"
                    )


_DATA_OBJECT = cast(Table, DataObject.__table__)
_RUN_DATA_REQUEST = cast(Table, RunDataRequest.__table__)


def _values(record: Record, columns: list[str]) -> tuple[Any, ...]:
    """A record's row in column order: records name their fields after the columns.

    ``error`` stays a Python value (None is SQL NULL: "error IS NULL" finds the
    successes); ``created_at`` becomes a timestamp.
    """
    return tuple(
        _ts(record.created_at) if column == "created_at" else getattr(record, column)
        for column in columns
    )


async def _copy_rows(records: Sequence[Record], columns: list[str]) -> list[tuple[Any, ...]]:
    """Rows as COPY takes them (JSON as text), built a chunk at a time between yields."""
    json_at = columns.index("error") if "error" in columns else None
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(records), DECODE_CHUNK):
        for record in records[start : start + DECODE_CHUNK]:
            row = _values(record, columns)
            if json_at is not None and row[json_at] is not None:
                row = (*row[:json_at], orjson.dumps(row[json_at]).decode(), *row[json_at + 1 :])
            rows.append(row)
        await asyncio.sleep(0)
    return rows


class OutboxWriter:
    """The background task: seal, claim, ship, remove; on a loop and once more at exit."""

    def __init__(self, outbox: Outbox, sink: DatabaseSink, interval: float) -> None:
        self.outbox = outbox
        self.sink = sink
        self.interval = interval
        self.records_written = 0
        self._scanned_backlog = 0
        self._appended_at_scan = 0
        self._failing = False
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception:
                # The writer must outlive anything a flush meets (a full disk while
                # scanning, say): a dead writer would leave every record on disk.
                logger.exception("outbox flush failed; retrying at the next interval")

    async def flush(self) -> bool:
        """Ship everything sealed so far; False if the database refused (kept for later)."""
        self.outbox.seal()
        try:
            return await self._ship()
        finally:
            # Race window: bytes appended during the scan are counted twice until the
            # next scan; the backlog errs on the full side, never the empty one.
            self._appended_at_scan = self.outbox.appended_bytes
            self._scanned_backlog = await asyncio.to_thread(self.outbox.pending_bytes)
            OUTBOX_BACKLOG_BYTES.set(self._scanned_backlog)

    @property
    def backlog_bytes(self) -> int:
        """Journaled and not yet committed: the last directory scan plus what was appended since."""
        return self._scanned_backlog + self.outbox.appended_bytes - self._appended_at_scan

    async def _ship(self) -> bool:
        with self.outbox.claim() as paths:
            for path in paths:
                records = await _decode(await asyncio.to_thread(path.read_bytes))
                try:
                    await self.sink.write(records)
                except Exception as exc:
                    # Any failure, not only SQLAlchemy's: the COPY path talks to asyncpg
                    # directly, whose errors (a connection dropped mid-COPY) are its own.
                    # The segment stays; the next flush tries again.
                    self._report_failure(exc)
                    return False
                self.outbox.remove(path)
                self.records_written += len(records)
                RECORDS_WRITTEN.inc(len(records))
        if self._failing:
            logger.warning("database writes resumed; outbox is draining")
            self._failing = False
        return True

    def _report_failure(self, exc: Exception) -> None:
        # Logged once per outage, not once per flush, so a long outage does not flood the logs.
        if not self._failing:
            logger.warning(
                "database write failed, records stay in the outbox: %s", type(exc).__name__
            )
            self._failing = True

    async def stop(self, timeout: float) -> None:
        """Stop the loop and make a last attempt to ship; what fails stays on disk."""
        self._stopping.set()
        self.outbox.close()
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            logger.warning("outbox not drained within %.1fs; it is replayed on next start", timeout)
        except Exception:
            # Shutdown goes on: what was not shipped is on disk for the next start.
            logger.exception("last outbox flush failed; it is replayed on next start")


DECODE_CHUNK = 256


async def _decode(data: bytes) -> list[Record]:
    """A segment's records, decoded on the event loop a chunk at a time.

    Not in a thread: decoding is pure Python, and a thread holding the GIL stalls
    the loop for whole switch intervals (5 ms), which is the hit path's tail.
    """
    lines = complete_lines(data)
    records: list[Record] = []
    for start in range(0, len(lines), DECODE_CHUNK):
        records.extend(decode(line) for line in lines[start : start + DECODE_CHUNK])
        await asyncio.sleep(0)
    return records
