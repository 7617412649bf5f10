"""The fault suite: real processes, really killed and stopped, and hostile upstreams.

The sidecar runs as ``databroker serve`` on a private PostgreSQL and a private
Redis (``tests.instances``), never the machine's shared ones: it is killed
with SIGKILL under load, its database and its Redis are stopped and started
again under it. Hostile upstreams go through the in-thread broker. Every test
asserts exact counts; the figures it measures are printed (``-s`` shows them)
and kept in ``bench-results/faults.json`` for the README.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.conftest import REDIS_URL, Broker
from tests.instances import (
    PostgresInstance,
    RedisCluster,
    RedisInstance,
    Sidecar,
    sidecar,
    sidecar_env,
)
from tests.servers import Upstream, async_wait_for, wait_for
from tests.test_flow import rows
from tests.test_shutdown import slow_json

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parent.parent / "bench-results" / "faults.json"
MiB = 1024 * 1024
GiB = 1024 * MiB


def report(name: str, **figures: Any) -> None:
    """Print a test's figures and keep them in bench-results/faults.json (merged by name)."""
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[name] = figures
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


@pytest.fixture
async def private_db(private_pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's side of the private database; no pool, so a Postgres restart costs nothing."""
    engine = create_async_engine(private_pg_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


def counted_spec(name: str, url: str) -> dict[str, Any]:
    """A cached JSON source with one runtime param ``n``: distinct ``n``, distinct keys."""
    return {
        "name": name,
        "source": {"url": url, "params": {"n": "{{ n }}"}, "response_type": "JSON", "timeout": 10},
        "caching": {"enabled": True, "ttl": 600},
    }


async def audit_counts(db: AsyncEngine) -> tuple[Counter[uuid.UUID], set[uuid.UUID]]:
    """Audit rows per run_id, and the ids of every stored DataObject."""
    audit = await rows(db, "SELECT run_id FROM run_data_request")
    objects = await rows(db, "SELECT data_object_id FROM data_object")
    return (
        Counter(r["run_id"] for r in audit),  # type: ignore[misc]
        {r["data_object_id"] for r in objects},  # type: ignore[misc]
    )


def outbox_bytes(directory: Path) -> int:
    """What every segment in the outbox directory holds (shipped segments are removed)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


async def fire(
    node: Sidecar, name: str, params: list[dict[str, Any]]
) -> list[tuple[uuid.UUID, httpx.Response]]:
    """Send one request per params dict at once, each with a run_id of its own."""
    run_ids = [uuid.uuid4() for _ in params]
    answers = await asyncio.gather(*(node.call(name, p, r) for p, r in zip(params, run_ids)))
    return list(zip(run_ids, answers))


# --- kill -9 under load ------------------------------------------------------------------


async def test_kill_9_under_load_loses_and_doubles_nothing(
    private_pg_url: str,
    private_db: AsyncEngine,
    private_redis: RedisInstance,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "outbox"
    env = sidecar_env(private_pg_url, private_redis.url, outbox)
    url = slow_json(upstream, "/load")
    total = 400
    run_ids = [uuid.uuid4() for _ in range(total)]
    answered: dict[uuid.UUID, dict[str, Any]] = {}
    cut: list[BaseException] = []

    async with sidecar(env, tmp_path, max_connections=total) as first:
        sid = await first.client.post  # placeholder replaced below
