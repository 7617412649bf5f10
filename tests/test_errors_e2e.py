"""Each error code with its HTTP status, through the running broker."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from proxy.app import create_app
from proxy.keys import KeyLayout
from proxy.openapi import BROKER_RESPONSE
from proxy.routes.internal import PATH, FrontDoor
from proxy.secrets import SecretBox
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue
from tests.conftest import REDIS_URL, Broker, make_settings
from tests.harness import async_wait_for, free_port
from tests.instances import PostgresInstance
from tests.servers import Upstream, serve_in_thread
from tests.test_flow import rows


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"data_source_name": "x", "configured_params": {}}', "run_id"),
        (b'{"data_source_name": "x", "configured_params": {}, "run_id": "nope"}', "run_id"),
        (b'{"data_source_name": 7, "configured_params": {}, "run_id": "%s"}', "data_source_name"),
        (
            b'{"data_source_name": "x", "configured_params": [], "run_id": "%s"}',
            "configured_params",
        ),
        (b'{"data_source_name": "x", "configured_params": {}, "run_id": "%s", "extra": 1}', None),
    ],
)
async def test_invalid_request(broker: Broker, body: bytes, field: str | None) -> None:
    if b"%s" in body:
        body = body % str(uuid.uuid4()).encode()
    answer = await broker.client.post(
        "/internal/data-broker", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    if field is not None:
        assert field in error["message"]


async def test_unknown_name_is_404(broker: Broker) -> None:
    answer = await broker.call("nobody_registered_this")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "DATA_SOURCE_NOT_FOUND"


async def test_params_and_variables_are_checked(broker: Broker, upstream: Upstream) -> None:
    url = upstream.answer("/u/1", b"{}")
    source = await broker.register(
        {
            "name": "checked",
            "source": {
                "url": url.rsplit("/", 1)[0] + "/{{ user_id }}",
                "headers": {
                    "Authorization": "Bearer {{ env.TOKEN }}",
                    "X-Tenant": "{{ env.TENANT }}",
                },
            },
        },
        variables={"TOKEN": "canary-secret-value"},
    )
    missing_vars = await broker.call("checked", {"user_id": "1"})
    assert missing_vars.status_code == 400
    error = missing_vars.json()["error"]
    assert error["code"] == "MISSING_VARIABLES"
    assert error["variables"] == ["TENANT"]
    assert "canary-secret-value" not in missing_vars.text

    sid = source["data_source_id"]
    items = [{"name": "TOKEN", "value": "canary-secret-value"}, {"name": "TENANT", "value": "acme"}]
    assert (await broker.admin("PUT", f"/data-sources/{sid}/variables", items)).status_code == 200

    missing = await broker.call("checked", {})
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "MISSING_PARAMS")
    assert missing.json()["error"]["params"] == ["user_id"]
    unknown = await broker.call("checked", {"user_id": "1", "debug": True})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (400, "UNKNOWN_PARAMS")
    assert unknown.json()["error"]["params"] == ["debug"]

    ok = await broker.call("checked", {"user_id": "1"})
    assert ok.status_code == 200, ok.text
    sent = upstream.received[-1]["headers"]
    assert sent["authorization"] == "Bearer canary-secret-value"
    assert sent["x-tenant"] == "acme"


@pytest.mark.parametrize(
    ("value", "where"),
    [("../../admin", "path"), ("..", "path"), ("a\r\nX-Evil: 1", "header")],
)
async def test_invalid_param(broker: Broker, upstream: Upstream, value: str, where: str) -> None:
    upstream.answer("/files/x", b"{}")
    await broker.register(
        {
            "name": "files",
            "source": {
                "url": f"{upstream.url}/files/{{{{ name }}}}",
                "headers": {"X-Trace": "{{ trace }}"},
            },
            "runtime_params": ["name", "trace"],
        }
    )
    params = {"name": value, "trace": "t"} if where == "path" else {"name": "x", "trace": value}
    answer = await broker.call("files", params)
    if value == "../../admin":
        # Encoded into one segment, it cannot climb: sent (and 404 upstream), not refused.
        assert answer.json()["error"]["upstream_status"] == 404
        assert upstream.received[-1]["raw_path"] == b"/files/..%2F..%2Fadmin"
        return
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "INVALID_PARAM"
    assert error["param"] == ("name" if where == "path" else "trace")
    assert value not in answer.text


async def _slow(_: Request) -> Response:
    await asyncio.sleep(5)
    return Response(b"{}")


@pytest.mark.parametrize(
    ("setup", "code", "extra"),
    [
        ("timeout", "TIMEOUT", {}),
        ("refused", "CONNECTION_ERROR", {}),
        ("status", "HTTP_ERROR", {"upstream_status": 418}),
        ("large", "RESPONSE_TOO_LARGE", {"limit": 64}),
    ],
)
async def test_upstream_failures_are_502(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    setup: str,
    code: str,
    extra: dict[str, Any],
) -> None:
    url = {
        "timeout": lambda: upstream.on("/slow", _slow),
        "refused": lambda: f"http://127.0.0.1:{free_port()}/x",
        "status": lambda: upstream.answer("/teapot", b"no", status=418),
        "large": lambda: upstream.answer("/large", b"x" * 65),
    }[setup]()
    await broker.register(
        {
            "name": "failing",
            "source": {"url": url, "timeout": 0.3, "max_response_bytes": 64},
            "caching": {"enabled": True},
        }
    )
    run_id = uuid.uuid4()
    answer = await broker.call("failing", run_id=run_id)
    assert answer.status_code == 502
    body = answer.json()
    assert body["error"]["code"] == code
    assert extra.items() <= body["error"].items()
    assert body["origin"] == "REQUEST" and body["value"] is None
    audit = await async_wait_for(
        lambda: rows(db, "SELECT error FROM run_data_request WHERE run_id = :r", r=run_id)
    )
    assert audit[0]["error"]["code"] == code


async def test_parse_error_keeps_raw_bytes_and_caches_nothing(
    broker: Broker, upstream: Upstream, db: AsyncEngine, redis_prefix: str
) -> None:
    url = upstream.answer("/broken", b'{"half": ')
    await broker.register(
        {
            "name": "broken",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    answers = [await broker.call("broken") for _ in range(2)]
    assert [a.status_code for a in answers] == [500, 500]
    assert {a.json()["error"]["code"] for a in answers} == {"PARSE_ERROR"}
    assert upstream.hits("/broken") == 2  # nothing was cached
    assert sync_redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}cache:*") == []
    object_id = answers[0].json()["data_object_id"]
    stored = await async_wait_for(
        lambda: rows(
            db, "SELECT value FROM data_object WHERE data_object_id = :i", i=uuid.UUID(object_id)
        )
    )
    assert stored == [{"value": b'{"half": '}]


async def test_retry_counts_through_the_broker(broker: Broker, upstream: Upstream) -> None:
    statuses = iter([503, 502, 200])

    async def flaky(_: Request) -> Response:
        return Response(b'{"ok": 1}', next(statuses), media_type="application/json")

    url = upstream.on("/flaky", flaky)
    await broker.register(
        {
            "name": "flaky",
            "source": {
                "url": url,
                "response_type": "JSON",
                "retry": {"max_retries": 2, "backoff_factor": 0.01},
            },
        }
    )
    answer = await broker.call("flaky")
    assert answer.status_code == 200
    assert answer.json()["value"] == {"ok": 1}
    assert upstream.hits("/flaky") == 3


# --- INTERNAL: whatever raises, the answer is the contract's envelope ----------------------


RESPONSE_FIELDS = set(BROKER_RESPONSE["required"])


async def past_the_index(broker: Broker, name: str) -> httpx.Response:
    """The answer for a name the index lacks, once the index is old enough to be reloaded
    for it (at most once a second): until then it is a plain 404."""

    async def reloaded() -> httpx.Response | None:
        answer = await broker.call(name)
        return None if answer.status_code == 404 else answer

    answer: httpx.Response = await async_wait_for(reloaded, interval=0.2)
    return answer


def internal(answer: httpx.Response) -> dict[str, Any]:
    """The INTERNAL envelope: JSON, the DataBrokerResponse shape, nothing resolved."""
    assert answer.status_code == 500, answer.text
    assert answer.headers["content-type"] == "application/json"
    body: dict[str, Any] = answer.json()
    assert body.keys() == RESPONSE_FIELDS
    assert body["error"]["code"] == "INTERNAL" and body["value"] is None
    return body


@pytest.mark.slow
async def test_an_unknown_name_while_the_database_is_down_is_internal(
    private_pg: PostgresInstance,
    private_pg_url: str,
    redis_prefix: str,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    url = upstream.answer("/up", b'{"up": 1}')
    with serve_in_thread(create_app(make_settings(private_pg_url, redis_prefix, tmp_path))) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            running = Broker(base, make_settings(private_pg_url, redis_prefix, tmp_path), client)
            await running.register({"name": "known", "source": {"url": url}})
            private_pg.stop()
            internal(await past_the_index(running, "unknown"))  # reloading the index fails
            # What the index holds is still served: the outbox keeps its records meanwhile.
            assert (await running.call("known")).status_code == 200


async def test_an_undecryptable_variable_is_internal_and_says_nothing_of_it(
    broker: Broker, db: AsyncEngine, upstream: Upstream
) -> None:
    url = upstream.answer("/up", b'{"up": 1}')
    await broker.register({"name": "known", "source": {"url": url}})
    # A variable written by a sidecar with another key: every reload fails on it.
    foreign = SourceStore(db, SecretBox([Fernet.generate_key().decode()]))
    row = await foreign.create(
        DataSourceSpec.model_validate(
            {"name": "foreign", "source": {"url": url}, "variables": ["KEY"]}
        ),
        None,
    )
    await foreign.set_variables(
        row.data_source_id, [VariableValue(name="KEY", value="hush-42")], None
    )
    # As that sidecar would: announce the change. A reload between its two writes may
    # have served "foreign" without its variable (400 MISSING_VARIABLES) until this one.
    with sync_redis.Redis.from_url(REDIS_URL) as redis:
        redis.publish(KeyLayout(broker.settings.redis_prefix).registry_channel, "foreign")

    async def failing() -> httpx.Response | None:
        answer = await broker.call("foreign")
        return answer if answer.status_code == 500 else None

    body = internal(await async_wait_for(failing, interval=0.2))
    assert "hush-42" not in body["error"]["message"]
    assert (await broker.call("known")).status_code == 200


async def test_a_failure_inside_the_front_door_is_internal() -> None:
    """The route runs past Starlette's error middleware: here the lifespan never ran, so
    there is no broker to hand the request to."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def unreachable(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the broker route never reaches the app behind the front door")

    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "headers": [(b"content-type", b"application/json")],
        "state": {},
    }
    await FrontDoor(unreachable)(scope, receive, send)
    start, body = sent
    assert start["status"] == 500
    assert (b"content-type", b"application/json") in start["headers"]
    answer = orjson.loads(body["body"])
    assert answer.keys() == RESPONSE_FIELDS
    assert answer["error"]["code"] == "INTERNAL"
