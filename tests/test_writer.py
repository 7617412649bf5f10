"""The sinks (Postgres: COPY; SQLite: multi-row inserts) and OutboxWriter, on real databases."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy import tables
from proxy.database import Database
from proxy.engine import migrate
from proxy.outbox import (
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    DataObjectRecord,
    Outbox,
    Record,
    RunDataRequestRecord,
    encode,
)
from proxy.sqlite_sink import SqliteSink
from proxy.writer import IDLE_SCAN_INTERVAL, OutboxWriter, PostgresSink, sink_for
from tests.conftest import Over
from tests.harness import async_wait_for, free_port

SOURCE = uuid.UUID("00000000-0000-4000-8000-000000000007")
VALUE = b'{"a": "line one\nline two"}\r\n\x00\xff\xfe\x80 not utf-8'
ERROR: dict[str, Any] = {
    "code": "HTTP_ERROR",
    "message": "upstream answered 503 — ünïcode",
    "upstream_status": 503,
    "details": {"nested": [1, 2.5, None, True]},
}


def data_object(value: bytes = VALUE, created_at: float = 1_700_000_000.25) -> DataObjectRecord:
    return DataObjectRecord(
        uuid.uuid4(), SOURCE, "0123456789abcdef0123456789abcdef", value, created_at
    )


def success(obj: DataObjectRecord, origin: str = "REQUEST") -> RunDataRequestRecord:
    return RunDataRequestRecord(
        run_data_request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        data_object_id=obj.data_object_id,
        data_source_id=SOURCE,
        data_origin=origin,
        start_time=1_700_000_000.123456789,
        end_time=1_700_000_000.987654321,
        error=None,
        created_at=1_700_000_001.5,
    )


def failure() -> RunDataRequestRecord:
    return RunDataRequestRecord(
        run_data_request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        data_object_id=None,
        data_source_id=SOURCE,
        data_origin=None,
        start_time=None,
        end_time=None,
        error=ERROR,
        created_at=1_700_000_002.75,
    )


def batch(pairs: int) -> list[Record]:
    records: list[Record] = []
    for i in range(pairs):
        obj = data_object(f"value {i}".encode())
        records += [obj, success(obj)]
    return records


def _row(mapping: Any) -> dict[str, Any]:
    """A row, its timestamp in UTC: SQLite hands back the stored UTC time without a zone."""
    row = dict(mapping)
    if row["created_at"].tzinfo is None:
        row["created_at"] = row["created_at"].replace(tzinfo=UTC)
    return row


async def objects(db: AsyncEngine) -> dict[uuid.UUID, dict[str, Any]]:
    async with db.connect() as conn:
        result = await conn.execute(select(tables.data_object))
        return {r.data_object_id: _row(r._mapping) for r in result}


async def requests(db: AsyncEngine) -> dict[uuid.UUID, dict[str, Any]]:
    async with db.connect() as conn:
        result = await conn.execute(select(tables.run_data_request))
        return {r.run_data_request_id: _row(r._mapping) for r in result}


async def count(db: AsyncEngine, table: str) -> int:
    async with db.connect() as conn:
        found: int = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
        return found


def segments(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def journal(records: Sequence[Record]) -> bytes:
    """Records as the outbox journals them: what the sink ships."""
    return b"".join(encode(r) for r in records)


def unreachable() -> Database:
    return Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")


def test_each_database_gets_its_own_sink(tmp_path: Path) -> None:
    postgres = Database("postgresql+asyncpg://x@127.0.0.1/x")
    sqlite = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert isinstance(sink_for(postgres, 10), PostgresSink)
    assert isinstance(sink_for(sqlite, 10), SqliteSink)


async def test_sink_writes_exact_values(database: AsyncEngine, over: Over) -> None:
    db = database
    obj = data_object()
    ok = replace(success(obj), cost_amount="0.35", cost_currency="USD")
    failed, hit = failure(), replace(success(obj, "CACHE"), replay="AS_OF")

    await sink_for(over(db), batch_size=1000).write(journal([obj, ok, failed, hit]))

    assert await objects(db) == {
        obj.data_object_id: {
            "data_object_id": obj.data_object_id,
            "data_source_id": SOURCE,
            "key": obj.key,
            "value": VALUE,
            "created_at": datetime.fromtimestamp(obj.created_at, UTC),
        }
    }
    rows = await requests(db)
    assert set(rows) == {
        ok.run_data_request_id,
        failed.run_data_request_id,
        hit.run_data_request_id,
    }
    for record in (ok, failed, hit):
        assert rows[record.run_data_request_id] == {
            "run_data_request_id": record.run_data_request_id,
            "run_id": record.run_id,
            "data_object_id": record.data_object_id,
            "data_source_id": SOURCE,
            "data_origin": record.data_origin,
            "start_time": record.start_time,
            "end_time": record.end_time,
            "error": record.error,
            "created_at": datetime.fromtimestamp(record.created_at, UTC),
            "cost_amount": None if record.cost_amount is None else Decimal(record.cost_amount),
            "cost_currency": record.cost_currency,
            "replay": record.replay,
            "erased_at": None,
        }


async def test_sqlite_sink_writes_cost_and_replay(tmp_path: Path) -> None:
    """The embedded default's sink carries the same audit fields as the COPY path."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    await migrate(engine)
    obj = data_object()
    paid = replace(success(obj), cost_amount="12.5", cost_currency="EUR")
    replayed = replace(success(obj, "CACHE"), replay="RUN_ID")
    try:
        await SqliteSink(engine, batch_size=1000).write(journal([obj, paid, replayed, failure()]))
        rows = await requests(engine)
    finally:
        await engine.dispose()
    assert (
        rows[paid.run_data_request_id]["cost_amount"],
        rows[paid.run_data_request_id]["cost_currency"],
    ) == (Decimal("12.5"), "EUR")
    assert rows[replayed.run_data_request_id]["replay"] == "RUN_ID"
    assert {r["erased_at"] for r in rows.values()} == {None}


