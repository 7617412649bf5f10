"""proxy.source_registry: shared reloads, sources reused when unchanged, and a reload
failure that never turns a committed change into an error (real Postgres and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.database import Database, Row
from proxy.keys import KeyLayout
from proxy.secrets import SecretBox, SecretKeyError
from proxy.source_registry import Registry
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue
from tests.conftest import REDIS_URL, Broker
from tests.harness import BROKER_PATH, async_wait_for, broker_request, register, sidecar_env
from tests.instances import sidecar


class CountingDatabase(Database):
    """The real database, counting the reads a reload makes; ``gate`` holds a read's answer."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def read(self, *statements: str) -> list[list[Row]]:
        self.reads += 1
        read = await super().read(*statements)
        if self.gate is not None:
            await self.gate.wait()
        return read


@pytest.fixture
def box() -> SecretBox:
    return SecretBox([Fernet.generate_key().decode()])


@pytest.fixture
def store(db: AsyncEngine, box: SecretBox) -> SourceStore:
    return SourceStore(db, box)


@pytest.fixture
async def counted(db: AsyncEngine, pg_url: str) -> AsyncIterator[CountingDatabase]:
    database = CountingDatabase(pg_url)
    yield database
    await database.close()


@pytest.fixture
async def registry(
    counted: CountingDatabase, box: SecretBox, redis_prefix: str
) -> AsyncIterator[Registry]:
    redis = Redis.from_url(REDIS_URL)
    yield Registry(counted, box, redis, KeyLayout(redis_prefix))
    await redis.aclose()


def spec(name: str, **fields: Any) -> DataSourceSpec:
    return DataSourceSpec.model_validate(
        {"name": name, "source": {"url": "https://x.example/{{ id }}"}, **fields}
    )


async def create(store: SourceStore, name: str, **fields: Any) -> uuid.UUID:
    return (await store.create(spec(name, **fields), None)).data_source_id


async def test_concurrent_unknown_names_share_one_reload(
    registry: Registry, store: SourceStore, counted: CountingDatabase
) -> None:
    await create(store, "known")
    found = await asyncio.gather(
        *(registry.resolve_fresh(None, name) for name in ["known", *map(str, range(19))])
    )
    assert counted.reads == 1
    assert found[0] is not None and found[0].name == "known"
    assert found[1:] == [None] * 19


async def test_a_caller_that_needs_a_later_change_waits_for_a_later_reload(
    registry: Registry, store: SourceStore, counted: CountingDatabase
) -> None:
    counted.gate = asyncio.Event()
    early = asyncio.create_task(registry.resolve_fresh(None, "late"))
    await async_wait_for(lambda: counted.reads == 1)  # read, answer held: it misses "late"
    await create(store, "late")
    committed = asyncio.create_task(registry.load())  # as after an admin change
    counted.gate.set()
    assert await early is None
    await committed
    assert counted.reads == 2
    assert registry.resolve(None, "late") is not None


async def test_a_change_counted_elsewhere_is_seen_before_its_announcement(
    registry: Registry,
    store: SourceStore,
    box: SecretBox,
    redis_prefix: str,
    counted: CountingDatabase,
) -> None:
    """Another worker created the source and answered; its announcement has not been heard
    here, and this index is under a second old: the change count alone makes this worker
    reload before it answers (before, it answered 404 for up to a second)."""
    redis = Redis.from_url(REDIS_URL)
    try:
        other = Registry(counted, box, redis, KeyLayout(redis_prefix))
        await registry.load()
        await other.changed(await create(store, "fresh"))
        reads = counted.reads
        found = await registry.resolve_fresh(None, "fresh")
        assert found is not None and found.name == "fresh"
        assert counted.reads == reads + 1
        # Nothing new counted: a name still unknown waits for a second-old index, no reload.
        assert await registry.resolve_fresh(None, "nowhere") is None
        assert counted.reads == reads + 1
    finally:
        await redis.aclose()


