"""The database of ``DATABROKER_DATABASE_URL`` as one process uses it, and the check that
it holds this release's tables.

On Postgres the serving path — start-up's schema check, the registry's reads, the
outbox writer, readiness — runs on a small asyncpg pool of its own; SQLAlchemy's
engine (``proxy.engine``: admin routes, commands, prune deletes) is made at its
first use. A sidecar that only serves never imports SQLAlchemy, ~20 MiB of RSS
(README "Footprint"). SQLite, the embedded default, goes through the engine for
everything.

Every wait is bounded: connecting and waiting for a pooled connection by
``connect_timeout``, each statement by ``command_timeout``.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from proxy.errors import StartupError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATE_HINT = "run `databroker migrate`"
# Alembic's own table and the assignments of its migration files.
VERSION_TABLE = "alembic_version"
_REVISION = re.compile(r'^revision = "([^"]+)"$', re.MULTILINE)
_DOWN_REVISION = re.compile(r'^down_revision = (?:None|"([^"]+)")$', re.MULTILINE)
POOL_SIZE = 4
"""The serving pool's connections: the writer's, a registry reload's, a prune round's
reads, a readiness check's."""
# What the URL's query says to SQLAlchemy's asyncpg dialect rather than to asyncpg: its
# own statement cache, which is asyncpg's here.
_STATEMENT_CACHE = "prepared_statement_cache_size"
# SQLSTATE classes of a server that is away or overloaded, not refusing a statement:
# connection exception, insufficient resources, operator intervention (shutting down).
_UNAVAILABLE_STATES = ("08", "53", "57")

Row = Mapping[str, Any]


def asyncpg_arguments(url: str) -> tuple[str, dict[str, Any]]:
    """The DSN asyncpg connects to and the keyword arguments it takes, from a SQLAlchemy
    URL: the query's keys are arguments of ``asyncpg.connect`` (``?ssl=require``), as
    SQLAlchemy's asyncpg dialect passes them, so one URL means the same on both paths."""
    parts = urlsplit(url)
    options: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if _STATEMENT_CACHE in options:
        options["statement_cache_size"] = int(options.pop(_STATEMENT_CACHE))
    dsn = urlunsplit(parts._replace(scheme="postgresql", query=""))
    return dsn, options