async def test_an_error_holding_any_text_is_written_as_it_was(
    database: AsyncEngine, over: Over
) -> None:
    """Request-supplied text (a parameter name) may hold NUL, quotes, escapes, newlines."""
    db = database
    hostile = {
        "code": "UNKNOWN_PARAMS",
        "message": 'a\x00b "q" \\u0000 \n\x02\x01 é \u2028 🙂',
        "params": ["\x00", "\\", ""],
    }
    record = replace(failure(), error=hostile)
    old_form = replace(failure(), error={"code": "TIMEOUT", "message": "older journal"})
    # Journals written before errors were stored as JSON text held them as objects.
    old_line = encode(old_form).replace(
        orjson.dumps(orjson.dumps(old_form.error).decode()), orjson.dumps(old_form.error)
    )
    assert await sink_for(over(db), batch_size=1000).write(encode(record) + old_line) == 2
    rows = await requests(db)
    assert rows[record.run_data_request_id]["error"] == hostile
    assert rows[old_form.run_data_request_id]["error"] == old_form.error


async def test_success_rows_have_sql_null_error(database: AsyncEngine, over: Over) -> None:
    """``error IS NULL`` tells successes from failures (not a JSON ``null``)."""
    db = database
    obj = data_object()
    await sink_for(over(db), batch_size=1000).write(journal([obj, success(obj), failure()]))
    async with db.connect() as conn:
        result = await conn.execute(
            text("SELECT data_origin, error IS NULL AS ok FROM run_data_request")
        )
        assert sorted((r.data_origin or "", r.ok) for r in result) == [
            ("", False),
            ("REQUEST", True),
        ]


async def test_sink_is_idempotent(database: AsyncEngine, over: Over) -> None:
    db = database
    records = [*batch(3), failure()]
    sink = sink_for(over(db), batch_size=2)

    await sink.write(journal(records))
    first = (await objects(db), await requests(db))
    await sink.write(journal(records))
    await sink.write(journal(records[::-1]))

    assert (await objects(db), await requests(db)) == first
    assert len(first[0]) == 3 and len(first[1]) == 4


async def test_sink_writes_more_than_a_batch(database: AsyncEngine, over: Over) -> None:
    db = database
    records = batch(2_500)
    assert await sink_for(over(db), batch_size=1000).write(journal(records)) == 5_000
    assert await count(db, "data_object") == 2_500
    assert await count(db, "run_data_request") == 2_500
    assert set(await objects(db)) == {
        r.data_object_id for r in records if isinstance(r, DataObjectRecord)
    }


async def test_flush_ships_sealed_segments_and_removes_them(
    db: AsyncEngine, tmp_path: Path, over: Over
) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    writer = OutboxWriter(outbox, PostgresSink(over(db)), interval=60)
    first, second = batch(2), [*batch(1), failure()]
    outbox.append(*first)
    outbox.seal()  # a segment sealed earlier, beside the one flush seals itself
    outbox.append(*second)

    assert await writer.flush() is True

    assert writer.records_written == len(first) + len(second)
    assert await count(db, "data_object") == 3
    assert await count(db, "run_data_request") == 4
    assert [p.suffix for p in segments(tmp_path)] == [OPEN_SUFFIX]  # only the fresh one
    assert await writer.flush() is True
    assert writer.records_written == len(first) + len(second)
    outbox.close()


