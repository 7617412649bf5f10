"""Fixtures on the machine's real Postgres and Redis, and real HTTP upstreams.

Each test session gets a database of its own on the Postgres at 127.0.0.1:5432
(dropped at the end); each test gets a Redis key prefix of its own, removed
after it, and empty tables.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis as sync_redis
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.app import create_app
from proxy.database import migrate
from proxy.settings import Settings
from tests.servers import Upstream, serve_in_thread, upstream_app

# Private PostgreSQL/Redis instances and the sidecar subprocess, for fault tests.
pytest_plugins = ("tests.instances",)

PG_HOST = os.environ.get("DATABROKER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DATABROKER_TEST_PG_PORT", "5432"))
REDIS_URL = os.environ.get("DATABROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token-0123456789"
TABLES = ("run_data_request", "data_object", "data_source_env_var", "data_source")


async def _pg_user() -> str:
    for user in ("postgres", "root"):
        try:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test")
        except (asyncpg.PostgresError, OSError):
            continue
        await conn.close()
        return user
    raise RuntimeError(f"no Postgres reachable at {PG_HOST}:{PG_PORT} as postgres or root")


async def pg_admin(sql: str) -> str:
    """Run ``sql`` on the machine's PostgreSQL (CREATE/DROP DATABASE); returns the user."""
    user = await _pg_user()
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    return user


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"databroker_test_{uuid.uuid4().hex[:10]}"
    user = asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"

    async def upgrade() -> None:
        engine = create_async_engine(url)
        await migrate(engine)
        await engine.dispose()

    asyncio.run(upgrade())
    yield url
    asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The test database, emptied before the test."""
    engine = create_async_engine(pg_url)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    yield engine
    await engine.dispose()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"dbtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    _drop_prefix(prefix)


def _drop_prefix(prefix: str) -> None:
    client = sync_redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[Upstream]:
    state = Upstream()
    with serve_in_thread(upstream_app(state)) as url:
        state.url = url
        yield state


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.handlers.clear()
    upstream_server.received.clear()
    return upstream_server


def make_settings(pg_url: str, redis_prefix: str, root: Path) -> Settings:
    """A test broker's settings: the test database, its own Redis prefix, files under root."""
    return Settings(
        database_url=pg_url,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        admin_token=ADMIN_TOKEN,
        secret_key=Fernet.generate_key().decode(),
        data_dir=root / "data",
        outbox_dir=root / "outbox",
        outbox_flush_interval=0.05,
    )


@pytest.fixture
def settings(pg_url: str, redis_prefix: str, tmp_path: Path) -> Settings:
    return make_settings(pg_url, redis_prefix, tmp_path)


@pytest.fixture(scope="module")
def module_server(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Settings]]:
    """One broker for a whole module, for tests that each make a few requests (a broker per
    test would be most of their time). Its tests name their sources uniquely; no table is
    emptied for them, and its Redis prefix is dropped at the end."""
    prefix = f"dbtest:{uuid.uuid4().hex[:12]}:"
    settings = make_settings(pg_url, prefix, tmp_path_factory.mktemp("module_server"))
    try:
        with serve_in_thread(create_app(settings)) as url:
            yield url, settings
    finally:
        _drop_prefix(prefix)


@dataclass
class Broker:
    """A running broker and clients for it."""

    url: str
    settings: Settings
    client: httpx.AsyncClient

    async def call(
        self, name: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> httpx.Response:
        body = {
            "data_source_name": name,
            "configured_params": params or {},
            "run_id": str(extra.pop("run_id", uuid.uuid4())),
            **extra,
        }
        return await self.client.post("/internal/data-broker", json=body)

    async def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return await self.client.request(method, path, json=body, headers=headers)

    async def register(
        self, spec: dict[str, Any], variables: dict[str, Any] | None = None, publish: bool = True
    ) -> dict[str, Any]:
        """Create a source (and set its variables, and publish it); fails the test on any error."""
        created = await self.admin("POST", "/data-sources", spec)
        assert created.status_code == 200, created.text
        source: dict[str, Any] = created.json()
        sid = source["data_source_id"]
        if variables:
            items = [{"name": k, "value": v} for k, v in variables.items()]
            answer = await self.admin("PUT", f"/data-sources/{sid}/variables", items)
            assert answer.status_code == 200, answer.text
        if publish:
            published = await self.admin("POST", f"/data-sources/{sid}/publish")
            assert published.status_code == 200, published.text
            source = published.json()
        return source


@pytest.fixture
async def shared_broker(module_server: tuple[str, Settings]) -> AsyncIterator[Broker]:
    """The module's broker (``module_server``) with a client of this test's event loop."""
    url, settings = module_server
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield Broker(url, settings, client)


@pytest.fixture
async def broker(settings: Settings, db: AsyncEngine) -> AsyncIterator[Broker]:
    with serve_in_thread(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Broker(url, settings, client)
