"""Replay: a key's stored answer as of an instant, or as a run received it, on both databases.

Objects are inserted with chosen ``created_at``; the upstream counts every call, so
"nothing called" is measured, not assumed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.client import AsyncClient, ReplayMiss
from proxy.engine import create_engine, migrate
from proxy.keys import make_cache_key
from proxy.settings import Settings
from proxy.tables import run_data_request
from tests.conftest import Broker
from tests.harness import async_wait_for, insert_objects
from tests.servers import Upstream, serve_in_thread

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@dataclass
class Backend:
    """A broker on one database, and an engine on that database for the test's own rows."""

    broker: Broker
    engine: AsyncEngine


@pytest.fixture(params=["postgresql", "sqlite"])
async def backend(
    request: pytest.FixtureRequest, settings: Settings, db: AsyncEngine, tmp_path: Any
) -> AsyncIterator[Backend]:
    engine, used = db, settings
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'replay.db'}"
        engine = create_engine(url)
        await migrate(engine)
        used = settings.model_copy(update={"database_url": url})
    try:
        with serve_in_thread(create_app(used)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                yield Backend(Broker(base, used, client), engine)
    finally:
        if engine is not db:
            await engine.dispose()


async def bureau(backend: Backend, upstream: Upstream, name: str = "bureau") -> tuple[str, str]:
    """A cached source with one runtime param; its id and upstream path."""
    path = f"/{name}"
    url = upstream.answer(path, b'{"v": "live"}')
    source = await backend.broker.register(
        {
            "name": name,
            "source": {"url": url + "?ssn={{ ssn }}", "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 3600},
            "runtime_params": ["ssn"],
        }
    )
    return source["data_source_id"], path


async def store(engine: AsyncEngine, source_id: str, ssn: str, value: bytes, at: datetime) -> str:
    """A DataObject of ``ssn``'s key, created at ``at``; its id."""
    [object_id] = await insert_objects(engine, uuid.UUID(source_id), [({"ssn": ssn}, value, at)])
    return str(object_id)


async def audit_rows(engine: AsyncEngine, run: uuid.UUID, count: int) -> list[Any] | None:
    """The run's audit rows once there are ``count`` (SQLAlchemy binds the run id per database)."""
    async with engine.connect() as conn:
        query = select(run_data_request).where(run_data_request.c.run_id == run)
        found = list((await conn.execute(query)).all())
    return found if len(found) >= count else None


async def replay(backend: Backend, ssn: str, **replay: Any) -> httpx.Response:
    return await backend.broker.call("bureau", {"ssn": ssn}, replay=replay)


async def test_as_of_answers_the_object_newest_at_that_instant(
    backend: Backend, upstream: Upstream
) -> None:
    sid, path = await bureau(backend, upstream)
    ids = [await store(backend.engine, sid, "1", b'{"v": %d}' % n, T0 + n * HOUR) for n in range(3)]
    other = await store(backend.engine, sid, "2", b'{"v": "other"}', T0 + HOUR / 2)
    cases = [
        (T0.isoformat(), 0),
        ((T0 + HOUR / 2).isoformat(), 0),  # another key's newer object is not this key's
        ((T0 + HOUR + timedelta(microseconds=1)).isoformat(), 1),
        ((T0 + 2 * HOUR - timedelta(microseconds=1)).isoformat(), 1),
        ("2026-01-05T16:00:00+02:00", 2),  # the same instant as T0 + 2 h, another offset
        ("2099-01-01T00:00:00Z", 2),
    ]
    for as_of, n in cases:
        answer = await replay(backend, "1", as_of=as_of)
        assert answer.status_code == 200, (as_of, answer.text)
        body = answer.json()
        assert (body["origin"], body["value"], body["data_object_id"]) == (
            "CACHE",
            {"v": n},
            ids[n],
        )
        assert body["replay"] == {"data_object_created_at": (T0 + n * HOUR).isoformat()}
        assert body["key"] == make_cache_key(uuid.UUID(sid), {"ssn": "1"})
        assert (body["start_time"], body["end_time"], body["error"]) == (None, None, None)
    assert (await replay(backend, "2", as_of=T0.isoformat())).status_code == 404
    answer = (await replay(backend, "2", as_of=(T0 + HOUR).isoformat(), mode="strict")).json()
    assert answer["data_object_id"] == other
    assert upstream.hits(path) == 0


async def test_a_strict_miss_calls_nothing_and_a_hybrid_miss_calls_once(
    backend: Backend, upstream: Upstream
) -> None:
    sid, path = await bureau(backend, upstream)
    await store(backend.engine, sid, "1", b'{"v": 0}', T0)
    before = (T0 - timedelta(seconds=1)).isoformat()

    for strict in ({"as_of": before}, {"as_of": before, "mode": "strict"}):
        missed = await replay(backend, "1", **strict)
        assert missed.status_code == 404
        body = missed.json()
        assert body["error"]["code"] == "REPLAY_MISS"
        assert (body["value"], body["data_object_id"]) == (None, None)
    assert upstream.hits(path) == 0

    # A cached entry of today does not stand in for a past instant: hybrid calls the upstream.
    assert (await backend.broker.call("bureau", {"ssn": "1"})).json()["origin"] == "REQUEST"
    assert upstream.hits(path) == 1
    hybrid = (await replay(backend, "1", as_of=before, mode="hybrid")).json()
    assert (hybrid["origin"], hybrid["value"], hybrid["error"]) == ("REQUEST", {"v": "live"}, None)
    assert "replay" not in hybrid
    assert upstream.hits(path) == 2
    # Found, hybrid answers the stored object and calls nothing.
    found = (await replay(backend, "1", as_of=T0.isoformat(), mode="hybrid")).json()
    assert (found["origin"], found["value"]) == ("CACHE", {"v": 0})
    assert upstream.hits(path) == 2


async def test_run_id_answers_what_that_run_received_after_newer_objects(
    backend: Backend, upstream: Upstream
) -> None:
    sid, path = await bureau(backend, upstream)
    decision = uuid.uuid4()
    then = (await backend.broker.call("bureau", {"ssn": "7"}, run_id=decision)).json()
    assert then["origin"] == "REQUEST"
    await async_wait_for(lambda: audit_rows(backend.engine, decision, 1))
    # The vendor's answer changes; newer objects are stored, one by a fresh pull.
    upstream.answer(path, b'{"v": "changed"}')
    now = (await backend.broker.call("bureau", {"ssn": "7"}, max_age=0)).json()
    assert now["value"] == {"v": "changed"}
    await store(backend.engine, sid, "7", b'{"v": "newest"}', datetime.now(UTC) + HOUR)
    calls = upstream.hits(path)

    again = (await replay(backend, "7", run_id=str(decision))).json()
    assert (again["origin"], again["value"]) == ("CACHE", {"v": "live"})
    assert again["data_object_id"] == then["data_object_id"]
    created = datetime.fromisoformat(again["replay"]["data_object_created_at"])
    assert abs(created.timestamp() - then["end_time"]) < 0.001
    # Another key of the same run, and a run that never asked: nothing it received.
    for ssn, run in (("8", decision), ("7", uuid.uuid4())):
        missed = await replay(backend, ssn, run_id=str(run))
        assert missed.json()["error"]["code"] == "REPLAY_MISS"
    assert upstream.hits(path) == calls


async def test_a_run_received_through_its_audit_row(backend: Backend, upstream: Upstream) -> None:
    """The run's latest row for the key decides, whatever the objects' ages."""
    sid, _ = await bureau(backend, upstream)
    old = await store(backend.engine, sid, "1", b'{"v": 0}', T0)
    new = await store(backend.engine, sid, "1", b'{"v": 1}', T0 + HOUR)
    run = uuid.uuid4()
    async with backend.engine.begin() as conn:
        await conn.execute(
            insert(run_data_request),
            [
                {
                    "run_data_request_id": uuid.uuid4(),
                    "run_id": run,
                    "data_object_id": uuid.UUID(object_id),
                    "data_source_id": uuid.UUID(sid),
                    "data_origin": "REQUEST",
                    "created_at": T0 + timedelta(days=1, minutes=minute),
                }
                for object_id, minute in ((new, 0), (old, 1))
            ],
        )
    answer = (await replay(backend, "1", run_id=str(run))).json()
    assert (answer["data_object_id"], answer["value"]) == (old, {"v": 0})


async def test_every_replayed_request_leaves_an_audit_row(
    backend: Backend, upstream: Upstream
) -> None:
    sid, _ = await bureau(backend, upstream)
    await store(backend.engine, sid, "1", b'{"v": 0}', T0)
    run = uuid.uuid4()
    asks = [
        {"as_of": T0.isoformat()},
        {"as_of": (T0 - HOUR).isoformat()},
        {"as_of": (T0 - HOUR).isoformat(), "mode": "hybrid"},
        {"run_id": str(uuid.uuid4())},
    ]
    for ask in asks:
        await backend.broker.call("bureau", {"ssn": "1"}, run_id=run, replay=ask)
    found = await async_wait_for(lambda: audit_rows(backend.engine, run, len(asks)))
    audit = sorted(
        ((r.replay, r.data_origin, None if r.error is None else r.error["code"]) for r in found),
        key=str,
    )
    assert audit == [
        ("AS_OF", "CACHE", None),
        ("AS_OF", "REQUEST", None),
        ("AS_OF", None, "REPLAY_MISS"),
        ("RUN_ID", None, "REPLAY_MISS"),
    ]


async def test_the_worker_client_types_replays(backend: Backend, upstream: Upstream) -> None:
    """The backtest as a worker writes it: ``Answer.replay`` on a hit, ``ReplayMiss`` raised."""
    sid, path = await bureau(backend, upstream)
    object_id = await store(backend.engine, sid, "1", b'{"v": 0}', T0)
    async with AsyncClient(backend.broker.url) as client:
        answer = await client.request(
            "bureau", {"ssn": "1"}, uuid.uuid4(), replay={"as_of": T0.isoformat(), "mode": "strict"}
        )
        assert (answer.origin, answer.value, answer.data_object_id) == (
            "CACHE",
            {"v": 0},
            object_id,
        )
        assert answer.replay == {"data_object_created_at": T0.isoformat()}
        with pytest.raises(ReplayMiss) as missed:
            await client.request(
                "bureau", {"ssn": "2"}, uuid.uuid4(), replay={"as_of": T0.isoformat()}
            )
    assert (missed.value.code, missed.value.status) == ("REPLAY_MISS", 404)
    assert upstream.hits(path) == 0


async def test_an_erased_key_replays_as_a_miss_never_another_object(
    backend: Backend, upstream: Upstream
) -> None:
    sid, path = await bureau(backend, upstream)
    await store(backend.engine, sid, "1", b'{"v": 0}', T0)
    kept = await store(backend.engine, sid, "2", b'{"v": "kept"}', T0)
    assert (await replay(backend, "1", as_of=T0.isoformat())).status_code == 200
    key = make_cache_key(uuid.UUID(sid), {"ssn": "1"})
    erased = await backend.broker.admin("DELETE", f"/data-sources/{sid}/objects?key={key}")
    assert erased.status_code == 200, erased.text
    missed = await replay(backend, "1", as_of=(T0 + HOUR).isoformat())
    assert missed.json()["error"]["code"] == "REPLAY_MISS"
    other = (await replay(backend, "2", as_of=T0.isoformat())).json()
    assert other["data_object_id"] == kept
    assert upstream.hits(path) == 0