async def test_unreachable_database_keeps_the_segment(
    db: AsyncEngine, tmp_path: Path, over: Over
) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    down = unreachable()
    writer = OutboxWriter(outbox, PostgresSink(down), interval=60)
    records = [*batch(2), failure()]
    outbox.append(*records)
    try:
        assert await writer.flush() is False
        assert await writer.flush() is False
    finally:
        await down.close()

    kept = [p for p in segments(tmp_path) if p.suffix == SEALED_SUFFIX]
    assert len(kept) == 1
    assert writer.records_written == 0
    assert writer.backlog_bytes == kept[0].stat().st_size
    assert await count(db, "run_data_request") == 0

    writer.sink = PostgresSink(over(db))
    assert await writer.flush() is True

    assert not kept[0].exists()
    assert writer.records_written == len(records)
    assert writer.backlog_bytes == 0
    assert await count(db, "data_object") == 2
    assert await count(db, "run_data_request") == 3
    outbox.close()


async def test_a_segment_replayed_after_commit_writes_nothing_twice(
    db: AsyncEngine, tmp_path: Path, over: Over
) -> None:
    """A crash between commit and unlink: the next process ships the segment again."""
    records = [*batch(2), failure()]
    outbox = Outbox(tmp_path)
    outbox.open()
    outbox.append(*records)
    outbox.close()
    [segment] = segments(tmp_path)
    saved = segment.read_bytes()
    writer = OutboxWriter(Outbox(tmp_path), PostgresSink(over(db)), interval=60)
    assert await writer.flush() is True
    before = (await objects(db), await requests(db))

    segment.write_bytes(saved)
    assert await writer.flush() is True

    assert (await objects(db), await requests(db)) == before
    assert segments(tmp_path) == []


async def test_run_ships_on_its_own_and_stop_ships_the_rest(
    db: AsyncEngine, tmp_path: Path, over: Over
) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    writer = OutboxWriter(outbox, PostgresSink(over(db)), interval=0.02)
    task = asyncio.create_task(writer.run())
    try:
        outbox.append(*batch(2))
        await async_wait_for(lambda: _has(db, "run_data_request", 2))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    outbox.append(*batch(3), failure())

    await writer.stop(timeout=10)

    assert await count(db, "data_object") == 5
    assert await count(db, "run_data_request") == 6
    assert writer.records_written == 4 + 7
    assert segments(tmp_path) == []
    with pytest.raises(RuntimeError):
        outbox.append(failure())  # closed for good


async def test_stop_with_the_database_down_leaves_the_rest_on_disk(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    down = unreachable()
    writer = OutboxWriter(outbox, PostgresSink(down), interval=60)
    outbox.append(*batch(2))
    try:
        await writer.stop(timeout=10)
    finally:
        await down.close()
    assert [p.suffix for p in segments(tmp_path)] == [SEALED_SUFFIX]


class BreaksOnce(PostgresSink):
    """A sink whose first write fails the way a raw driver does: not a SQLAlchemy error."""

    failed = False

    async def write(self, segment: bytes) -> int:
        if not self.failed:
            self.failed = True
            raise asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of COPY")
        return await super().write(segment)


async def test_any_sink_failure_keeps_the_segment_and_the_writer_running(
    db: AsyncEngine, tmp_path: Path, over: Over
) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    sink = BreaksOnce(over(db))
    writer = OutboxWriter(outbox, sink, interval=0.02)
    outbox.append(*batch(2))
    task = asyncio.create_task(writer.run())
    try:
        await async_wait_for(lambda: _has(db, "run_data_request", 2))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sink.failed and writer.records_written == 4
    outbox.close()


async def _has(db: AsyncEngine, table: str, n: int) -> bool:
    return await count(db, table) >= n


class Switchable:
    """A sink that refuses while ``down``, and otherwise counts the lines it is given."""

    down = False

    async def write(self, segment: bytes) -> int:
        if self.down:
            raise OSError("the database is away")
        return segment.count(b"\n")


async def test_an_idle_writer_neither_seals_nor_scans_until_something_is_journaled(
    tmp_path: Path,
) -> None:
    sink, outbox = Switchable(), Outbox(tmp_path)
    writer = OutboxWriter(outbox, sink, interval=0.02)
    outbox.open()
    assert writer.due(time.monotonic())  # never flushed: the directory may hold a past run's
    assert await writer.flush() is True
    now = time.monotonic()
    assert not writer.due(now)
    assert writer.due(now + IDLE_SCAN_INTERVAL)  # another process's leftovers, now and then

    outbox.append(*batch(1))
    assert writer.due(now)
    sink.down = True
    assert await writer.flush() is False  # refused: the segment is pending
    assert writer.due(time.monotonic())  # and retried every interval
    sink.down = False
    assert await writer.flush() is True
    assert not writer.due(time.monotonic())
    outbox.close()