class LazyPool:
    """An asyncpg pool of ``database`` opened by its first ``acquire``, bounded by the
    database's timeouts: connecting and waiting for a connection by ``connect_timeout``,
    each statement by ``command_timeout``."""

    def __init__(self, database: Database, **options: Any) -> None:
        self._database = database
        self._options = options
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def _opened(self) -> asyncpg.Pool:
        async with self._opening:
            if self._closed:
                raise asyncpg.InterfaceError("the database pool is closed: shutting down")
            if self._pool is None:
                dsn, arguments = asyncpg_arguments(self._database.url)
                self._pool = await asyncpg.create_pool(
                    dsn,
                    timeout=self._database.connect_timeout,
                    command_timeout=self._database.command_timeout,
                    **arguments,
                    **self._options,
                )
            return self._pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        pool = self._pool or await self._opened()
        async with pool.acquire(timeout=self._database.connect_timeout) as connection:
            yield connection

    async def close(self) -> None:
        """Close the pool; one still opening is closed once open, and none opens after."""
        async with self._opening:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class Database:
    """One process's way to the database; ``close`` releases whatever it opened."""

    def __init__(
        self, url: str, connect_timeout: float = 5.0, command_timeout: float | None = 10.0
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.pooled = url.startswith("postgresql")
        """Whether the serving path runs on the asyncpg pool (Postgres) or the engine."""
        # No connection kept while idle: none to keep up (or to log about) while the
        # database is away.
        self._serving = LazyPool(
            self, min_size=0, max_size=POOL_SIZE, max_inactive_connection_lifetime=60
        )

    @cached_property
    def engine(self) -> AsyncEngine:
        """SQLAlchemy's engine, made (and SQLAlchemy imported) at its first use."""
        from proxy.engine import create_engine

        return create_engine(self.url, self.connect_timeout, self.command_timeout)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the serving pool (Postgres only)."""
        async with self._serving.acquire() as connection:
            yield connection

    async def read(self, *statements: str) -> list[list[Row]]:
        """The rows of each statement (none takes parameters), read in one transaction,
        each row a mapping by column name, each value as the driver reads it (JSON as its
        text; on SQLite, a UUID as its hex digits, a timestamp as its text)."""
        if self.pooled:
            async with self.connection() as connection, connection.transaction(readonly=True):
                return [list(await connection.fetch(sql)) for sql in statements]
        async with self.engine.begin() as connection:
            return [
                [dict(row) for row in (await connection.exec_driver_sql(sql)).mappings()]
                for sql in statements
            ]

    async def ping(self) -> None:
        """Raises unless the database answers: a ``SELECT 1`` on the serving pool; through
        the engine, a connection (which its pool pings first)."""
        if self.pooled:
            async with self.connection() as connection:
                await connection.fetchval("SELECT 1")
            return
        async with self.engine.connect():
            pass

    async def close(self) -> None:
        try:
            await self._serving.close()
        finally:
            if "engine" in self.__dict__:
                await self.engine.dispose()


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


def schema_problem(current: Sequence[str]) -> str | None:
    """What keeps a database at revisions ``current`` from serving this release, if anything."""
    if not current:
        return f"the database has no databroker tables: {MIGRATE_HINT}"
    known, heads = revisions()
    if set(current) & heads or set(current) - known:
        # At this release's head; or at a revision it does not know: a newer release
        # migrated the database during a rolling deploy. Its migrations keep the old
        # columns, so serve.
        return None
    return (
        f"the database is at revision {', '.join(sorted(current))}, older than this release:"
        f" {MIGRATE_HINT}"
    )


async def check_schema(database: Database) -> None:
    """StartupError unless the database answers and has this release's tables."""
    try:
        (rows,) = await database.read(f"SELECT version_num FROM {VERSION_TABLE}")
    except Exception as exc:
        raise StartupError(describe(exc)) from exc
    problem = schema_problem([row["version_num"] for row in rows])
    if problem is not None:
        raise StartupError(problem)


async def prepare(database: Database, embedded: bool) -> None:
    """StartupError unless the database has this release's tables; the embedded default's
    (SQLite beside the process) is migrated here instead, as it has no operator to."""
    if not embedded:
        await check_schema(database)
        return
    from proxy.engine import migrate  # SQLAlchemy: the embedded default serves through it

    try:
        await migrate(database.engine)
    except Exception as exc:
        raise StartupError(describe(exc)) from exc


def _sqlalchemy_errors() -> Any:
    """``sqlalchemy.exc`` if SQLAlchemy is loaded: an exception can be one of its own only
    then, and asking must not load it."""
    return sys.modules.get("sqlalchemy.exc")


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's (or its drivers') own, rather than a bug or a secret
    no key decrypts."""
    sa_exc = _sqlalchemy_errors()
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        return True
    return isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away or too slow, rather than refusing a statement."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _UNAVAILABLE_STATES
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return False  # the URL's options: retrying does not help
    # OSError: refused, reset, and TimeoutError (asyncpg's connect and command timeouts).
    if isinstance(exc, OSError | asyncpg.InterfaceError):
        return True
    sa_exc = _sqlalchemy_errors()
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return sa_exc is not None and isinstance(exc, sa_exc.TimeoutError)


_NO_TABLES = f"the database has no databroker tables: {MIGRATE_HINT}"


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or ["refused"])[0]


def _refused(message: str) -> str:
    """Through SQLAlchemy, a missing table is known by its message only (SQLite's are
    English whatever the locale; Postgres's were, as this release's serving path reads
    the SQLSTATE instead)."""
    line = _first_line(message)
    if line.startswith(("relation ", "no such table")):
        return _NO_TABLES
    return f"the database of DATABROKER_DATABASE_URL refused: {line}"


def describe(exc: BaseException) -> str:
    """One line about a database failure, for an operator: never the URL (it may hold a
    password), never a statement's parameters."""
    sa_exc = _sqlalchemy_errors()
    if isinstance(exc, TimeoutError) or (
        sa_exc is not None and isinstance(exc, sa_exc.TimeoutError)
    ):
        return "the database of DATABROKER_DATABASE_URL did not answer in time"
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return f"cannot reach the database of DATABROKER_DATABASE_URL: {reason}"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return _NO_TABLES
    if isinstance(exc, asyncpg.PostgresError):
        # The server's own message ('database "x" does not exist', 'password authentication
        # failed for user "y"'), never a statement's parameters.
        line = _first_line(str(exc) or type(exc).__name__)
        return f"the database of DATABROKER_DATABASE_URL refused: {line}"
    if isinstance(exc, asyncpg.ClientConfigurationError):
        # An option of the URL's query that asyncpg refuses; its message names the option.
        line = _first_line(str(exc))
        return f"the options of DATABROKER_DATABASE_URL are refused: {line}"
    if isinstance(exc, asyncpg.InterfaceError):
        return f"cannot reach the database of DATABROKER_DATABASE_URL: {type(exc).__name__}"
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        # The driver's own message, without SQLAlchemy's statement and parameters.
        return _refused(str(exc.orig) or type(exc.orig).__name__)
    return f"database error: {type(exc).__name__}"
