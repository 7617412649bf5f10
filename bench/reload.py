"""CPU of a registry reload at N sources: the first (every source compiled, as every reload
was before sources were reused) against the next ones (nothing changed, nothing compiled).

    .venv/bin/python -m bench.reload [N]    # default 1000; the local Postgres and Redis

A measurement, printed, asserting nothing.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from cryptography.fernet import Fernet
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.database import Database
from proxy.engine import migrate
from proxy.keys import KeyLayout
from proxy.secrets import SecretBox
from proxy.source_registry import Registry
from proxy.source_rows import read_all
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue
from tests.harness import POSTGRES_SERVER, REDIS_SERVER, create_database, drop_database

SPEC = {
    "source": {
        "url": "https://api.example.com/users/{{ id }}?key={{ env.KEY }}",
        "headers": {"Authorization": "Bearer {{ env.TOKEN }}"},
        "response_type": "JSON",
        "retry": {"max_retries": 2},
    },
    "caching": {"enabled": True, "ttl": 60},
}


def _ms(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:.0f} ms CPU ({len(seconds)} runs)"


async def _cpu(load: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    spent = []
    for _ in range(runs):
        start = time.process_time()
        await load()
        spent.append(time.process_time() - start)
    return spent


async def _measure(engine: AsyncEngine, database: Database, count: int) -> None:
    await migrate(engine)
    box = SecretBox([Fernet.generate_key().decode()])
    store = SourceStore(engine, box)
    for i in range(count):
        row = await store.create(DataSourceSpec.model_validate({"name": f"s{i}", **SPEC}), None)
        values = [VariableValue(name="KEY", value="k"), VariableValue(name="TOKEN", value="t")]
        await store.set_variables(row.data_source_id, values, None)
    redis = Redis.from_url(REDIS_SERVER)
    try:
        first = []
        for _ in range(3):
            registry = Registry(database, box, redis, KeyLayout("measure:"))
            first += await _cpu(registry.load, 1)
        print(f"{count} sources, first reload (all compiled): {_ms(first)}")
        print(f"{count} sources, next reloads (none changed): {_ms(await _cpu(registry.load, 7))}")
        print(f"the database read alone: {_ms(await _cpu(lambda: read_all(database), 7))}")
    finally:
        await redis.aclose()


async def main(count: int) -> None:
    server = POSTGRES_SERVER
    name = f"databroker_measure_{uuid.uuid4().hex[:10]}"
    url = await create_database(server, name)
    engine, database = create_async_engine(url), Database(url)
    try:
        await _measure(engine, database, count)
    finally:
        await database.close()
        await engine.dispose()
        await drop_database(server, name)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
