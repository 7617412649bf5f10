"""Fixtures on the machine's real Postgres and Redis, and real HTTP upstreams.

Each test session gets a database of its own on the Postgres at 127.0.0.1:5432
(dropped at the end); each test gets a Redis key prefix of its own, removed
after it, and empty tables.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.app import create_app
from proxy.database import Database
from proxy.engine import create_engine, migrate
from proxy.settings import Settings
from tests.harness import (
    ADMIN_TOKEN,
    BROKER_PATH,
    REDIS_SERVER,
    admin_headers,
    broker_request,
    private_database,
    private_prefix,
    register,
)
from tests.servers import Upstream, serve_in_thread, upstream_app

# Private PostgreSQL/Redis instances and the sidecar subprocess, for fault tests.
pytest_plugins = ("tests.instances",)

PG_HOST = os.environ.get("DATABROKER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DATABROKER_TEST_PG_PORT", "5432"))
REDIS_URL = os.environ.get("DATABROKER_TEST_REDIS_URL", REDIS_SERVER)
TABLES = (
    "run_data_request",
    "run_data_request_daily",
    "data_object",
    "data_source_credential",
    "data_source_env_var",
    "data_source",
)


async def _pg_user() -> str:
    for user in ("postgres", "root"):
        try:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test")
        except (asyncpg.PostgresError, OSError):
            continue
        await conn.close()
        return user
    raise RuntimeError(f"no Postgres reachable at {PG_HOST}:{PG_PORT} as postgres or root")


async def pg_server() -> str:
    """A URL on the machine's PostgreSQL, as a user that may create databases."""
    return f"postgresql+asyncpg://{await _pg_user()}@{PG_HOST}:{PG_PORT}/test"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with private_database(asyncio.run(pg_server())) as url:
        yield url


async def empty_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The test database, emptied before the test."""
    engine = create_async_engine(pg_url)
    await empty_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module", autouse=True)
def _module_starts_on_empty_tables(request: pytest.FixtureRequest) -> None:
    """Each test module that uses the test database starts on empty tables: what another
    module left (variables under a key of its own, rows of specs it wrote by hand) would stop
    the brokers it starts, and which module ran before depends on the order and the worker."""
    module = request.module
    if any(
        getattr(item, "module", None) is module and "pg_url" in getattr(item, "fixturenames", ())
        for item in request.session.items
    ):
        asyncio.run(_emptied(request.getfixturevalue("pg_url")))


@pytest.fixture(params=["postgresql", "sqlite"])
async def database(
    request: pytest.FixtureRequest, db: AsyncEngine, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """Each database the broker runs on: the test Postgres (emptied), a migrated SQLite file."""
    if request.param == "postgresql":
        yield db
        return
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


Over = Callable[[AsyncEngine], Database]
"""``over(engine)``: a ``proxy.database.Database`` of the engine's database."""


@pytest.fixture
async def over() -> AsyncIterator[Over]:
    """What the serving path takes (a ``Database``) of the database a test's engine reaches;
    each closed at the end of the test."""
    made: list[Database] = []

    def database_of(engine: AsyncEngine) -> Database:
        made.append(Database(engine.url.render_as_string(hide_password=False)))
        return made[-1]

    yield database_of
    for database in made:
        await database.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with private_prefix(REDIS_URL) as prefix:
        yield prefix


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
    with private_prefix(REDIS_URL) as prefix:
        settings = make_settings(pg_url, prefix, tmp_path_factory.mktemp("module_server"))
        with serve_in_thread(create_app(settings)) as url:
            yield url, settings


async def _emptied(url: str) -> None:
    engine = create_async_engine(url)
    try:
        await empty_tables(engine)
    finally:
        await engine.dispose()


@dataclass
class Broker:
    """A running broker and clients for it."""

    url: str
    settings: Settings
    client: httpx.AsyncClient

    async def call(
        self, name: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> httpx.Response:
        return await self.client.post(BROKER_PATH, json=broker_request(name, params, **extra))

    async def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.client.request(method, path, json=body, headers=admin_headers())

    async def register(
        self, spec: dict[str, Any], variables: dict[str, Any] | None = None, publish: bool = True
    ) -> dict[str, Any]:
        """Create a source (and set its variables, and publish it); fails the test on any error."""
        return await register(self.client, spec, variables, publish)


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


@pytest.fixture
def spans() -> Iterator[Any]:
    """Traces on, to the SDK's in-memory exporter (yielded) until the test ends."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
