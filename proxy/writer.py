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
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.metrics import OUTBOX_BACKLOG_BYTES, RECORDS_WRITTEN
from proxy.outbox import DataObjectRecord, Outbox, Record, RunDataRequestRecord, read_segment
from proxy.tables import DataObject, RunDataRequest

logger = logging.getLogger("databroker.writer")


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class DatabaseSink:
    """Writes records with multi-row inserts that skip rows already present."""

    def __init__(self, engine: AsyncEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    async def write(self, records: Sequence[Record]) -> None:
        objects = [_object_row(r) for r in records if isinstance(r, DataObjectRecord)]
        requests = [_request_row(r) for r in records if isinstance(r, RunDataRequestRecord)]
        async with self.engine.begin() as conn:
            for table, rows in ((DataObject, objects), (RunDataRequest, requests)):
                for start in range(0, len(rows), self.batch_size):
                    stmt = self._insert(table).on_conflict_do_nothing()
                    await conn.execute(stmt, rows[start : start + self.batch_size])


def _object_row(r: DataObjectRecord) -> dict[str, Any]:
    return {
        "data_object_id": r.data_object_id,
        "data_source_id": r.data_source_id,
        "key": r.key,
        "value": r.value,
        "created_at": _ts(r.created_at),
    }


def _request_row(r: RunDataRequestRecord) -> dict[str, Any]:
    return {
        "run_data_request_id": r.run_data_request_id,
        "run_id": r.run_id,
        "data_object_id": r.data_object_id,
        "data_source_id": r.data_source_id,
        "data_origin": r.data_origin,
        "start_time": r.start_time,
        "end_time": r.end_time,
        # SQL NULL, not the JSON null a bare None becomes: "error IS NULL" finds the successes.
        "error": r.error,
        "created_at": _ts(r.created_at),
    }


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
            await self.flush()

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
                records = await asyncio.to_thread(read_segment, path)
                try:
                    await self.sink.write(records)
                except (SQLAlchemyError, OSError) as exc:
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
