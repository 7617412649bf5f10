"""Erasure end to end, on Postgres with Redis and on the embedded SQLite: after
``DELETE /data-sources/{id}/objects?key=`` (and ``databroker erase``), no byte of the erased
body is in any table, in Redis, in hot entries or in the outbox files (a unique canary is
searched for); the audit rows stay, their object reference cleared and erased_at set."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis as sync_redis
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.app import create_app
from proxy.cache import CacheEntry
from proxy.cli import main
from proxy.engine import create_engine
from proxy.keys import make_cache_key
from proxy.outbox import complete_lines, decode
from proxy.pruner import Pruner
from proxy.services import Services
from proxy.settings import Settings
from proxy.tables import data_source, metadata, run_data_request
from tests.conftest import REDIS_URL, Broker, Over, make_settings
from tests.harness import ADMIN_TOKEN, async_wait_for, clean_env, insert_objects
from tests.servers import Upstream, serve_in_thread

T = TypeVar("T")


class Captured:
    """The application, with the services its lifespan made and the loop they live on: the
    test looks inside them, on that loop."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.state = scope["state"]
            self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    async def run(self, job: Callable[[Services], Awaitable[T]]) -> T:
        """``job(services)`` on the application's loop (its Redis client is bound there)."""
        assert self.loop is not None

        async def call() -> T:
            return await job(self.services)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))

    @property
    def services(self) -> Services:
        found: Services = self.state["services"]
        return found


@dataclass
class Sidecar:
    broker: Broker
    app: Captured


@contextmanager
def sidecar(settings: Settings) -> Iterator[tuple[str, Captured]]:
    app = Captured(create_app(settings))
    with serve_in_thread(app) as url:
        yield url, app


def settings_for(backend: str, pg_url: str, redis_prefix: str, root: Path) -> Settings:
    """A broker whose outbox ships only when asked: the records wait there for the erasure."""
    if backend == "postgresql":
        settings = make_settings(pg_url, redis_prefix, root)
    else:  # the embedded default: SQLite file, in-process Redis
        settings = Settings(
            admin_token=ADMIN_TOKEN,
            secret_key=Fernet.generate_key().decode(),
            data_dir=root / "data",
        )
    return settings.model_copy(update={"outbox_flush_interval": 3600.0})


@pytest.fixture(params=["postgresql", "sqlite"])
async def erasing(
    request: pytest.FixtureRequest, db: AsyncEngine, pg_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[Sidecar, AsyncEngine]]:
    settings = settings_for(request.param, pg_url, redis_prefix, tmp_path)
    with sidecar(settings) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            engine = db
            if request.param == "sqlite":
                engine = create_engine(settings.resolved_database_url)
            yield Sidecar(Broker(url, settings, client), app), engine
            if request.param == "sqlite":
                await engine.dispose()


async def rows_holding(engine: AsyncEngine, canary: str) -> list[str]:
    """Every table row in which the canary appears, as text or as bytes."""
    found = []
    async with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                for value in row:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    if canary.encode() in raw:
                        found.append(f"{table.name}: {row}")
    return found


def outbox_holding(directory: Path, canary: str) -> list[str]:
    """Every outbox file holding the canary, raw or in a journaled DataObject's value."""
    found = []
    for path in directory.glob("*"):
        data = path.read_bytes()
        values = [getattr(decode(line), "value", b"") for line in complete_lines(data)]
        if canary.encode() in data or any(canary.encode() in v for v in values):
            found.append(path.name)
    return found


def redis_holding(services: Services, canary: str) -> list[str]:
    """Every key under the broker's prefix whose string value holds the canary."""
    if services.settings.redis_url is None:
        return []  # the in-process Redis is checked through the cache below
    client = sync_redis.Redis.from_url(REDIS_URL)
    try:
        found = []
        for name in client.scan_iter(match=f"{services.settings.redis_prefix}*"):
            if client.type(name) == b"string" and canary.encode() in (client.get(name) or b""):
                found.append(name.decode())
        return found
    finally:
        client.close()


