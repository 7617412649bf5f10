"""The real CLI in a subprocess: SIGTERM under load loses and duplicates nothing.

Also the embedded default (SQLite and in-process Redis, nothing configured) and
``databroker migrate`` on a fresh database.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import REDIS_URL, TABLES, pg_server
from tests.harness import (
    ADMIN_TOKEN,
    EXIT_DEADLINE,
    async_wait_for,
    clean_env,
    create_database,
    drop_database,
    free_port,
    register,
    sidecar_env,
)
from tests.instances import databroker, log_of, serving, terminate
from tests.servers import Upstream

pytestmark = pytest.mark.slow


def slow_json(upstream: Upstream, path: str) -> str:
    async def handler(request: Request) -> Response:
        await asyncio.sleep(0.02)  # the upstream's own latency, so requests are in flight
        return Response(orjson.dumps({"n": request.query_params["n"]}), 200)

    return upstream.on(path, handler)


async def test_sigterm_under_load_loses_and_duplicates_nothing(
    pg_url: str, db: AsyncEngine, redis_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=redis_prefix)
    url = slow_json(upstream, "/slow")
    spec = {
        "name": "slow_api",
        "source": {"url": url, "params": {"n": "{{ n }}"}, "response_type": "JSON"},
        "caching": {"enabled": True, "ttl": 60},
    }
    total = 300
    run_ids = [uuid.uuid4() for _ in range(total)]
    answers: dict[uuid.UUID, dict[str, Any]] = {}
    failures: list[BaseException] = []

    async with serving(env, tmp_path, max_connections=50, max_keepalive_connections=50) as (
        process,
        client,
    ):
        sid = (await register(client, spec))["data_source_id"]

        async def call(i: int) -> None:
            body = {
                "data_source_name": "slow_api",
                "configured_params": {"n": str(i)},
                "run_id": str(run_ids[i]),
            }
            try:
                answer = await client.post("/internal/data-broker", json=body)
            except httpx.TransportError as exc:  # refused or closed once shutdown began
                failures.append(exc)
                return
            answers[run_ids[i]] = {"status": answer.status_code, **answer.json()}

        calls = [asyncio.create_task(call(i)) for i in range(total)]
        try:

            async def some_answered() -> bool:
                return len(answers) >= 20

            await async_wait_for(some_answered, timeout=30)
            process.send_signal(signal.SIGTERM)
            await asyncio.gather(*calls)
        finally:
            for task in calls:
                task.cancel()
        terminate(process, signalled=True)

    assert len(answers) + len(failures) == total
    assert len(answers) >= 20
    # Nothing refused for its own sake: every answer is a fresh success from upstream.
    for run_id, answer in answers.items():
        assert answer["status"] == 200, answer
        assert answer["error"] is None and answer["origin"] == "REQUEST", answer
        assert answer["value"] == {"n": str(run_ids.index(run_id))}

    async with db.connect() as conn:
        audit = (
            await conn.execute(
                text(
                    "SELECT run_id, data_object_id, data_origin, data_source_id "
                    "FROM run_data_request"
                )
            )
        ).all()
        stored = {
            str(r.data_object_id): (r.value, str(r.data_source_id))
            for r in await conn.execute(text("SELECT * FROM data_object"))
        }

    # Exactly one audit row per answered request: none lost, none duplicated, none extra.
    per_run = Counter(r.run_id for r in audit)
    assert set(per_run) == set(answers), (
        f"missing {len(set(answers) - set(per_run))}, extra {len(set(per_run) - set(answers))}"
    )
    assert max(per_run.values()) == 1
    for row in audit:
        answer = answers[row.run_id]
        assert str(row.data_object_id) == answer["data_object_id"]
        assert row.data_origin == "REQUEST"
        assert str(row.data_source_id) == sid
    # And the raw response behind every answer, once.
    assert set(stored) == {a["data_object_id"] for a in answers.values()}
    for answer in answers.values():
        value, source = stored[answer["data_object_id"]]
        assert orjson.loads(value) == answer["value"]
        assert source == sid
    # The outbox was drained before exit.
    assert [p for p in (tmp_path / "outbox").iterdir() if p.is_file()] == []


async def test_embedded_default_needs_nothing_installed(upstream: Upstream, tmp_path: Path) -> None:
    upstream.answer("/users/42", b'{"id": "42", "name": "Ada"}')
    spec = {
        "name": "user_api",
        "source": {"url": f"{upstream.url}/users/{{{{ user_id }}}}", "response_type": "JSON"},
        "caching": {"enabled": True, "ttl": 60},
    }
    env = clean_env(admin_token=ADMIN_TOKEN)
    async with serving(env, tmp_path) as (process, client):
        await register(client, spec)
        origins = []
        for _ in range(2):
            body = {
                "data_source_name": "user_api",
                "configured_params": {"user_id": "42"},
                "run_id": str(uuid.uuid4()),
            }
            answer = await client.post("/internal/data-broker", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["value"] == {"id": "42", "name": "Ada"}
            origins.append(answer.json()["origin"])
        assert origins == ["REQUEST", "CACHE"]
        assert upstream.hits("/users/42") == 1
        terminate(process)

    database = tmp_path / ".databroker" / "databroker.db"
    assert database.is_file()
    with sqlite3.connect(database) as conn:
        audit = conn.execute("SELECT data_origin FROM run_data_request").fetchall()
        objects = conn.execute("SELECT value FROM data_object").fetchall()
    conn.close()
    assert sorted(origin for (origin,) in audit) == ["CACHE", "REQUEST"]
    assert objects == [(b'{"id": "42", "name": "Ada"}',)]


async def test_migrate_creates_the_tables(tmp_path: Path) -> None:
    server = await pg_server()
    name = f"databroker_migrate_{uuid.uuid4().hex[:10]}"
    url = await create_database(server, name)
    try:
        env = clean_env(database_url=url)
        for _ in range(2):  # the second run finds the database current
            with databroker(["migrate"], env, tmp_path) as process:
                code = await asyncio.to_thread(process.wait, EXIT_DEADLINE)
                assert code == 0, log_of(tmp_path)
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            tables = {
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        finally:
            await conn.close()
        assert set(TABLES) <= tables
    finally:
        await drop_database(server, name)


def test_an_invalid_setting_is_named(tmp_path: Path) -> None:
    env = clean_env(max_response_bytes="-1")
    with databroker(["serve", "--port", str(free_port())], env, tmp_path) as process:
        code = process.wait(timeout=EXIT_DEADLINE)
    assert code == 2
    assert "DATABROKER_MAX_RESPONSE_BYTES" in log_of(tmp_path)
