"""The admin routes against a real broker: auth, validation, lifecycle, variables, registry."""

from __future__ import annotations

import shlex
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.settings import Settings
from tests.conftest import Broker
from tests.harness import ADMIN_TOKEN, async_wait_for
from tests.instances import RedisInstance
from tests.servers import Upstream, serve_in_thread
from tests.tcp import HangingProxy
from tests.test_redis_acl import ACL_LINE

CANARY = "s3cr3t-canary"
SOME_ID = "5a1e0000-0000-4000-8000-00000000abcd"  # fixed: test ids must match across workers
URL = "https://api.example.com/users"

# (method, path, body): every admin route, with a body valid enough to pass parsing.
ID_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/data-sources/{id}", None),
    ("PUT", "/data-sources/{id}", {"name": "x", "source": {"url": URL}}),
    ("DELETE", "/data-sources/{id}", None),
    ("POST", "/data-sources/{id}/publish", None),
    ("GET", "/data-sources/{id}/variables", None),
    ("PUT", "/data-sources/{id}/variables", []),
]
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/data-sources", None),
    ("GET", "/data-sources/", None),
    ("POST", "/data-sources", {"name": "x", "source": {"url": URL}}),
    ("POST", "/data-sources/", {"name": "x", "source": {"url": URL}}),
    *((m, p.format(id=SOME_ID), b) for m, p, b in ID_ROUTES),
]


# What every source shows unless it says otherwise, as the engine's do: no body, no retries.
IN_FORCE = {
    "body": {},
    "retry": {
        "max_retries": 0,
        "backoff_factor": 0.0,
        "status_forcelist": [429, 500, 502, 503, 504],
    },
}


def spec(name: str = "users", url: str = URL, **fields: Any) -> dict[str, Any]:
    return {"name": name, "source": {"url": url}, **fields}


WITH_VARIABLES = spec(
    source={
        "url": URL,
        "headers": {"Authorization": "Bearer {{ env.TOKEN }}", "X-Other": "{{ env.OTHER }}"},
    }
)


async def db_values(db: AsyncEngine) -> dict[str, str | None]:
    async with db.connect() as conn:
        result = await conn.execute(text("SELECT name, value FROM data_source_env_var"))
        return {row.name: row.value for row in result}


def error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert an admin error answer: its status and ``{"detail": str, "code": str, …}``."""
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def invalid(answer: httpx.Response, where: str) -> list[dict[str, Any]]:
    """Assert a 422 in FastAPI's shape: ``detail`` a list of ``{loc, msg, type}``, every
    ``loc`` starting at ``where``; the list."""
    assert answer.status_code == 422, answer.text
    body: dict[str, Any] = answer.json()
    assert body["code"] == "VALIDATION_ERROR"
    details: list[dict[str, Any]] = body["detail"]
    assert isinstance(details, list) and details, body
    for detail in details:
        assert set(detail) == {"loc", "msg", "type"}, detail
        assert detail["loc"][0] == where and detail["msg"] and detail["type"], detail
    return details


def located(details: list[dict[str, Any]]) -> list[str]:
    """Every name along the details' locations."""
    return [str(part) for detail in details for part in detail["loc"]]