async def register_subject(broker: Broker, upstream: Upstream, canary: str) -> dict[str, Any]:
    """A cached JSON source whose answer for subject 1 carries the canary."""
    upstream.answer("/people/1", f'{{"name": "{canary}"}}')
    upstream.answer("/people/2", '{"name": "someone else"}')
    return await broker.register(
        {
            "name": "people",
            "source": {"url": f"{upstream.url}/people/{{{{ id }}}}", "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 3600},
        }
    )


async def test_erase_leaves_no_byte_of_the_body_and_keeps_the_audit_rows(
    erasing: tuple[Sidecar, AsyncEngine], upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="databroker")
    side, engine = erasing
    broker, services = side.broker, side.app.services
    canary = f"canary-{uuid.uuid4().hex}"
    source = await register_subject(broker, upstream, canary)
    sid = source["data_source_id"]
    run_id = uuid.uuid4()
    for params in ({"id": "1"}, {"id": "1"}, {"id": "1"}, {"id": "2"}):
        answer = await broker.call("people", params, run_id=run_id)
        assert answer.status_code == 200, answer.text
    key = make_cache_key(sid, {"id": "1"})

    async def cached(services: Services) -> CacheEntry | None:
        return await services.cache.get(uuid.UUID(sid), key)

    async def hot_copy(services: Services) -> CacheEntry | None:
        hot = services.cache.hot
        name = services.cache.layout.cache_entry(uuid.UUID(sid), key)
        return None if hot is None else hot.get(name)

    outbox = services.settings.resolved_outbox_dir
    # Everything is where an erasure must reach: the outbox (not shipped yet), Redis, hot copies.
    assert outbox_holding(outbox, canary)
    assert await side.app.run(cached) is not None
    if services.settings.redis_url is not None:
        assert await side.app.run(hot_copy) is not None

    answer = await broker.admin("DELETE", f"/data-sources/{sid}/objects?key={key}")

    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "data_source_id": sid,
        "key": key,
        "data_objects_erased": 1,
        "audit_rows_marked": 3,
    }
    assert outbox_holding(outbox, canary) == []
    assert await rows_holding(engine, canary) == []
    assert redis_holding(services, canary) == []
    # The erasure is logged, by source and counts: never the key, which stands for the subject.
    assert f"erased 1 DataObjects of data source {sid}; 3 audit rows marked" in caplog.messages
    assert not [m for m in caplog.messages if key in m or canary in m]
    assert await side.app.run(cached) is None
    assert await side.app.run(hot_copy) is None
    async with engine.connect() as conn:
        audit = (
            await conn.execute(select(run_data_request).where(run_data_request.c.run_id == run_id))
        ).all()
    assert len(audit) == 4  # every call still counted
    erased = [row for row in audit if row.erased_at is not None]
    assert len(erased) == 3 and all(row.data_object_id is None for row in erased)
    [kept] = [row for row in audit if row.erased_at is None]
    assert kept.data_object_id is not None  # subject 2's object is not touched
    # A replay of what the run received, or of the key as of now, finds nothing: never
    # another object.
    for replay in ({"run_id": str(run_id)}, {"as_of": datetime.now(UTC).isoformat()}):
        missed = await broker.call("people", {"id": "1"}, replay=replay)
        assert (missed.status_code, missed.json()["error"]["code"]) == (404, "REPLAY_MISS")
    # The next request for subject 1 is a fresh call, not a leftover copy.
    again = await broker.call("people", {"id": "1"})
    assert again.json()["origin"] == "REQUEST"
    assert upstream.hits("/people/1") == 2


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [("", 422, "VALIDATION_ERROR"), ("?key=../x", 422, "VALIDATION_ERROR")],
)
async def test_erase_refuses_what_is_not_a_key(
    shared_broker: Broker, query: str, status: int, code: str
) -> None:
    source = await shared_broker.register(
        {"name": f"keyed-{uuid.uuid4().hex[:8]}", "source": {"url": "http://127.0.0.1:9/"}}
    )
    answer = await shared_broker.admin(
        "DELETE", f"/data-sources/{source['data_source_id']}/objects{query}"
    )
    assert (answer.status_code, answer.json()["code"]) == (status, code)


async def test_erase_is_scoped_to_the_project_and_needs_the_token(shared_broker: Broker) -> None:
    project = uuid.uuid4()
    source = await shared_broker.register(
        {
            "name": f"scoped-{uuid.uuid4().hex[:8]}",
            "source": {"url": "http://127.0.0.1:9/"},
            "project_id": str(project),
        }
    )
    path = f"/data-sources/{source['data_source_id']}/objects?key={'0' * 32}"
    other = await shared_broker.admin("DELETE", path)
    assert (other.status_code, other.json()["code"]) == (404, "NOT_FOUND")
    anonymous = await shared_broker.client.delete(f"{path}&project_id={project}")
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "UNAUTHORIZED")
    mine = await shared_broker.admin("DELETE", f"{path}&project_id={project}")
    assert mine.status_code == 200 and mine.json()["data_objects_erased"] == 0


