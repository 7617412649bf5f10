"""The seed's data flow end to end: real broker, Postgres, Redis and upstream."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Broker
from tests.servers import Upstream, async_wait_for


async def rows(db: AsyncEngine, sql: str, **params: object) -> list[dict[str, object]]:
    async with db.connect() as conn:
        result = await conn.execute(text(sql), params)
        return [dict(r._mapping) for r in result]


async def test_miss_then_hit(broker: Broker, upstream: Upstream, db: AsyncEngine) -> None:
    url = upstream.answer("/users/42", b'{"id": "42", "name": "Ada"}')
    source = await broker.register(
        {
            "name": "user_api",
            "source": {"url": url.replace("/42", "/{{ user_id }}"), "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    run_id = uuid.uuid4()
    first = await broker.call("user_api", {"user_id": "42"}, run_id=run_id)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["origin"] == "REQUEST"
    assert body["value"] == {"id": "42", "name": "Ada"}
    assert body["error"] is None
    assert body["start_time"] <= body["end_time"]

    second = await broker.call("user_api", {"user_id": "42"}, run_id=run_id)
    assert second.status_code == 200
    hit = second.json()
    assert hit["origin"] == "CACHE"
    assert hit["value"] == body["value"]
    assert hit["data_object_id"] == body["data_object_id"]
    assert hit["key"] == body["key"]
    assert hit["start_time"] is None and hit["end_time"] is None
    assert upstream.hits("/users/42") == 1

    audit = await async_wait_for(
        lambda: _audit_when(db, run_id, 2), timeout=10
    )
    assert sorted(r["data_origin"] for r in audit) == ["CACHE", "REQUEST"]
    assert {str(r["data_source_id"]) for r in audit} == {source["data_source_id"]}
    objects = await rows(db, "SELECT value, key FROM data_object")
    assert objects == [{"value": b'{"id": "42", "name": "Ada"}', "key": body["key"]}]


async def _audit_when(db: AsyncEngine, run_id: uuid.UUID, count: int) -> list[dict[str, object]] | None:
    found = await rows(db, "SELECT * FROM run_data_request WHERE run_id = :r", r=run_id)
    return found if len(found) >= count else None
