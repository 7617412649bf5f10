"""``databroker export``: a source's DataObjects of whole UTC days, streamed, on both databases."""

from __future__ import annotations

import asyncio
import io
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy import export
from proxy.cli import main
from proxy.engine import create_engine, migrate
from proxy.keys import make_cache_key
from tests.conftest import REDIS_URL
from tests.harness import clean_env, insert_objects, insert_source

DAY = datetime(2026, 1, 5, tzinfo=UTC)
MICRO = timedelta(microseconds=1)


@pytest.fixture(params=["postgresql", "sqlite"])
async def database(
    request: pytest.FixtureRequest, db: AsyncEngine, pg_url: str, tmp_path: Path
) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """An engine on each database and its URL for the command."""
    if request.param == "postgresql":
        yield db, pg_url
        return
    url = f"sqlite+aiosqlite:///{tmp_path / 'export.db'}"
    engine = create_engine(url)
    await migrate(engine)
    yield engine, url
    await engine.dispose()


async def add_source(engine: AsyncEngine, name: str) -> uuid.UUID:
    source = {"url": "http://127.0.0.1/", "response_type": "JSON"}
    return await insert_source(engine, name, DAY, source, runtime_params=["n"])


async def add_objects(
    engine: AsyncEngine, data_source_id: uuid.UUID, objects: list[tuple[datetime, bytes]]
) -> list[uuid.UUID]:
    given = [({"n": str(n)}, value, at) for n, (at, value) in enumerate(objects)]
    return await insert_objects(engine, data_source_id, given)


def run_export(url: str, tmp_path: Path, *args: str) -> tuple[int, bytes, str]:
    """The command's exit code, stdout bytes and stderr."""
    env = clean_env(database_url=url, redis_url=REDIS_URL, data_dir=str(tmp_path))
    done = CliRunner().invoke(main, ["export", *args], env=env)
    return done.exit_code, done.stdout_bytes, done.stderr


def test_days_are_whole_utc_days() -> None:
    assert export.day_range(date(2026, 1, 5), date(2026, 1, 6)) == (
        DAY,
        DAY + timedelta(days=2),
    )


async def test_export_writes_the_objects_of_the_days_in_order(
    database: tuple[AsyncEngine, str], tmp_path: Path
) -> None:
    engine, url = database
    sid = await add_source(engine, "bureau")
    other = await add_source(engine, "other")
    ids = await add_objects(
        engine,
        sid,
        [
            (DAY - MICRO, b'{"v": "before"}'),
            (DAY + timedelta(hours=12), b'{"v": 2}'),
            (DAY, b'{"v": 1}'),
            (DAY + timedelta(days=2) - MICRO, b"not json"),
            (DAY + timedelta(days=2), b'{"v": "after"}'),
        ],
    )
    await add_objects(engine, other, [(DAY, b'{"v": "other source"}')])

    code, out, err = await asyncio.to_thread(
        run_export,
        url,
        tmp_path,
        "--source",
        "bureau",
        "--from",
        "2026-01-05",
        "--to",
        "2026-01-06",
    )
    assert code == 0, err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["data_object_id"] for line in lines] == [str(ids[2]), str(ids[1]), str(ids[3])]
    assert lines[0] == {
        "data_object_id": str(ids[2]),
        "key": make_cache_key(sid, {"n": "2"}),
        "created_at": "2026-01-05T00:00:00+00:00",
        "value": {"v": 1},
    }
    assert lines[2]["created_at"] == "2026-01-06T23:59:59.999999+00:00"
    assert lines[2]["value"] is None and lines[2]["error"]["code"] == "PARSE_ERROR"
    assert err == ""  # stdout is the data and stderr no terminal: no progress bar

    target = tmp_path / "bureau.jsonl"
    code, out, err = await asyncio.to_thread(
        run_export, url, tmp_path, "--source", "bureau", "--from", "2026-01-05",
        "--to", "2026-01-05", "--output", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert out == b""
    assert [orjson.loads(line)["value"] for line in target.read_bytes().splitlines()] == [
        {"v": 1},
        {"v": 2},
    ]
    assert "2/2 objects (100%)" in err


async def test_export_as_parquet(database: tuple[AsyncEngine, str], tmp_path: Path) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")
    engine, url = database
    sid = await add_source(engine, "bureau")
    ids = await add_objects(engine, sid, [(DAY, b'{"v": 1}'), (DAY + MICRO, b"[")])
    target = tmp_path / "bureau.parquet"
    code, _, err = await asyncio.to_thread(
        run_export, url, tmp_path, "--source", "bureau", "--from", "2026-01-05",
        "--to", "2026-01-05", "--format", "parquet", "--output", str(target),
    )  # fmt: skip
    assert code == 0, err
    table = parquet.read_table(target).to_pylist()
    assert [row["data_object_id"] for row in table] == [str(i) for i in ids]
    assert table[0]["created_at"] == DAY and orjson.loads(table[0]["value"]) == {"v": 1}
    assert table[1]["value"] is None and orjson.loads(table[1]["error"])["code"] == "PARSE_ERROR"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nobody", "--from", "2026-01-05", "--to", "2026-01-05"], "no data source"),
        (["--source", "x", "--from", "2026-01-06", "--to", "2026-01-05"], "--to is before"),
        (["--source", "x", "--from", "5 Jan", "--to", "2026-01-05"], "--from"),
    ],
)
async def test_export_refusals(
    database: tuple[AsyncEngine, str], tmp_path: Path, args: list[str], message: str
) -> None:
    _, url = database
    code, _, err = await asyncio.to_thread(run_export, url, tmp_path, *args)
    assert code != 0 and message in err


async def test_export_streams_in_bounded_memory(db: AsyncEngine) -> None:
    """40 MB of objects through batches of 10: the peak is a few batches, not the range."""
    sid = await add_source(db, "big")
    body = b'{"v": "' + b"x" * 40_000 + b'"}'
    for start in range(0, 1000, 200):
        await add_objects(db, sid, [(DAY + timedelta(seconds=start + n), body) for n in range(200)])
    source = await export.find_source(db, "big", None)
    assert source is not None
    start, end = export.day_range(date(2026, 1, 5), date(2026, 1, 5))
    sink = Discard()
    tracemalloc.start()
    try:
        written = await export.export(
            db, source, start, end, export.JsonLines(sink), None, batch_size=10
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == 1000 and sink.size > 1000 * 40_000
    assert peak < 1000 * 40_000 / 4


class Discard(io.RawIOBase):
    """Counts what is written, keeps nothing."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: object) -> int:
        n = len(data)  # type: ignore[arg-type]
        self.size += n
        return n


def test_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = export.Progress(4, out, every=0)
    progress.advance(2)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "2/4 objects (50%)" in lines[0]
    assert lines[1].startswith("[" + "#" * 15 + " " * 15 + "]")