async def test_the_safety_net_reads_the_database_only_for_a_change_it_missed(
    store: SourceStore, box: SecretBox, redis_prefix: str, counted: CountingDatabase
) -> None:
    redis = Redis.from_url(REDIS_URL)
    try:
        registry = Registry(counted, box, redis, KeyLayout(redis_prefix), full_reload_interval=3600)
        other = Registry(counted, box, redis, KeyLayout(redis_prefix))
        await registry.load()
        reads = counted.reads
        await registry.reload_if_changed()
        assert counted.reads == reads  # nothing counted since: one GET, no database read
        await other.changed(await create(store, "missed"))  # its announcement not heard here
        await registry.reload_if_changed()
        assert registry.resolve(None, "missed") is not None

        uncounted = Registry(counted, box, redis, KeyLayout(redis_prefix), full_reload_interval=0)
        await uncounted.load()
        reads = counted.reads
        await uncounted.reload_if_changed()  # a change nobody counted is read all the same
        assert counted.reads == reads + 1
    finally:
        await redis.aclose()


async def test_a_source_created_on_one_worker_is_served_by_every_worker_at_once(
    pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """``serve --workers 2``: each request on a new connection, so either worker may take it;
    none may answer 404 once the admin answer arrived."""
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=redis_prefix)
    async with sidecar(env, tmp_path, workers=2, max_keepalive_connections=0) as running:
        for round_ in range(5):
            name = f"new-{round_}-{uuid.uuid4().hex[:6]}"
            spec_body = {"name": name, "source": {"url": "https://x.example/{{ id }}"}}
            await register(running.client, spec_body)
            answers = [
                await running.client.post(BROKER_PATH, json=broker_request(name)) for _ in range(10)
            ]
            # Known everywhere: the request lacks the source's parameter, nothing is called.
            assert [a.json()["error"]["code"] for a in answers] == ["MISSING_PARAMS"] * 10


async def test_a_reload_rebuilds_only_what_changed(
    registry: Registry, store: SourceStore, box: SecretBox
) -> None:
    one = await create(store, "one")
    two = await create(store, "two", variables=["KEY"])
    await registry.load()
    first = {name: registry.resolve(None, name) for name in ("one", "two")}
    await registry.load()
    assert all(registry.resolve(None, name) is source for name, source in first.items())

    await store.replace(one, spec("one", description="changed"), None)
    await store.set_variables(two, [VariableValue(name="KEY", value="v1")], None)
    await registry.load()
    rebuilt = {name: registry.resolve(None, name) for name in ("one", "two")}
    assert all(rebuilt[name] is not first[name] for name in first)
    assert rebuilt["two"] is not None and dict(rebuilt["two"].values) == {"KEY": "v1"}

    await store.publish(one, None)
    await registry.load()
    published = registry.resolve(None, "one")
    assert published is not None and published.status == "PUBLISHED"
    assert registry.resolve(None, "two") is rebuilt["two"]


async def undecryptable_variable(store: SourceStore, db: AsyncEngine) -> None:
    """A stored variable written under a key this sidecar does not have."""
    sid = await create(store, "foreign", variables=["KEY"])
    other = SourceStore(db, SecretBox([Fernet.generate_key().decode()]))
    await other.set_variables(sid, [VariableValue(name="KEY", value="elsewhere")], None)


async def test_a_change_is_announced_even_when_the_reload_after_it_fails(
    registry: Registry, store: SourceStore, db: AsyncEngine, redis_prefix: str
) -> None:
    await undecryptable_variable(store, db)
    with pytest.raises(SecretKeyError):
        await registry.load()
    redis = Redis.from_url(REDIS_URL)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(KeyLayout(redis_prefix).registry_channel)
        changed = uuid.uuid4()
        await registry.changed(changed)  # does not raise: the change is committed
        message = await async_wait_for(
            lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        )
    await redis.aclose()
    assert message["data"] == str(changed).encode()


async def test_a_committed_admin_change_answers_200_when_the_reload_fails(
    broker: Broker, db: AsyncEngine
) -> None:
    """A 500 after the commit would make the caller retry, and the retry answer 409."""
    await undecryptable_variable(SourceStore(db, SecretBox([Fernet.generate_key().decode()])), db)
    spec_body = {"name": "committed", "source": {"url": "https://x.example/"}}
    created = await broker.admin("POST", "/data-sources", spec_body)
    assert created.status_code == 200, created.text
    sid = created.json()["data_source_id"]
    assert (await broker.admin("GET", f"/data-sources/{sid}")).status_code == 200
