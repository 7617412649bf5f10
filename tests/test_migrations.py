"""The tables the code maps (``proxy.tables``) are the tables the migrations make.

Alembic compares the models with a database migrated by ``proxy.database.migrate``:
no table, column, type, nullability, index or constraint may differ, on Postgres
and on SQLite (the embedded default). A column added to a model without its
migration, or the other way round, fails here before it fails in production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.database import create_engine, migrate
from proxy.tables import Base


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def differences(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return await connection.run_sync(_differences)


async def test_postgres_tables_match_the_migrations(pg_url: str) -> None:
    engine = create_async_engine(pg_url)  # migrated by the session fixture
    try:
        assert await differences(engine) == []
    finally:
        await engine.dispose()


async def test_sqlite_tables_match_the_migrations(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'embedded.db'}")
    try:
        await migrate(engine)
        assert await differences(engine) == []
    finally:
        await engine.dispose()
