"""proxy.pruner and ``databroker prune`` on real Postgres and SQLite: exactly the rows older
than their source's retention go, a batch at a time; a dry run deletes nothing; one sidecar
of the fleet prunes per interval."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.cache import CacheEntry, RedisCache
from proxy.cli import main
from proxy.database import Database
from proxy.keys import KeyLayout
from proxy.pruner import DELETED_SOURCE, Pruner, prune_round
from proxy.tables import data_object, run_data_request
from tests.conftest import REDIS_URL, Over
from tests.harness import clean_env, insert_source

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
# Ages in days of the rows each source gets: some inside every retention, some outside.
AGES = (0.5, 6.9, 7.1, 29.9, 30.1, 45, 400)


async def add_source(engine: AsyncEngine, name: str, retention_days: int | None) -> uuid.UUID:
    return await insert_source(
        engine, name, NOW - timedelta(days=500), retention_days=retention_days
    )


async def add_rows(engine: AsyncEngine, data_source_id: uuid.UUID, now: datetime = NOW) -> None:
    """One DataObject and one audit row naming it at each of AGES before ``now``."""
    objects, requests = [], []
    for age in AGES:
        created_at = now - timedelta(days=age)
        object_id = uuid.uuid4()
        objects.append(
            {
                "data_object_id": object_id,
                "data_source_id": data_source_id,
                "key": f"{age}",
                "value": b"{}",
                "created_at": created_at,
            }
        )
        requests.append(
            {
                "run_data_request_id": uuid.uuid4(),
                "run_id": uuid.uuid4(),
                "data_object_id": object_id,
                "data_source_id": data_source_id,
                "data_origin": "REQUEST",
                "created_at": created_at,
            }
        )
    async with engine.begin() as conn:
        await conn.execute(insert(data_object), objects)
        await conn.execute(insert(run_data_request), requests)


async def ages_left(
    engine: AsyncEngine, data_source_id: uuid.UUID, now: datetime = NOW
) -> tuple[list[float], ...]:
    """The ages (days, at ``now``) of a source's remaining DataObjects and audit rows."""
    found = []
    async with engine.connect() as conn:
        for table in (data_object, run_data_request):
            query = select(table.c.created_at).where(table.c.data_source_id == data_source_id)
            created = (await conn.execute(query)).scalars().all()
            found.append(sorted(round((now - _utc(c)).total_seconds() / 86400, 1) for c in created))
    return tuple(found)


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def pruner(database: Database, default_days: int | None, batch_size: int = 2) -> Pruner:
    return Pruner(database, default_days, batch_size, pause=0, clock=lambda: NOW)


async def test_prune_removes_exactly_the_rows_older_than_retention(
    database: AsyncEngine, over: Over
) -> None:
    month = await add_source(database, "month", 30)
    week = await add_source(database, "by default", None)
    for source in (month, week):
        await add_rows(database, source)
    batches = 0

    async def count_batch() -> None:
        nonlocal batches
        batches += 1

    done = await pruner(over(database), default_days=7).run(after_batch=count_batch)

    assert [(p.cut.name, p.cut.days, p.objects, p.requests) for p in done] == [
        ("by default", 7, 5, 5),
        ("month", 30, 3, 3),
    ]
    assert await ages_left(database, month) == ([0.5, 6.9, 7.1, 29.9],) * 2
    assert await ages_left(database, week) == ([0.5, 6.9],) * 2
    # Batches of 2, a pause after each full one: 5 rows take two full and one short, 3 rows
    # one full and one short; per table.
    assert batches == (2 + 1) * 2


async def test_nothing_goes_without_a_retention(database: AsyncEngine, over: Over) -> None:
    forever = await add_source(database, "forever", None)
    await add_rows(database, forever)
    assert await pruner(over(database), default_days=None).run() == []
    assert await ages_left(database, forever) == (sorted(AGES),) * 2


async def test_a_dry_run_counts_and_deletes_nothing(database: AsyncEngine, over: Over) -> None:
    month = await add_source(database, "month", 30)
    await add_rows(database, month)
    [pruned] = await pruner(over(database), default_days=None).run(dry_run=True)
    assert (pruned.objects, pruned.requests) == (3, 3)
    assert await ages_left(database, month) == (sorted(AGES),) * 2


