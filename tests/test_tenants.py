"""Tenants: a request for one project resolves, caches and records only that project's sources.

Two projects A and B and the global namespace (no project) each hold a source named
``users`` that calls a different upstream path, so an answer says whose source served
it. The admin token itself is one for all projects (tests/test_admin.py covers it);
each admin request works in one project and sees no other's sources.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.keys import make_cache_key
from proxy.settings import Settings
from tests.conftest import REDIS_URL, Broker
from tests.harness import async_wait_for
from tests.servers import Upstream, serve_in_thread
from tests.test_admin import ID_ROUTES
from tests.test_flow import rows

A, B = uuid.uuid4(), uuid.uuid4()
PARAMS = {"user_id": "1"}


def users(upstream: Upstream, owner: str, project: uuid.UUID | None) -> dict[str, Any]:
    """The ``users`` source of ``project``: its upstream answers ``{"owner": owner}``."""
    upstream.answer(f"/{owner}/users/1", f'{{"owner": "{owner}"}}')
    spec: dict[str, Any] = {
        "name": "users",
        "source": {
            "url": f"{upstream.url}/{owner}/users/{{{{ user_id }}}}",
            "response_type": "JSON",
        },
        "caching": {"enabled": True, "ttl": 60},
    }
    return spec if project is None else {**spec, "project_id": str(project)}


def in_project(project: uuid.UUID | None) -> dict[str, str]:
    return {} if project is None else {"project_id": str(project)}


async def served(broker: Broker, name: str, project: uuid.UUID | None) -> dict[str, Any]:
    answer = await broker.call(name, PARAMS, **in_project(project))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def not_found(broker: Broker, name: str, project: uuid.UUID | None) -> None:
    answer = await broker.call(name, PARAMS, **in_project(project))
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "DATA_SOURCE_NOT_FOUND"


async def listed(broker: Broker, query: str = "") -> set[str]:
    answer = await broker.admin("GET", f"/data-sources{query}")
    assert answer.status_code == 200, answer.text
    return {s["data_source_id"] for s in answer.json()}


async def test_a_project_resolves_and_reads_only_its_own_sources(
    broker: Broker, upstream: Upstream, db: AsyncEngine, redis_prefix: str
) -> None:
    owners = {A: "a", B: "b", None: "global"}
    sid = {
        p: (await broker.register(users(upstream, o, p)))["data_source_id"]
        for p, o in owners.items()
    }
    only_a = (
        await broker.register(
            {
                "name": "only_a",
                "source": {"url": f"{upstream.url}/a/users/{{{{ user_id }}}}"},
                "project_id": str(A),
            }
        )
    )["data_source_id"]

    answers: dict[uuid.UUID | None, dict[str, Any]] = {}
    for project, owner in owners.items():
        first, second = (
            await served(broker, "users", project),
            await served(broker, "users", project),
        )
        assert first["value"] == second["value"] == {"owner": owner}
        assert (first["origin"], second["origin"]) == ("REQUEST", "CACHE")
        assert first["data_object_id"] == second["data_object_id"]
        assert first["key"] == make_cache_key(sid[project], PARAMS)
        answers[project] = first
    assert len({a["key"] for a in answers.values()}) == 3  # same params, three cache keys

    # Each source's entry sits under its own data_source_id, and nothing else is cached.
    def entry(project: uuid.UUID | None) -> str:
        """The contract's key layout (DESIGN.md), written out rather than asked of the code."""
        return f"{redis_prefix}cache:{sid[project]}:{answers[project]['key']}"

    entries = {entry(p).encode() for p in owners}
    redis = sync_redis.Redis.from_url(REDIS_URL)
    try:
        assert set(redis.scan_iter(match=f"{redis_prefix}cache:*", count=1000)) == entries
        # Poison B's entry: B answers the poison (so the entry is live), A and global never do.
        b_entry = entry(B)
        raw = redis.get(b_entry)
        assert isinstance(raw, bytes) and b'{"owner":"b"}' in raw
        redis.set(b_entry, raw.replace(b'{"owner":"b"}', b'{"owner":"poisoned"}'), keepttl=True)
        assert (await served(broker, "users", B))["value"] == {"owner": "poisoned"}
        for project in (A, None):
            hit = await served(broker, "users", project)
            assert (hit["origin"], hit["value"]) == ("CACHE", {"owner": owners[project]})
        # A without its own entry goes to A's upstream; B's entry does not stand in for it.
        hits_a = upstream.hits("/a/users/1")
        redis.delete(entry(A))
        miss = await served(broker, "users", A)
        assert (miss["origin"], miss["value"]) == ("REQUEST", {"owner": "a"})
        assert upstream.hits("/a/users/1") == hits_a + 1
    finally:
        redis.close()

    # A name only A has does not exist for B, nor globally.
    assert (await served(broker, "only_a", A))["error"] is None
    await not_found(broker, "only_a", B)
    await not_found(broker, "only_a", None)

    # Every recorded object and audit row of A's calls is A's source's.
    async def recorded() -> list[dict[str, object]]:
        found = await rows(db, "SELECT data_source_id, data_object_id FROM run_data_request")
        return found if len(found) == 11 else []  # 11 calls resolved a source

    audit = await async_wait_for(recorded)
    objects = {str(r["data_object_id"]): str(r["data_source_id"]) for r in audit}
    for project in owners:
        assert objects[answers[project]["data_object_id"]] == sid[project]

    # The admin list of a project holds that project's sources, and only those.
    assert await listed(broker, f"?project_id={A}") == {sid[A], only_a}
    assert await listed(broker, f"?project_id={B}") == {sid[B]}
    assert await listed(broker) == {sid[None]}

    # Replacing A's source in A, the body naming no project, keeps it in A.
    replaced = await broker.admin(
        "PUT",
        f"/data-sources/{sid[A]}?project_id={A}",
        {**users(upstream, "a", None), "description": "d"},
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["project_id"] == str(A)


async def test_the_default_project_applies_when_a_request_names_none(
    broker: Broker, settings: Settings, upstream: Upstream, tmp_path: Path
) -> None:
    for project, owner in ((A, "a"), (B, "b"), (None, "global")):
        await broker.register(users(upstream, owner, project))
    await broker.register(
        {"name": "global_only", "source": {"url": f"{upstream.url}/global/users/{{{{ user_id }}}}"}}
    )

    # Its own outbox: two brokers in one process must not share a segment directory.
    in_a = settings.model_copy(update={"project_id": A, "outbox_dir": tmp_path / "outbox-a"})
    with serve_in_thread(create_app(in_a)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            default_a = Broker(url, in_a, client)
            assert (await served(default_a, "users", None))["value"] == {"owner": "a"}
            assert (await served(default_a, "users", B))["value"] == {"owner": "b"}
            # The global namespace is not where a request naming no project goes any more.
            await not_found(default_a, "global_only", None)

            made = await default_a.register(
                {
                    "name": "made_here",
                    "source": {"url": f"{upstream.url}/a/users/{{{{ user_id }}}}"},
                }
            )
            assert made["project_id"] == str(A)
            assert (await served(default_a, "made_here", None))["error"] is None
            in_list = await listed(default_a)
            assert made["data_source_id"] in in_list
            assert in_list == await listed(default_a, f"?project_id={A}")
            assert in_list.isdisjoint(await listed(default_a, f"?project_id={B}"))

    # Without a default, a request naming no project is global: A's new source is not there.
    await not_found(broker, "made_here", None)
    assert (await served(broker, "users", None))["value"] == {"owner": "global"}


SCOPED: dict[str, Any] = {
    "name": "scoped",
    "source": {"url": "https://api.example.com/users", "headers": {"X-Key": "{{ env.KEY }}"}},
    "project_id": str(A),
}


@pytest.mark.parametrize(("method", "path", "body"), ID_ROUTES)
async def test_admin_routes_see_only_their_projects_sources(
    broker: Broker, method: str, path: str, body: Any
) -> None:
    """Reads included: another project, or the global namespace, gets 404 and changes nothing."""
    source = await broker.register(SCOPED, variables={"KEY": "k"}, publish=False)
    sid = source["data_source_id"]
    for query in (f"?project_id={B}", ""):
        answer = await broker.admin(method, path.format(id=sid) + query, body)
        assert answer.status_code == 404, (query, answer.text)
        assert answer.json()["code"] == "NOT_FOUND"

    kept = await broker.admin("GET", f"/data-sources/{sid}?project_id={A}")
    assert kept.status_code == 200, kept.text
    assert kept.json() == source
    variables = await broker.admin("GET", f"/data-sources/{sid}/variables?project_id={A}")
    assert [(v["name"], v["is_set"]) for v in variables.json()] == [("KEY", True)]


async def test_the_body_may_not_name_another_project_than_the_query(broker: Broker) -> None:
    created = await broker.admin("POST", f"/data-sources?project_id={B}", SCOPED)
    assert created.status_code == 400, created.text
    sid = (await broker.register(SCOPED, publish=False))["data_source_id"]
    moved = await broker.admin(
        "PUT", f"/data-sources/{sid}?project_id={A}", {**SCOPED, "project_id": str(B)}
    )
    assert moved.status_code == 400, moved.text
    assert await listed(broker, f"?project_id={B}") == set()
