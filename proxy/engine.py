"""SQLAlchemy's async engine, and the Alembic upgrade that shapes its database.

What works through SQLAlchemy: the admin routes, the commands (``migrate``,
``export``, ``prune``…) and the embedded default's SQLite. A serving process on
Postgres imports this module at its first such use only (``proxy.database``).

Every wait on the database is bounded: connecting by ``connect_timeout``, each
statement by ``command_timeout`` (asyncpg's own defaults are 60 s and none), and
SQLite's wait for a lock by the command timeout too. A database that stops
answering costs a request or a start-up that long, never forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.database import MIGRATIONS

if TYPE_CHECKING:
    from alembic.config import Config


def create_engine(
    url: str, connect_timeout: float = 5.0, command_timeout: float | None = 10.0
) -> AsyncEngine:
    """``command_timeout=None`` for migrations only: a long index build is not a hang."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # sqlite3's ``timeout`` is how long a statement waits for another writer's lock.
        busy = command_timeout if command_timeout is not None else 3600.0
        engine = create_async_engine(url, connect_args={"timeout": busy})
        # WAL lets the admin routes read while the outbox writer commits.
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_pre_ping=True,
        # Waiting for a pooled connection is bounded like making one.
        pool_timeout=connect_timeout,
        connect_args={"timeout": connect_timeout, "command_timeout": command_timeout},
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    # Alembic (and Mako) only here, where a database is migrated: 8 MiB and ~0.4 s of
    # start-up a production sidecar, which only checks the revision, never uses.
    from alembic import command

    command.upgrade(_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every migration; safe to run on each start (a no-op when current)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
