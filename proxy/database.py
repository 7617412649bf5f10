"""The one async database engine, the Alembic upgrade that shapes it, and the check that it did.

Every wait on the database is bounded: connecting by ``connect_timeout``, each
statement by ``command_timeout`` (asyncpg's own defaults are 60 s and none), and
SQLite's wait for a lock by the command timeout too. A database that stops
answering costs a request or a start-up that long, never forever.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.errors import StartupError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATE_HINT = "run `databroker migrate`"
# Alembic's own table and the assignments of its migration files.
VERSION_TABLE = "alembic_version"
_REVISION = re.compile(r'^revision = "([^"]+)"$', re.MULTILINE)
_DOWN_REVISION = re.compile(r'^down_revision = (?:None|"([^"]+)")$', re.MULTILINE)


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


@cache
def revisions() -> tuple[frozenset[str], frozenset[str]]:
    """Every revision this release's migrations know, and the heads among them: read
    from the files' own ``revision``/``down_revision`` lines, without Alembic
    (tests/test_migrations.py checks that Alembic reads the same)."""
    known: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        revision, down = _REVISION.search(source), _DOWN_REVISION.search(source)
        if revision is None or down is None:
            raise RuntimeError(f"{path.name}: no revision/down_revision line this module reads")
        known.add(revision.group(1))
        if down.group(1) is not None:
            parents.add(down.group(1))
    return frozenset(known), frozenset(known - parents)


def _schema_problem(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE):
        return f"the database has no databroker tables: {MIGRATE_HINT}"
    current = set(connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    if not current:
        return f"the database has no databroker tables: {MIGRATE_HINT}"
    known, heads = revisions()
    if current & heads or current - known:
        # At this release's head; or at a revision it does not know: a newer release
        # migrated the database during a rolling deploy. Its migrations keep the old
        # columns, so serve.
        return None
    return (
        f"the database is at revision {', '.join(sorted(current))}, older than this release:"
        f" {MIGRATE_HINT}"
    )


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
