"""The tables the code maps (``proxy.tables``) are the tables the migrations make.

Alembic compares the models with a database migrated by ``proxy.engine.migrate``:
no table, column, type, nullability, index or constraint may differ, on Postgres
and on SQLite (the embedded default). A column added to a model without its
migration, or the other way round, fails here before it fails in production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.database import MIGRATIONS, Database, check_schema, revisions
from proxy.engine import create_engine, migrate
from proxy.errors import StartupError
from proxy.tables import metadata


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


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


def test_the_revisions_read_without_alembic_are_alembics() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    known = frozenset(r.revision for r in script.walk_revisions())
    assert revisions() == (known, frozenset(script.get_heads()))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (None, None),
        ("UPDATE alembic_version SET version_num = '0001'", "at revision 0001, older than"),
        ("UPDATE alembic_version SET version_num = 'from-a-newer-release'", None),
        ("DELETE FROM alembic_version", "no databroker tables"),
        ("DROP TABLE alembic_version", "no databroker tables"),
    ],
    ids=["head", "older", "newer", "empty", "none"],
)
async def test_the_schema_check_reads_the_revision_without_alembic(
    tmp_path: Path, change: str | None, problem: str | None
) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'embedded.db'}")
    try:
        await migrate(database.engine)
        if change is not None:
            async with database.engine.begin() as connection:
                await connection.execute(text(change))
        if problem is None:
            await check_schema(database)
        else:
            with pytest.raises(StartupError, match=problem) as refused:
                await check_schema(database)
            assert "run `databroker migrate`" in str(refused.value)
    finally:
        await database.close()
