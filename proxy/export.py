"""Bulk export of a source's DataObjects for backtests: ``databroker export``.

Objects created in [from, to] (UTC days, both inclusive) are read through a
server-side cursor in created_at order (index ``(data_source_id,
created_at)``) and written a batch at a time, so memory stays flat whatever
the range holds. Each object is one JSON line ``{data_object_id, key,
created_at, value}``, ``value`` the raw body formatted by the source's
response_type as the broker answers it; a body that never parsed (kept for
audit) has ``value: null`` and its ``error``. Parquet (one row group per batch)
when pyarrow is installed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_start
from typing import IO, Any, Protocol

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.errors import ParseError
from proxy.formats import format_body
from proxy.objects import Metadata
from proxy.source_rows import spec_of
from proxy.tables import data_object, data_source
from proxy.types import ResponseType

BATCH = 2000


@dataclass(frozen=True, slots=True)
class Row(Metadata):
    """A stored object with its raw body: the admin API's metadata plus the bytes."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Exported:
    """A row as written: ``value_json`` the formatted value, or None with the parse error."""

    data_object_id: str
    key: str
    created_at: datetime
    value_json: bytes | None
    error: dict[str, Any] | None


def day_range(first: date, last: date) -> tuple[datetime, datetime]:
    """[first 00:00 UTC, the day after last 00:00 UTC): both days whole."""
    start = datetime.combine(first, day_start(), UTC)
    return start, datetime.combine(last + timedelta(days=1), day_start(), UTC)


def exported(row: Row, response_type: ResponseType) -> Exported:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    try:
        value_json: bytes | None = format_body(row.value, response_type)
        error = None
    except ParseError as exc:
        value_json, error = None, exc.to_dict()
    return Exported(str(row.data_object_id), row.key, created.astimezone(UTC), value_json, error)


def json_line(item: Exported) -> bytes:
    line: dict[str, Any] = {
        "data_object_id": item.data_object_id,
        "key": item.key,
        "created_at": item.created_at.isoformat(),
        "value": None if item.value_json is None else orjson.Fragment(item.value_json),
    }
    if item.error is not None:
        line["error"] = item.error
    return orjson.dumps(line) + b"\n"


class Writer(Protocol):
    def write(self, batch: Sequence[Exported]) -> None: ...

    def close(self) -> None: ...


class JsonLines:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def write(self, batch: Sequence[Exported]) -> None:
        self.out.write(b"".join(json_line(item) for item in batch))

    def close(self) -> None:
        self.out.flush()


class Parquet:
    """Columns data_object_id, key, created_at (UTC, µs), value (JSON text), error (JSON text)."""

    def __init__(self, out: IO[bytes]) -> None:
        import pyarrow as pa  # optional: only this format needs it
        import pyarrow.parquet as pq

        self._pa = pa
        self.schema = pa.schema(
            [
                ("data_object_id", pa.string()),
                ("key", pa.string()),
                ("created_at", pa.timestamp("us", tz="UTC")),
                ("value", pa.string()),
                ("error", pa.string()),
            ]
        )
        self._writer = pq.ParquetWriter(out, self.schema)

    def write(self, batch: Sequence[Exported]) -> None:
        columns = {
            "data_object_id": [i.data_object_id for i in batch],
            "key": [i.key for i in batch],
            "created_at": [i.created_at for i in batch],
            "value": [None if i.value_json is None else i.value_json.decode() for i in batch],
            "error": [None if i.error is None else orjson.dumps(i.error).decode() for i in batch],
        }
        self._writer.write_table(self._pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self._writer.close()


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Objects written so far, on stderr: redrawn in place on a terminal, else a line every
    ``every`` seconds; always a last line with the count and the rate."""

    def __init__(self, total: int, out: IO[str], every: float = 5.0) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.every = 0.1 if self.tty else every
        self.done = 0
        self.started = self._shown = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            self._show(now, final=False)

    def finish(self) -> None:
        self._show(time.monotonic(), final=True)

    def _show(self, now: float, final: bool) -> None:
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        rate = self.done / max(now - self.started, 1e-9)
        line = f"[{bar:<30}] {self.done}/{self.total} objects ({share:.0%}), {rate:,.0f}/s"
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


@dataclass(frozen=True, slots=True)
class SourceRef:
    data_source_id: uuid.UUID
    response_type: ResponseType


async def find_source(
    engine: AsyncEngine, name: str, project: uuid.UUID | None
) -> SourceRef | None:
    """The project's live source of that name; else its newest archived one (a backtest may
    read a retired source's history)."""
    in_project = (
        data_source.c.project_id.is_(None)
        if project is None
        else data_source.c.project_id == project
    )
    query = (
        select(data_source)
        .where(data_source.c.name == name, in_project)
        .order_by((data_source.c.status == "ARCHIVED").asc(), data_source.c.last_updated_at.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    return SourceRef(row.data_source_id, spec_of(row).source.response_type)


def _range(source: SourceRef, start: datetime, end: datetime) -> Any:
    return (
        data_object.c.data_source_id == source.data_source_id,
        data_object.c.created_at >= start,
        data_object.c.created_at < end,
    )


async def count(engine: AsyncEngine, source: SourceRef, start: datetime, end: datetime) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(select(func.count()).where(*_range(source, start, end)))
    return int(found or 0)


async def rows(
    engine: AsyncEngine, source: SourceRef, start: datetime, end: datetime, batch: int = BATCH
) -> AsyncIterator[list[Row]]:
    """The range's objects in created_at order, ``batch`` at a time from a server-side cursor."""
    query = (
        select(
            data_object.c.data_object_id,
            data_object.c.key,
            data_object.c.created_at,
            data_object.c.value,
        )
        .where(*_range(source, start, end))
        .order_by(data_object.c.created_at)
        .execution_options(yield_per=batch)
    )
    async with engine.connect() as conn:
        result = await conn.stream(query)
        async for partition in result.partitions():
            yield [Row(*r) for r in partition]


async def export(
    engine: AsyncEngine,
    source: SourceRef,
    start: datetime,
    end: datetime,
    writer: Writer,
    progress: Progress | None,
    batch_size: int = BATCH,
) -> int:
    """Write the range's objects; how many."""
    written = 0
    async for batch in rows(engine, source, start, end, batch_size):
        writer.write([exported(row, source.response_type) for row in batch])
        written += len(batch)
        if progress is not None:
            progress.advance(len(batch))
    writer.close()
    if progress is not None:
        progress.finish()
    return written