async def test_an_erasure_reaches_another_sidecars_outbox(
    db: AsyncEngine, pg_url: str, redis_prefix: str, tmp_path: Path, upstream: Upstream
) -> None:
    """Served by B (journaled in B's outbox, not shipped), erased through A: B ships and
    erases too, so the late copy does not come back."""
    settings = [settings_for("postgresql", pg_url, redis_prefix, tmp_path / name) for name in "ab"]
    canary = f"canary-{uuid.uuid4().hex}"
    with sidecar(settings[0]) as (url_a, _), sidecar(settings[1]) as (url_b, app_b):
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=30) as client_a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as client_b,
        ):
            a, b = Broker(url_a, settings[0], client_a), Broker(url_b, settings[1], client_b)
            source = await register_subject(a, upstream, canary)
            await async_wait_for(
                lambda: app_b.services.registry.resolve(None, "people") is not None
            )
            run_id = uuid.uuid4()
            assert (await b.call("people", {"id": "1"}, run_id=run_id)).status_code == 200
            outbox_b = settings[1].resolved_outbox_dir
            assert outbox_holding(outbox_b, canary)
            key = make_cache_key(source["data_source_id"], {"id": "1"})

            answer = await a.admin(
                "DELETE", f"/data-sources/{source['data_source_id']}/objects?key={key}"
            )
            assert answer.status_code == 200, answer.text

            async def b_marked_its_row() -> bool:
                async with db.connect() as conn:
                    query = select(run_data_request.c.erased_at).where(
                        run_data_request.c.run_id == run_id
                    )
                    return (await conn.execute(query)).scalar() is not None

            await async_wait_for(b_marked_its_row, timeout=10)
            assert outbox_holding(outbox_b, canary) == []
            assert await rows_holding(db, canary) == []
            assert redis_holding(app_b.services, canary) == []


async def test_the_erase_command_erases_through_the_admin_api(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    source = await register_subject(broker, upstream, canary)
    assert (await broker.call("people", {"id": "1"})).status_code == 200
    await async_wait_for(lambda: rows_holding(db, canary))
    env = clean_env(admin_token=ADMIN_TOKEN)

    def erase(*args: str) -> Any:
        return CliRunner().invoke(main, ["erase", "--url", broker.url, *args], env=env)

    done = await asyncio.to_thread(erase, "--source", "people", "--params", '{"id": "1"}')
    assert done.exit_code == 0, done.output
    key = make_cache_key(source["data_source_id"], {"id": "1"})
    assert done.output == (
        f"people ({source['data_source_id']}, PUBLISHED): key {key}:"
        " 1 DataObjects erased, 1 audit rows marked erased\n"
    )
    assert await rows_holding(db, canary) == []

    missing = await asyncio.to_thread(erase, "--source", "nobody", "--params", "{}")
    assert missing.exit_code == 1 and "no data source named 'nobody'" in missing.output
    not_object = await asyncio.to_thread(erase, "--source", "people", "--params", "[1]")
    assert not_object.exit_code == 2 and "not a JSON object" in not_object.output
    wrong = await asyncio.to_thread(
        lambda: CliRunner().invoke(
            main,
            ["erase", "--url", broker.url, "--source", "people", "--params", "{}"],
            env=clean_env(admin_token="wrong"),
        )
    )
    assert wrong.exit_code == 1 and "UNAUTHORIZED" in wrong.output
    assert ADMIN_TOKEN not in done.output + missing.output + wrong.output


async def test_a_pruned_object_is_a_replay_miss(
    erasing: tuple[Sidecar, AsyncEngine], upstream: Upstream, over: Over
) -> None:
    """Pruning ages objects out oldest first: a replay at any instant before the cut finds
    nothing rather than an older object."""
    side, engine = erasing
    source = await register_subject(side.broker, upstream, "not a canary")
    sid = uuid.UUID(source["data_source_id"])
    now = datetime.now(UTC)
    aged = [
        ({"id": "1"}, f'{{"age": {days}}}'.encode(), now - timedelta(days=days))
        for days in (40, 35, 20)
    ]
    await insert_objects(engine, sid, aged)
    at = {days: {"as_of": (now - timedelta(days=days - 1)).isoformat()} for days in (40, 35, 20)}

    async def replayed(days: int) -> Any:
        answer = await side.broker.call("people", {"id": "1"}, replay=at[days])
        return answer.json()["value"] if answer.status_code == 200 else answer.json()["error"]

    assert [await replayed(days) for days in (40, 35, 20)] == [
        {"age": 40},
        {"age": 35},
        {"age": 20},
    ]
    async with engine.begin() as conn:
        await conn.execute(
            update(data_source).where(data_source.c.data_source_id == sid).values(retention_days=30)
        )
    [pruned] = await Pruner(over(engine), None).run()
    assert pruned.objects == 2
    assert [(await replayed(days))["code"] for days in (40, 35)] == ["REPLAY_MISS"] * 2
    assert await replayed(20) == {"age": 20}
    assert upstream.hits("/people/1") == 0


def test_an_erasure_on_postgres_loads_no_sqlalchemy(pg_url: str) -> None:
    """Every sidecar repeats an erasure: through SQLAlchemy, one erasure would add its
    ~21 MiB to every sidecar of the fleet (README "Footprint")."""
    erase = f"""
import asyncio, sys, uuid
from datetime import UTC, datetime
from proxy.database import Database
from proxy.erasure import erase_rows

async def main():
    database = Database({pg_url!r})
    try:
        erased = await erase_rows(database, uuid.uuid4(), "k", datetime.now(UTC), [uuid.uuid4()])
    finally:
        await database.close()
    assert erased.audit_rows == 0, erased

asyncio.run(main())
assert "sqlalchemy" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", erase], check=True, timeout=60)