def contains(stored: Any, sent: Any) -> bool:
    """Whether every field of ``sent`` (nested) has that value in ``stored``."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(
            k in stored and contains(stored[k], v) for k, v in sent.items()
        )
    return bool(stored == sent)


async def ok(broker: Broker, method: str, path: str, body: Any = None) -> Any:
    answer = await broker.admin(method, path, body)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def create(broker: Broker, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = await ok(broker, "POST", "/data-sources", body)
    return created


async def archived(broker: Broker, body: dict[str, Any]) -> dict[str, Any]:
    source = await broker.register(body)
    await ok(broker, "DELETE", f"/data-sources/{source['data_source_id']}")
    return source


# --- auth ---------------------------------------------------------------------------------


async def test_admin_routes_are_off_without_a_token(settings: Settings, db: AsyncEngine) -> None:
    # ``db``: empty tables, so no variable another test encrypted with its own key is loaded.
    app = create_app(settings.model_copy(update={"admin_token": None}))
    with serve_in_thread(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for method, path, body in ROUTES:
                answer = await client.request(
                    method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                error(answer, 403, "ADMIN_DISABLED")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_needs_the_bearer_token(
    broker: Broker, method: str, path: str, body: Any
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ):
        answer = await broker.client.request(method, path, json=body, headers=headers)
        error(answer, 401, "UNAUTHORIZED")


# --- create, get, list --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/data-sources", "/data-sources/"])
async def test_create_answers_the_stored_draft(broker: Broker, path: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    body = spec(
        description="the users API",
        caching={"enabled": True, "ttl": 60},
        metadata={"team": "risk"},
    )
    answer = await broker.client.post(path, json=body, headers=headers, follow_redirects=False)
    assert answer.status_code == 200, answer.text
    created = answer.json()
    uuid.UUID(created.pop("data_source_id"))
    for stamp in (created.pop("created_at"), created.pop("last_updated_at")):
        assert datetime.fromisoformat(stamp).utcoffset() == timedelta(0)
    assert created == {
        "name": "users",
        "description": "the users API",
        "source": {
            "url": URL,
            "method": "GET",
            "headers": {},
            "params": {},
            "response_type": "PLAIN_TEXT",
            **IN_FORCE,
        },
        "caching": {"enabled": True, "ttl": 60},
        "metadata": {"team": "risk"},
        "runtime_params": [],
        "variables": [],
        "status": "DRAFT",
        "project_id": None,
    }
    listed = await broker.client.get(path, headers=headers, follow_redirects=False)
    assert listed.status_code == 200, listed.text
    assert [s["name"] for s in listed.json()] == ["users"]


async def test_get_one_answers_what_create_answered(broker: Broker) -> None:
    created = await create(broker, spec())
    assert await ok(broker, "GET", f"/data-sources/{created['data_source_id']}") == created


async def test_list_hides_archived_and_filters_by_status(broker: Broker) -> None:
    await create(broker, spec("draft"))
    await broker.register(spec("published"))
    await archived(broker, spec("archived"))

    async def names(query: str) -> list[str]:
        return [s["name"] for s in await ok(broker, "GET", f"/data-sources{query}")]

    assert await names("") == ["draft", "published"]
    for yes in ("true", "True", "1", "yes", "on"):
        assert await names(f"?include_archived={yes}") == ["draft", "published", "archived"]
    assert await names("?include_archived=0") == ["draft", "published"]
    assert await names("?status=PUBLISHED") == ["published"]
    assert await names("?status=published") == ["published"]
    assert await names("?status=Archived") == ["archived"]
    details = invalid(await broker.admin("GET", "/data-sources?status=LIVE"), "query")
    assert [d["loc"] for d in details] == [["query", "status"]]
    details = invalid(await broker.admin("GET", "/data-sources?include_archived=maybe"), "query")
    assert [d["loc"] for d in details] == [["query", "include_archived"]]


# --- runtime params and variables ---------------------------------------------------------

TEMPLATED = {
    "url": "https://api.example.com/users/{{ user_id }}",
    "headers": {"Authorization": "Bearer {{ env.TOKEN }}"},
}


@pytest.mark.parametrize(
    "declared",
    [{}, {"runtime_params": ["user_id"], "variables": ["TOKEN"]}],
    ids=["derived", "given"],
)
async def test_names_are_derived_or_checked(broker: Broker, declared: dict[str, Any]) -> None:
    created = await create(broker, {"name": "users", "source": TEMPLATED, **declared})
    assert created["runtime_params"] == ["user_id"]
    assert created["variables"] == ["TOKEN"]


async def test_ttl_object_is_stored_in_seconds(broker: Broker) -> None:
    created = await create(broker, spec(caching={"enabled": True, "ttl": {"hours": 1}}))
    assert created["caching"] == {"enabled": True, "ttl": 3600}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (spec(source={"url": URL, "ttl_seconds": 60}), "ttl_seconds"),
        (spec(colour="blue"), "colour"),
        (spec(caching={"enabled": True, "ttl": 0}), "ttl"),
        (spec(caching={"enabled": True, "ttl": {"hours": 0}}), "ttl"),
        (spec(source={"url": URL, "timeout": "soon"}), "timeout"),
        (spec(retention_days=0), "retention_days"),
    ],
    ids=[
        "unknown-source-field",
        "unknown-field",
        "ttl-zero",
        "ttl-object-zero",
        "timeout-text",
        "retention-zero",
    ],
)
async def test_invalid_source_is_422_locating_the_problem(
    broker: Broker, body: dict[str, Any], named: str
) -> None:
    answer = await broker.admin("POST", "/data-sources", body)
    assert named in located(invalid(answer, "body"))
    assert await ok(broker, "GET", "/data-sources") == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"name": "u", "source": TEMPLATED, "runtime_params": [], "variables": ["TOKEN"]},
            "user_id",
        ),
        (
            {"name": "u", "source": TEMPLATED, "runtime_params": ["user_id"], "variables": []},
            "TOKEN",
        ),
    ],
    ids=["undeclared-param", "undeclared-variable"],
)
async def test_undeclared_names_are_refused_with_400(
    broker: Broker, body: dict[str, Any], named: str
) -> None:
    answer = await broker.admin("POST", "/data-sources", body)
    assert named in error(answer, 400, "REFUSED")["detail"]
    assert await ok(broker, "GET", "/data-sources") == []


async def test_a_body_that_is_not_json_is_422_at_the_body(broker: Broker) -> None:
    answer = await broker.client.post(
        "/data-sources",
        content=b"{not json",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    assert [d["type"] for d in invalid(answer, "body")] == ["json_invalid"]


# --- lifecycle ----------------------------------------------------------------------------


async def test_put_replaces_a_draft_entirely(broker: Broker) -> None:
    created = await create(
        broker,
        spec(
            description="old",
            metadata={"team": "risk"},
            source={"url": URL, "headers": {"X-Old": "1"}, "timeout": 5},
            caching={"enabled": True, "ttl": 60},
        ),
    )
    sid = created["data_source_id"]
    replaced = await ok(broker, "PUT", f"/data-sources/{sid}", spec("renamed", f"{URL}/v2"))
    assert replaced["data_source_id"] == sid
    assert replaced["created_at"] == created["created_at"]
    assert replaced["status"] == "DRAFT"
    assert replaced["name"] == "renamed"
    assert replaced["description"] is None
    assert replaced["metadata"] is None
    assert replaced["source"] == {
        "url": f"{URL}/v2",
        "method": "GET",
        "headers": {},
        "params": {},
        "response_type": "PLAIN_TEXT",
        **IN_FORCE,
    }
    assert replaced["caching"] == {"enabled": False, "ttl": None}
    assert await ok(broker, "GET", f"/data-sources/{sid}") == replaced


async def test_publish_is_idempotent(broker: Broker) -> None:
    sid = (await create(broker, spec()))["data_source_id"]
    first = await ok(broker, "POST", f"/data-sources/{sid}/publish")
    assert first["status"] == "PUBLISHED"
    assert await ok(broker, "POST", f"/data-sources/{sid}/publish") == first


PUBLISHED_SOURCE = {"url": URL, "headers": {"X-Team": "risk"}}


@pytest.mark.parametrize(
    "change",
    [
        {"description": "now documented"},
        {"caching": {"enabled": True, "ttl": 120}},
        {"source": {**PUBLISHED_SOURCE, "timeout": 3.0}},
        {"source": {**PUBLISHED_SOURCE, "retry": {"max_retries": 2, "backoff_factor": 0.1}}},
        {"retention_days": 760},
    ],
    ids=["description", "caching", "timeout", "retry", "retention"],
)
async def test_published_may_change_what_does_not_change_the_fetch(
    broker: Broker, change: dict[str, Any]
) -> None:
    sid = (await broker.register(spec(source=PUBLISHED_SOURCE)))["data_source_id"]
    path = f"/data-sources/{sid}"
    answer = await ok(broker, "PUT", path, spec(source=PUBLISHED_SOURCE) | change)
    assert answer["status"] == "PUBLISHED"
    assert contains(answer, change)
    assert await ok(broker, "GET", path) == answer


async def test_a_published_source_read_and_written_back_is_unchanged(broker: Broker) -> None:
    """What the engine's SDK does to edit a source: GET it, change a field, PUT it all back,
    the fields shown in force (``body``, ``retry``) included."""
    read = await broker.register(spec(source=PUBLISHED_SOURCE))
    path = f"/data-sources/{read['data_source_id']}"
    back = {k: read[k] for k in ("name", "source", "caching")} | {"description": "edited"}
    written = await ok(broker, "PUT", path, back)
    assert written == read | {
        "description": "edited",
        "last_updated_at": written["last_updated_at"],
    }


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ({**PUBLISHED_SOURCE, "url": f"{URL}/v2"}, ["source.url"]),
        ({**PUBLISHED_SOURCE, "headers": {"X-Team": "ops"}}, ["source.headers"]),
        ({"url": f"{URL}/v2", "timeout": 3.0}, ["source.headers", "source.url"]),
    ],
    ids=["url", "headers", "both"],
)
async def test_published_refuses_changes_to_the_fetch(
    broker: Broker, source: dict[str, Any], fields: list[str]
) -> None:
    published = await broker.register(spec(source=PUBLISHED_SOURCE))
    path = f"/data-sources/{published['data_source_id']}"
    body = error(await broker.admin("PUT", path, spec(source=source)), 400, "REFUSED")
    assert body["fields"] == fields
    assert all(field in body["detail"] for field in fields)
    assert await ok(broker, "GET", path) == published


async def test_delete_removes_a_draft_and_its_variables(broker: Broker, db: AsyncEngine) -> None:
    sid = (await create(broker, WITH_VARIABLES))["data_source_id"]
    await ok(broker, "PUT", f"/data-sources/{sid}/variables", [{"name": "TOKEN", "value": "x"}])
    assert await ok(broker, "DELETE", f"/data-sources/{sid}") == {"data_source_id": sid}
    error(await broker.admin("GET", f"/data-sources/{sid}"), 404, "NOT_FOUND")
    assert await db_values(db) == {}


async def test_delete_archives_a_published_source_which_then_cannot_change(
    broker: Broker,
) -> None:
    sid = (await broker.register(spec()))["data_source_id"]
    assert await ok(broker, "DELETE", f"/data-sources/{sid}") == {"data_source_id": sid}
    assert (await ok(broker, "GET", f"/data-sources/{sid}"))["status"] == "ARCHIVED"
    error(await broker.admin("PUT", f"/data-sources/{sid}", spec()), 400, "CONFLICT")
    error(await broker.admin("POST", f"/data-sources/{sid}/publish"), 400, "CONFLICT")
    assert (await ok(broker, "GET", f"/data-sources/{sid}"))["status"] == "ARCHIVED"


async def test_names_are_unique_among_live_sources(broker: Broker) -> None:
    first = await broker.register(spec("dup"))
    error(await broker.admin("POST", "/data-sources", spec("dup")), 400, "CONFLICT")
    other = (await create(broker, spec("other")))["data_source_id"]
    error(await broker.admin("PUT", f"/data-sources/{other}", spec("dup")), 400, "CONFLICT")

    await ok(broker, "DELETE", f"/data-sources/{first['data_source_id']}")
    again = await create(broker, spec("dup"))
    assert again["data_source_id"] != first["data_source_id"]


@pytest.mark.parametrize("source_id", [SOME_ID, "not-a-uuid"], ids=["unknown", "not-uuid"])
@pytest.mark.parametrize(("method", "path", "body"), ID_ROUTES)
async def test_unknown_source_is_404(
    broker: Broker, source_id: str, method: str, path: str, body: Any
) -> None:
    error(await broker.admin(method, path.format(id=source_id), body), 404, "NOT_FOUND")


# --- variables ----------------------------------------------------------------------------


async def test_variable_values_never_leave_the_store(broker: Broker, db: AsyncEngine) -> None:
    sid = (await create(broker, WITH_VARIABLES))["data_source_id"]
    path = f"/data-sources/{sid}/variables"
    answers = [await broker.admin("PUT", path, [{"name": "TOKEN", "value": CANARY}])]
    answers += [
        await broker.admin(method, route)
        for method, route in [
            ("GET", path),
            ("GET", f"/data-sources/{sid}"),
            ("GET", "/data-sources"),
            ("POST", f"/data-sources/{sid}/publish"),
        ]
    ]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert all(CANARY not in a.text for a in answers)

    listed = answers[1].json()
    assert answers[0].json() == listed
    assert [{k: v[k] for k in ("name", "value", "is_set")} for v in listed] == [
        {"name": "OTHER", "value": None, "is_set": False},
        {"name": "TOKEN", "value": None, "is_set": True},
    ]
    stored = await db_values(db)
    assert stored.keys() == {"TOKEN"}
    assert stored["TOKEN"] and CANARY not in stored["TOKEN"]


async def test_variables_put_is_desired_state(broker: Broker, db: AsyncEngine) -> None:
    sid = (await create(broker, WITH_VARIABLES))["data_source_id"]
    path = f"/data-sources/{sid}/variables"
    await ok(broker, "PUT", path, [{"name": "TOKEN", "value": "a"}, {"name": "OTHER", "value": 1}])
    answer = await ok(broker, "PUT", path, [{"name": "OTHER", "value": 2}])
    assert {v["name"]: v["is_set"] for v in answer} == {"OTHER": True, "TOKEN": False}
    assert (await db_values(db)).keys() == {"OTHER"}


@pytest.mark.parametrize(
    ("items", "status", "named"),
    [
        ([{"name": "NOPE", "value": "x"}], 400, "NOPE"),
        ([{"name": "TOKEN", "value": CANARY}, {"name": "TOKEN", "value": "x"}], 422, "body"),
        ([{"name": "TOKEN", "value": {"nested": CANARY}}], 422, "value"),
        ([{"name": "TOKEN", "value": CANARY, "extra": CANARY}], 422, "extra"),
    ],
    ids=["undeclared", "twice", "nested-value", "unknown-field"],
)
async def test_bad_variables_are_refused_without_echoing_values(
    broker: Broker, db: AsyncEngine, items: list[dict[str, Any]], status: int, named: str
) -> None:
    sid = (await create(broker, WITH_VARIABLES))["data_source_id"]
    answer = await broker.admin("PUT", f"/data-sources/{sid}/variables", items)
    if status == 400:
        assert named in error(answer, 400, "REFUSED")["detail"]
    else:
        assert named in located(invalid(answer, "body"))
    assert CANARY not in answer.text
    assert await db_values(db) == {}


# --- the broker sees admin changes --------------------------------------------------------


async def test_replacing_a_draft_flushes_its_cache(broker: Broker, upstream: Upstream) -> None:
    old = upstream.answer("/old", b"old")
    new = upstream.answer("/new", b"new")
    caching = {"enabled": True, "ttl": 60}
    draft = await broker.register(spec("cached", old, caching=caching), publish=False)

    origins = [(await broker.call("cached")).json() for _ in range(2)]
    assert [(a["origin"], a["value"]) for a in origins] == [("REQUEST", "old"), ("CACHE", "old")]

    await ok(
        broker,
        "PUT",
        f"/data-sources/{draft['data_source_id']}",
        spec("cached", new, caching=caching),
    )
    answer = (await broker.call("cached")).json()
    assert (answer["origin"], answer["value"]) == ("REQUEST", "new")
    assert upstream.hits("/new") == 1


async def test_registry_follows_admin_changes(broker: Broker, upstream: Upstream) -> None:
    url = upstream.answer("/live", b"live")
    # This miss reloads the registry, so misses in the next second do not: only admin changes can.
    missing = await broker.call("live")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "DATA_SOURCE_NOT_FOUND"

    source = spec("live", source={"url": url, "headers": {"X-Token": "{{ env.TOKEN }}"}})
    sid = (await create(broker, source))["data_source_id"]
    unset = await broker.call("live")
    assert unset.status_code == 400, unset.text
    assert unset.json()["error"]["code"] == "MISSING_VARIABLES"

    await ok(broker, "POST", f"/data-sources/{sid}/publish")
    await ok(broker, "PUT", f"/data-sources/{sid}/variables", [{"name": "TOKEN", "value": CANARY}])
    published = await broker.call("live")
    assert published.status_code == 200, published.text
    assert published.json()["value"] == "live"
    assert upstream.received[-1]["headers"]["x-token"] == CANARY

    # The seed resolves archived sources too: policies already relying on one keep working.
    await ok(broker, "DELETE", f"/data-sources/{sid}")
    after = await broker.call("live")
    assert after.status_code == 200, after.text
    assert after.json()["origin"] == "REQUEST"
    assert upstream.hits("/live") == 2


# --- every failure in the contract's shape ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "NOT_FOUND"),
        ("GET", "/data-sources/a/b/c", 404, "NOT_FOUND"),
        ("DELETE", "/data-sources", 405, "METHOD_NOT_ALLOWED"),
        ("PATCH", f"/data-sources/{SOME_ID}", 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/internal/data-broker", 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_no_such_route_or_method_answers_json(
    broker: Broker, method: str, path: str, status: int, code: str
) -> None:
    answer = await broker.admin(method, path)
    assert answer.headers["content-type"] == "application/json"
    error(answer, status, code)


async def test_an_unexpected_failure_answers_500_internal_json(
    broker: Broker, db: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored source this release cannot read (written by hand, or by a newer release):
    the answer and the log say what failed and where, never what it held."""
    sid = (await broker.register(spec()))["data_source_id"]
    async with db.begin() as conn:
        await conn.execute(
            text("UPDATE data_source SET source = :s"), {"s": f'{{"nonsense": "{CANARY}"}}'}
        )
    answer = await broker.admin("PUT", f"/data-sources/{sid}", spec(description="d"))
    assert answer.headers["content-type"] == "application/json"
    assert "ValidationError" in error(answer, 500, "INTERNAL")["detail"]
    logged = [r.getMessage() for r in caplog.records if r.name == "databroker.admin"]
    assert len(logged) == 1 and "ValidationError" in logged[0]
    assert CANARY not in answer.text + caplog.text


