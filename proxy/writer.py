"""Ships sealed outbox segments to the database in batches, idempotently.

Ids are made in the sidecar, and every insert is ``ON CONFLICT DO NOTHING``:
a segment replayed after a crash between commit and unlink writes nothing
twice. A segment is removed only after its rows are committed. The audit rows
a batch adds are folded into the daily rollup (``proxy.rollup``) in the same
transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from proxy import rollup
from proxy.database import Database
from proxy.metrics import OUTBOX_BACKLOG_BYTES, RECORDS_WRITTEN, WRITE_FAILURES
from proxy.outage import Outage
from proxy.outbox import Outbox, complete

logger = logging.getLogger("databroker.writer")

IDLE_SCAN_INTERVAL = 60.0
"""While this process journals nothing and nothing is pending, the directory is scanned
this often only (not every interval): for what another process sharing it left behind
(a worker killed mid-segment), which its own writer or a restart ships otherwise."""


class Sink(Protocol):
    """Where shipped records go: rows already present are skipped, so replays are harmless."""

    async def write(self, segment: bytes) -> int:
        """Write the complete lines of ``segment``; returns how many records they hold."""
        ...


def sink_for(database: Database, batch_size: int) -> Sink:
    """The database's own way of loading a segment."""
    if database.pooled:
        return PostgresSink(database)
    from proxy.sqlite_sink import SqliteSink

    return SqliteSink(database.engine, batch_size)


class PostgresSink:
    """The journal lines themselves: one ``COPY`` of the segment's bytes into a
    per-session staging table, then one ``INSERT … SELECT … ON CONFLICT DO
    NOTHING`` per table that reads the JSON fields in SQL.

    This process decodes nothing: under hit load, decoding and re-encoding every
    record here cost a fifth of the broker's throughput and was the whole hit p99.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def write(self, segment: bytes) -> int:
        lines = complete(segment)
        if not lines:
            return 0
        async with self.database.connection() as driver, driver.transaction():
            await driver.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (line jsonb) ON COMMIT DELETE ROWS"
            )
            # CSV with delimiter and quote that JSON never holds raw: a line is one field.
            # A memoryview: asyncpg would take bytes for a file path.
            await driver.copy_to_table(
                _STAGE, source=memoryview(lines), format="csv", delimiter="\x02", quote="\x01"
            )
            await driver.execute(_INSERT_OBJECTS)
            await driver.execute(_INSERT_REQUESTS)
        return lines.count(b"\n")


_STAGE = "_stage_journal"
# The journal's field names (proxy.outbox.encode), read in SQL. ``e`` is the error's
# JSON text: as a JSON string it never holds an escape jsonb refuses (\u0000).
_INSERT_OBJECTS = f"""
INSERT INTO data_object (data_object_id, data_source_id, key, value, created_at)
SELECT (line->>'id')::uuid, (line->>'s')::uuid, line->>'k', decode(line->>'v', 'base64'),
       to_timestamp((line->>'c')::float8)
FROM {_STAGE} WHERE line->>'t' = 'o'
ON CONFLICT DO NOTHING
"""
# The rows the insert wrote, and only those, are folded into the daily rollup.
_INSERT_REQUESTS = rollup.fold(
    "postgresql",
    "inserted",
    f"""inserted AS (
INSERT INTO run_data_request (run_data_request_id, run_id, data_object_id,
    data_source_id, data_origin, start_time, end_time, error, created_at,
    cost_amount, cost_currency, replay)
SELECT (line->>'id')::uuid, (line->>'run')::uuid, (line->>'o')::uuid, (line->>'s')::uuid,
       line->>'g', (line->>'st')::float8, (line->>'et')::float8, (line->>'e')::json,
       to_timestamp((line->>'c')::float8),
       (line->>'ca')::numeric, line->>'cc', line->>'rp'
FROM {_STAGE} WHERE line->>'t' = 'r'
ON CONFLICT DO NOTHING
RETURNING *
)""",
)


class OutboxWriter:
    """The background task: seal, claim, ship, remove; on a loop and once more at exit."""

    def __init__(self, outbox: Outbox, sink: Sink, interval: float) -> None:
        self.outbox = outbox
        self.sink = sink
        self.interval = interval
        self.records_written = 0
        self._scanned_backlog = 0
        self._appended_at_scan = 0
        self._flushed_at = -float("inf")
        self._outage = Outage(
            logger,
            "database write failed, records stay in the outbox: %s",
            "database writes resumed; outbox is draining",
        )
        self._stopping = asyncio.Event()
        # One flush at a time: a second one would find the segments the first holds locked
        # and skip them, and return before they are written (an erasure needs them written).
        self._flushing = asyncio.Lock()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass
            if not self.due(time.monotonic()):
                continue
            try:
                await self.flush()
            except Exception:
                # The writer must outlive anything a flush meets (a full disk while
                # scanning, say): a dead writer would leave every record on disk.
                logger.exception("outbox flush failed; retrying at the next interval")

    async def flush(self) -> bool:
        """Ship everything journaled so far; False if the database refused (kept for later)."""
        async with self._flushing:
            self.outbox.seal()
            try:
                return await self._ship()
            finally:
                # Race window: bytes appended during the scan are counted twice until the
                # next scan; the backlog errs on the full side, never the empty one.
                self._appended_at_scan = self.outbox.appended_bytes
                self._scanned_backlog = await asyncio.to_thread(self.outbox.pending_bytes)
                self._flushed_at = time.monotonic()
                OUTBOX_BACKLOG_BYTES.set(self._scanned_backlog)

    def due(self, now: float) -> bool:
        """Whether the loop flushes now (monotonic ``now``): if this process journaled
        anything since the last flush, or that flush's scan found anything pending, or
        IDLE_SCAN_INTERVAL has passed since. An idle sidecar neither seals nor scans."""
        idle = self.outbox.appended_bytes == self._appended_at_scan and self._scanned_backlog == 0
        return not idle or now - self._flushed_at >= IDLE_SCAN_INTERVAL

    @property
    def backlog_bytes(self) -> int:
        """Journaled and not yet committed: the last directory scan plus what was appended since."""
        return self._scanned_backlog + self.outbox.appended_bytes - self._appended_at_scan

    async def _ship(self) -> bool:
        with self.outbox.claim() as paths:
            for path in paths:
                segment = await asyncio.to_thread(path.read_bytes)
                try:
                    written = await self.sink.write(segment)
                except Exception as exc:
                    # Any failure, not only SQLAlchemy's: the COPY path talks to asyncpg
                    # directly, whose errors (a connection dropped mid-COPY) are its own.
                    # The segment stays; the next flush tries again.
                    self._outage.failed(type(exc).__name__)
                    WRITE_FAILURES.inc()
                    return False
                self.outbox.remove(path)
                self.records_written += written
                RECORDS_WRITTEN.inc(written)
        self._outage.recovered()
        return True

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
