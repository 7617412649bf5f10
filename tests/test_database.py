"""proxy.database: the serving path's pool takes the URL as SQLAlchemy does, its failures
read as one line for an operator, and it closes for good (real Postgres)."""

from __future__ import annotations

import asyncpg
import pytest

from proxy.database import Database, asyncpg_arguments, describe, is_unavailable
from tests.harness import free_port


def test_the_query_of_a_url_is_asyncpgs_arguments_as_sqlalchemy_passes_them() -> None:
    dsn, arguments = asyncpg_arguments(
        "postgresql+asyncpg://u:p%40ss@db:5433/x?ssl=require&prepared_statement_cache_size=0"
    )
    assert dsn == "postgresql://u:p%40ss@db:5433/x"
    assert arguments == {"ssl": "require", "statement_cache_size": 0}


@pytest.mark.parametrize("query", ["?ssl=prefer", "?prepared_statement_cache_size=0", ""])
async def test_one_url_serves_both_paths(pg_url: str, query: str) -> None:
    """``?ssl=`` is SQLAlchemy's way to ask for TLS: the serving pool must take it too."""
    database = Database(pg_url + query)
    try:
        await database.ping()
        [[row]] = await database.read("SELECT 1 AS one")
        assert dict(row) == {"one": 1}
        async with database.engine.connect():  # the admin routes' engine, on the same URL
            pass
    finally:
        await database.close()


async def test_a_missing_table_is_named_whatever_the_servers_language(pg_url: str) -> None:
    database = Database(pg_url)
    try:
        with pytest.raises(asyncpg.UndefinedTableError) as caught:
            await database.read("SELECT * FROM no_such_table_here")
    finally:
        await database.close()
    caught.value.args = ("Relation »no_such_table_here« existiert nicht",)
    assert (
        describe(caught.value) == "the database has no databroker tables: run `databroker migrate`"
    )
    assert not is_unavailable(caught.value)


async def test_an_option_asyncpg_refuses_is_a_configuration_error_not_an_outage(
    pg_url: str,
) -> None:
    database = Database(pg_url + "?ssl=sometimes")
    try:
        with pytest.raises(asyncpg.ClientConfigurationError) as caught:
            await database.ping()
    finally:
        await database.close()
    assert describe(caught.value).startswith("the options of DATABROKER_DATABASE_URL are refused")
    assert not is_unavailable(caught.value)


async def test_an_unreachable_database_is_an_outage_named_without_its_url() -> None:
    database = Database(f"postgresql+asyncpg://u:pw-canary@127.0.0.1:{free_port()}/x")
    try:
        with pytest.raises(OSError) as caught:
            await database.ping()
    finally:
        await database.close()
    assert is_unavailable(caught.value)
    line = describe(caught.value)
    assert line.startswith("cannot reach the database") and "pw-canary" not in line


async def test_a_closed_database_opens_no_pool_again(pg_url: str) -> None:
    database = Database(pg_url)
    await database.ping()
    await database.close()
    with pytest.raises(asyncpg.InterfaceError):
        await database.ping()