async def test_a_database_that_hangs_answers_503_without_holding_the_request(
    settings: Settings, db: AsyncEngine
) -> None:
    """Behind a proxy that stops passing bytes: each admin request ends after the timeouts
    (1 s here; asyncpg alone waits for ever on a statement), as 503 DATABASE_UNAVAILABLE."""
    url = make_url(settings.database_url or "")
    with HangingProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        hanging = settings.model_copy(
            update={
                "database_url": url.set(port=proxy.port).render_as_string(hide_password=False),
                "database_connect_timeout": 1.0,
                "database_command_timeout": 1.0,
            }
        )
        with serve_in_thread(create_app(hanging)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                broker = Broker(base, hanging, client)
                sid = (await broker.register(WITH_VARIABLES, publish=False))["data_source_id"]
                proxy.hang()
                try:
                    for method, path, body in [
                        ("GET", f"/data-sources/{sid}", None),
                        ("GET", "/data-sources", None),
                        ("PUT", f"/data-sources/{sid}/variables", [{"name": "TOKEN", "value": 1}]),
                    ]:
                        answer = await broker.admin(method, path, body)
                        detail = error(answer, 503, "DATABASE_UNAVAILABLE")["detail"]
                        assert "DATABROKER_DATABASE_URL" in detail
                        assert str(proxy.port) not in detail
                finally:
                    proxy.resume()
                assert (await broker.admin("GET", f"/data-sources/{sid}")).status_code == 200


async def test_a_committed_draft_answers_200_and_its_flush_is_retried_until_done(
    settings: Settings, db: AsyncEngine, private_redis: RedisInstance, upstream: Upstream
) -> None:
    """Redis refuses the flush (an ACL without UNLINK): the change is committed, so it
    answers 200 and the registry serves it; the flush happens once Redis allows it."""
    assert ACL_LINE is not None
    rule = shlex.split(ACL_LINE.group(0))
    password = next(r[1:] for r in rule if r.startswith(">"))
    redis = private_redis.client()
    redis.execute_command(*rule, "-unlink")
    as_user = settings.model_copy(
        update={
            "redis_url": f"redis://databroker:{password}@127.0.0.1:{private_redis.port}/0",
            "redis_prefix": "databroker:",
        }
    )
    old, new = upstream.answer("/flush/old", b"old"), upstream.answer("/flush/new", b"new")
    caching = {"enabled": True, "ttl": 600}
    try:
        with serve_in_thread(create_app(as_user)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                broker = Broker(base, as_user, client)
                draft = await broker.register(spec("cached", old, caching=caching), publish=False)
                sid = draft["data_source_id"]
                assert (await broker.call("cached")).json()["value"] == "old"
                entries = redis.keys(f"databroker:cache:{sid}:*")
                assert len(entries) == 1

                # The new URL takes a runtime param: the registry's copy is new once it asks for it.
                changed = spec("cached", new + "?id={{ id }}", caching=caching)
                replaced = await broker.admin("PUT", f"/data-sources/{sid}", changed)
                assert replaced.status_code == 200, replaced.text
                assert replaced.json()["runtime_params"] == ["id"]
                missing = await broker.call("cached")
                assert missing.json()["error"]["code"] == "MISSING_PARAMS", missing.text
                assert redis.keys(f"databroker:cache:{sid}:*") == entries  # owed, not done

                redis.execute_command("ACL", "SETUSER", "databroker", "+unlink")
                await async_wait_for(lambda: not redis.keys(f"databroker:cache:{sid}:*"))
                answer = (await broker.call("cached", {"id": "1"})).json()
                assert (answer["origin"], answer["value"]) == ("REQUEST", "new")
    finally:
        redis.close()
