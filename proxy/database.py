"""The one async database engine, the Alembic upgrade that shapes it, and the check that it did.

Every wait on the database is bounded: connecting by ``connect_timeout``, each
statement by ``command_timeout`` (asyncpg's own defaults are 60 s and none), and
SQLite's wait for a lock by the command timeout too. A database that stops
answering costs a request or a start-up that long, never forever.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.errors import StartupError

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATE_HINT = "run `databroker migrate`"


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
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every migration; safe to run on each start (a no-op when current)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


def _schema_problem(connection: Connection) -> str | None:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return f"the database has no databroker tables: {MIGRATE_HINT}"
    script = ScriptDirectory.from_config(_config())
    if current in script.get_heads():
        return None
    try:
        script.get_revision(current)
    except CommandError:
        # A revision this release does not know: a newer release migrated the database
        # during a rolling deploy. Its migrations keep the old columns, so serve.
        return None
    return f"the database is at revision {current}, older than this release: {MIGRATE_HINT}"


async def check_schema(engine: AsyncEngine) -> None:
    """StartupError unless the database answers and has this release's tables."""
    try:
        async with engine.connect() as connection:
            problem = await connection.run_sync(_schema_problem)
    except Exception as exc:
        raise StartupError(describe(exc)) from exc
    if problem is not None:
        raise StartupError(problem)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away or too slow, rather than refusing a statement."""
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    # OSError: refused, reset, and TimeoutError (asyncpg's connect and command timeouts).
    return isinstance(exc, OSError | sa_exc.TimeoutError)


def describe(exc: BaseException) -> str:
    """One line about a database failure, for an operator: never the URL (it may hold a
    password), never a statement's parameters."""
    if isinstance(exc, TimeoutError | sa_exc.TimeoutError):
        return "the database of DATABROKER_DATABASE_URL did not answer in time"
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return f"cannot reach the database of DATABROKER_DATABASE_URL: {reason}"
    if isinstance(exc, sa_exc.DBAPIError):
        # The driver's own message ('database "x" does not exist', 'password authentication
        # failed for user "y"'), without SQLAlchemy's statement and parameters.
        lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        if lines[0].startswith(("relation ", "no such table")):
            return f"the database has no databroker tables: {MIGRATE_HINT}"
        return f"the database of DATABROKER_DATABASE_URL refused: {lines[0]}"
    return f"database error: {type(exc).__name__}"