async def test_one_sidecar_prunes_per_interval(
    db: AsyncEngine, redis_prefix: str, over: Over
) -> None:
    month = await add_source(db, "month", 30)
    await add_rows(db, month)
    lock = f"{redis_prefix}prune"
    redis = aioredis.from_url(REDIS_URL)
    try:
        first = await prune_round(pruner(over(db), None), redis, lock, "sidecar-a", 60)
        await add_rows(db, month)
        second = await prune_round(pruner(over(db), None), redis, lock, "sidecar-b", 60)
        held_for = await redis.pttl(lock)
        holder = await redis.get(lock)
    finally:
        await redis.aclose()
    assert first is not None and [(p.objects, p.requests) for p in first] == [(3, 3)]
    assert second is None  # sidecar-a holds the round: sidecar-b's new old rows stay
    assert holder == b"sidecar-a" and 0 < held_for <= 60_000
    assert len((await ages_left(db, month))[0]) == len(AGES) * 2 - 3


async def test_the_prune_command_says_what_would_go_then_prunes(
    db: AsyncEngine, pg_url: str, tmp_path: Path
) -> None:
    # The command ages rows from the real clock.
    now = datetime.now(UTC)
    source = await add_source(db, "bureau", 30)
    await add_rows(db, source, now)
    env = clean_env(database_url=pg_url, data_dir=str(tmp_path))

    def prune(*args: str) -> str:
        done = CliRunner().invoke(main, ["prune", *args], env=env)
        assert done.exit_code == 0, done.output
        return done.output

    dry = await asyncio.to_thread(prune, "--dry-run")
    assert f"bureau ({source}): 3 DataObjects and 3 audit rows created before" in dry
    assert dry.rstrip().endswith("(30 days) would go")
    assert await ages_left(db, source, now) == (sorted(AGES),) * 2

    went = await asyncio.to_thread(prune)
    assert went.rstrip().endswith("(30 days) went")
    assert await ages_left(db, source, now) == ([0.5, 6.9, 7.1, 29.9],) * 2


@pytest.mark.parametrize("value", ["0", "-1", "36501", "a month"])
def test_a_bad_global_retention_is_refused_naming_its_variable(value: str) -> None:
    done = CliRunner().invoke(main, ["prune"], env=clean_env(retention_days=value))
    assert done.exit_code == 2
    assert "invalid setting DATABROKER_RETENTION_DAYS" in done.output


async def test_the_entries_of_pruned_objects_leave_the_cache(
    db: AsyncEngine, redis_prefix: str, over: Over
) -> None:
    """An entry without expiry would serve a pruned object for good: it goes with it, unless
    it holds a newer object of the same key."""
    month = await add_source(db, "month", 30)
    await add_rows(db, month)  # keys are the ages: "0.5" … "400"
    redis = aioredis.from_url(REDIS_URL)
    cache = RedisCache(redis, KeyLayout(redis_prefix))
    try:
        for age in AGES:
            created = (NOW - timedelta(days=age)).timestamp()
            await cache.put(month, f"{age}", CacheEntry(str(uuid.uuid4()), created, b"{}"), None)
        # Key "45"'s object is old, but its entry was refreshed today: it stays.
        refreshed = CacheEntry(str(uuid.uuid4()), NOW.timestamp(), b"{}")
        await cache.put(month, "45", refreshed, None)
        pruner = Pruner(over(db), None, batch_size=2, pause=0, clock=lambda: NOW, cache=cache)
        [pruned] = await pruner.run()
        left = {f"{age}": await cache.get(month, f"{age}") for age in AGES}
    finally:
        await redis.aclose()
    assert pruned.objects == 3
    assert {key for key, entry in left.items() if entry is None} == {"30.1", "400"}
    assert left["45"] == refreshed


async def test_a_deleted_drafts_rows_take_the_default_retention(
    database: AsyncEngine, over: Over
) -> None:
    """Its source row is gone (drafts are hard-deleted), its rows are not: they age by the
    default, and are kept forever without one."""
    kept = await add_source(database, "kept", None)
    deleted = uuid.uuid4()
    for source in (kept, deleted):
        await add_rows(database, source)
    assert await pruner(over(database), default_days=None).run() == []

    done = await pruner(over(database), default_days=30).run()

    assert sorted((p.cut.name, p.cut.data_source_id, p.objects, p.requests) for p in done) == [
        (DELETED_SOURCE, deleted, 3, 3),
        ("kept", kept, 3, 3),
    ]
    assert await ages_left(database, deleted) == ([0.5, 6.9, 7.1, 29.9],) * 2
