"""The seed's data flow end to end: real broker, Postgres, Redis and upstream."""

from __future__ import annotations

import uuid

import pytest
import redis as sync_redis
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.logs import CURRENT
from tests.conftest import REDIS_URL, Broker
from tests.harness import async_wait_for, wait_for
from tests.servers import Upstream


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

    audit = await async_wait_for(lambda: _audit_when(db, run_id, 2), timeout=10)
    assert sorted(r["data_origin"] for r in audit) == ["CACHE", "REQUEST"]
    assert {str(r["data_source_id"]) for r in audit} == {source["data_source_id"]}
    objects = await rows(db, "SELECT value, key FROM data_object")
    assert objects == [{"value": b'{"id": "42", "name": "Ada"}', "key": body["key"]}]


async def _audit_when(
    db: AsyncEngine, run_id: uuid.UUID, count: int
) -> list[dict[str, object]] | None:
    found = await rows(db, "SELECT * FROM run_data_request WHERE run_id = :r", r=run_id)
    return found if len(found) >= count else None


async def test_caching_disabled_never_reads_or_writes_redis(
    broker: Broker, upstream: Upstream, redis_prefix: str
) -> None:
    url = upstream.answer("/plain", "hello", content_type="text/plain")
    await broker.register({"name": "plain", "source": {"url": url}})
    origins = [(await broker.call("plain")).json()["origin"] for _ in range(2)]
    assert origins == ["REQUEST", "REQUEST"]
    assert upstream.hits("/plain") == 2
    keys = sync_redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}cache:*")
    assert keys == []


async def test_hit_reads_no_database_and_calls_no_upstream(
    broker: Broker, upstream: Upstream
) -> None:
    url = upstream.answer("/score", b'{"score": 710}')
    await broker.register(
        {
            "name": "score",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    assert (await broker.call("score")).json()["origin"] == "REQUEST"
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        # Only what a request runs: the background (registry follower, readiness checks,
        # pruner, writer) may use the database meanwhile.
        if CURRENT.get() is not None:
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        hits = [await broker.call("score") for _ in range(20)]
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert {h.json()["origin"] for h in hits} == {"CACHE"}
    assert upstream.hits("/score") == 1
    # A request journals; nothing it runs may read.
    assert [s for s in statements if not s.lstrip().upper().startswith("INSERT")] == []


async def test_ttl_is_native_redis_expiry(
    broker: Broker, upstream: Upstream, redis_prefix: str
) -> None:
    url = upstream.answer("/ttl", b"[1]")
    source = await broker.register(
        {
            "name": "ttl",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 1},
        }
    )
    first = (await broker.call("ttl")).json()
    redis = sync_redis.Redis.from_url(REDIS_URL)
    key = f"{redis_prefix}cache:{source['data_source_id']}:{first['key']}"
    assert 0 < redis.pttl(key) <= 1000
    wait_for(lambda: not redis.exists(key), timeout=5)
    assert (await broker.call("ttl")).json()["origin"] == "REQUEST"
    assert upstream.hits("/ttl") == 2


FORMATS = [
    ("JSON", "application/json", b'{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}),
    (
        "XML",
        "application/xml",
        b'<r><score band="A">710</score><flag>x</flag><flag>y</flag></r>',
        {"score": {"band": "A", "text": "710"}, "flag": ["x", "y"]},
    ),
    (
        "CSV",
        "text/csv",
        b"id,name\n1,Ada\n2,Grace\n",
        [{"id": "1", "name": "Ada"}, {"id": "2", "name": "Grace"}],
    ),
    ("PLAIN_TEXT", "text/plain; charset=iso-8859-1", "café".encode("latin-1"), "café"),
]


@pytest.mark.parametrize(("response_type", "content_type", "body", "value"), FORMATS)
async def test_formats_end_to_end(
    broker: Broker,
    upstream: Upstream,
    response_type: str,
    content_type: str,
    body: bytes,
    value: object,
) -> None:
    url = upstream.answer("/f", body, content_type=content_type)
    await broker.register(
        {
            "name": "f",
            "source": {"url": url, "response_type": response_type},
            "caching": {"enabled": True},
        }
    )
    answers = [(await broker.call("f")).json() for _ in range(2)]
    assert [a["origin"] for a in answers] == ["REQUEST", "CACHE"]
    assert answers[0]["value"] == answers[1]["value"] == value


async def test_every_resolved_request_is_audited_once(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    url = upstream.answer("/a/1", b'{"ok": true}')
    upstream.answer("/a/2", b"down", status=503)
    await broker.register(
        {
            "name": "audited",
            "source": {"url": url.rsplit("/", 1)[0] + "/{{ n }}", "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    run_id = uuid.uuid4()
    codes = [
        (await broker.call("audited", {"n": n}, run_id=run_id)).status_code for n in ("1", "1", "2")
    ]
    codes.append((await broker.call("audited", {}, run_id=run_id)).status_code)
    codes.append((await broker.call("no_such_source", {}, run_id=run_id)).status_code)
    assert codes == [200, 200, 502, 400, 404]
    found = await async_wait_for(lambda: _audit_when(db, run_id, 4))
    assert len(found) == 4  # the unknown source resolved nothing: no row
    by_code = sorted((r["data_origin"] or "", (r["error"] or {}).get("code", "")) for r in found)
    assert by_code == [
        ("", "MISSING_PARAMS"),
        ("CACHE", ""),
        ("REQUEST", ""),
        ("REQUEST", "HTTP_ERROR"),
    ]
