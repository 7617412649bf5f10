"""Objects: a source's DataObjects listed newest first a page at a time, and read formatted,
on Postgres and SQLite, from rows written through the outbox writer's own sink."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.database import Database
from proxy.keys import make_cache_key
from proxy.objects import MAX_LIMIT
from proxy.outbox import DataObjectRecord, encode
from proxy.settings import Settings
from proxy.writer import sink_for
from tests.conftest import Over
from tests.harness import admin_headers, register
from tests.servers import serve_in_thread

T0 = datetime(2026, 3, 15, 12, tzinfo=UTC).timestamp()
PROJECT = uuid.uuid4()


@dataclass
class Served:
    client: httpx.AsyncClient
    database: Database

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(
            path, params={**params, "project_id": str(PROJECT)}, headers=admin_headers()
        )

    async def ok(self, path: str, **params: Any) -> Any:
        answer = await self.get(path, **params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def source(self, response_type: str = "JSON", project: uuid.UUID = PROJECT) -> str:
        spec = {
            "name": f"objects_{uuid.uuid4().hex[:8]}",
            "source": {"url": "http://127.0.0.1:9/x", "response_type": response_type},
            "project_id": str(project),
        }
        return str((await register(self.client, spec, publish=False))["data_source_id"])

    async def store(self, *records: DataObjectRecord) -> None:
        await sink_for(self.database, batch_size=3).write(b"".join(encode(r) for r in records))


@pytest.fixture
async def served(settings: Settings, database: AsyncEngine, over: Over) -> AsyncIterator[Served]:
    """A broker on each database (conftest's ``database``: Postgres, or a migrated SQLite)."""
    url = database.url.render_as_string(hide_password=False)
    with serve_in_thread(create_app(settings.model_copy(update={"database_url": url}))) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            yield Served(client, over(database))


def record(sid: str, created_at: float, value: bytes = b'{"n": 1}', n: int = 0) -> DataObjectRecord:
    key = make_cache_key(uuid.UUID(sid), {"n": n})
    return DataObjectRecord(uuid.uuid4(), uuid.UUID(sid), key, value, created_at)


def newest_first(records: list[DataObjectRecord]) -> list[str]:
    """The order the API must give: created_at descending, ties by id descending."""
    ordered = sorted(records, key=lambda r: (r.created_at, str(r.data_object_id)), reverse=True)
    return [str(r.data_object_id) for r in ordered]


async def test_pages_walk_every_object_newest_first_once(served: Served) -> None:
    sid, other = await served.source(), await served.source()
    # Ties in one microsecond on purpose: a page may end inside them.
    stamps = [T0 + i for i in range(7)] + [T0 + 3.5] * 4
    mine = [record(sid, at, n=i) for i, at in enumerate(stamps)]
    await served.store(*mine, record(other, T0 + 100))

    walked: list[dict[str, Any]] = []
    before: dict[str, str] = {}
    while page := await served.ok(f"/data-sources/{sid}/objects", limit=3, **before):
        assert len(page) <= 3
        walked += page
        before = {"before": page[-1]["data_object_id"]}
    assert [o["data_object_id"] for o in walked] == newest_first(mine)
    by_id = {str(r.data_object_id): r for r in mine}
    for meta in walked:
        assert set(meta) == {"data_object_id", "data_source_id", "key", "created_at"}
        assert meta["data_source_id"] == sid and meta["key"] == by_id[meta["data_object_id"]].key
        created = datetime.fromisoformat(meta["created_at"])
        assert created.utcoffset() is not None
        assert created.timestamp() == pytest.approx(by_id[meta["data_object_id"]].created_at)

    everything = await served.ok(f"/data-sources/{sid}/objects")  # default limit: 100
    assert [o["data_object_id"] for o in everything] == newest_first(mine)


async def test_the_limit_defaults_to_100_and_is_at_most_1000(served: Served) -> None:
    sid = await served.source()
    await served.store(*(record(sid, T0 + i, n=i) for i in range(MAX_LIMIT + 5)))
    path = f"/data-sources/{sid}/objects"
    assert len(await served.ok(path)) == 100
    assert len(await served.ok(path, limit=MAX_LIMIT)) == MAX_LIMIT
    for bad in ("0", str(MAX_LIMIT + 1), "-1", "ten"):
        answer = await served.get(path, limit=bad)
        assert answer.status_code == 422, answer.text
        assert [d["loc"] for d in answer.json()["detail"]] == [["query", "limit"]]


async def test_before_must_name_an_object_of_the_source(served: Served) -> None:
    sid, other = await served.source(), await served.source()
    foreign = record(other, T0)
    await served.store(record(sid, T0), foreign)
    path = f"/data-sources/{sid}/objects"
    for bad in ("not-an-id", str(uuid.uuid4()), str(foreign.data_object_id)):
        answer = await served.get(path, before=bad)
        assert answer.status_code == 422, answer.text
        assert [d["loc"] for d in answer.json()["detail"]] == [["query", "before"]]


@pytest.mark.parametrize(
    ("response_type", "raw", "value"),
    [
        ("JSON", b'{"id": 42, "tags": ["a"]}', {"id": 42, "tags": ["a"]}),
        ("CSV", b"id,name\n1,Ada\n", [{"id": "1", "name": "Ada"}]),
        ("PLAIN_TEXT", b"hello", "hello"),
    ],
)
async def test_an_object_is_read_with_its_value_formatted(
    served: Served, response_type: str, raw: bytes, value: Any
) -> None:
    sid = await served.source(response_type)
    stored = record(sid, T0, raw)
    await served.store(stored)
    oid = str(stored.data_object_id)
    answer = await served.ok(f"/data-sources/{sid}/objects/{oid}")
    assert answer.pop("value") == value
    assert answer == (await served.ok(f"/data-sources/{sid}/objects"))[0]


async def test_a_body_that_never_parsed_reads_as_null_with_its_error(served: Served) -> None:
    sid = await served.source("JSON")
    stored = record(sid, T0, b"<html>not json</html>")
    await served.store(stored)
    answer = await served.ok(f"/data-sources/{sid}/objects/{stored.data_object_id}")
    assert answer["value"] is None and answer["error"]["code"] == "PARSE_ERROR"


async def test_objects_are_found_only_under_their_source_and_project(served: Served) -> None:
    sid, other = await served.source(), await served.source()
    elsewhere = await served.source(project=uuid.uuid4())
    stored = record(sid, T0)
    await served.store(stored, record(elsewhere, T0))
    oid = str(stored.data_object_id)
    for path in (
        f"/data-sources/{other}/objects/{oid}",
        f"/data-sources/{sid}/objects/{uuid.uuid4()}",
        f"/data-sources/{sid}/objects/not-an-id",
        f"/data-sources/{uuid.uuid4()}/objects/{oid}",
        f"/data-sources/{uuid.uuid4()}/objects",
        f"/data-sources/{elsewhere}/objects",  # another project's source: absent here
    ):
        answer = await served.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["code"] == "NOT_FOUND"
    assert await served.ok(f"/data-sources/{other}/objects") == []
    listed = await served.ok(f"/data-sources/{sid}/objects")
    assert [o["data_object_id"] for o in listed] == [oid]
