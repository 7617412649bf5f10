"""The engine's own client, generated from its OpenAPI, drives a real ``databroker serve``.

A worker or SDK written for the engine must work against us unchanged (DESIGN.md, "The whole
engine API"). So, as an engine user would, the session generates a Python client with
openapi-python-client from ``tests/reference/lineart-data-api.openapi.json`` — a copy of
``../shared/reference/lineart-data-api.openapi.json`` kept in the repo, because CI runs on a
clean clone of this repo alone — into a temporary directory (never committed), once per
session, offline: the reference is a local file, and every proxy variable points at a closed
port so a fetch would fail. The generated package is imported and called as is, with its
``raise_on_unexpected_status`` on: a status the reference does not declare raises, as the
engine's SDK does.

Every one of the reference's 17 operations has its success path and the error paths the
reference declares: 404 with a ``{"detail"}`` body, and 422 parsed by the generated
``HTTPValidationError`` (FastAPI's ``detail`` list). The broker route keeps DESIGN.md's own
codes (400 ``INVALID_REQUEST``, 404 ``DATA_SOURCE_NOT_FOUND``), which win over the reference.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import REDIS_URL
from tests.harness import (
    ADMIN_TOKEN,
    START_DEADLINE,
    drop_prefix,
    free_port,
    sidecar_env,
    wait_for,
)
from tests.instances import databroker, log_of
from tests.servers import Upstream

REFERENCE = Path(__file__).parent / "reference" / "lineart-data-api.openapi.json"
PACKAGE = "lineart_reference_client"
# Recognisable values that must never come back in an answer.
SECRET = "sdk-canary-variable-5b1e"
OTHER_SECRET = "sdk-canary-override-93c7"
CLIENT_SECRET = "sdk-canary-credential-0d4f"
MASK = "********"
ANSWER = {"id": "42", "name": "Ada Lovelace", "score": 710}
CACHED = {"caching": {"enabled": True, "ttl": 600}}

# Starts `databroker serve` (and the generator).
pytestmark = pytest.mark.slow


# --- the generated client ---------------------------------------------------------------


def _operations() -> dict[str, str]:
    """operationId -> the generated module that calls it (``api.<tag>.<operationId>``)."""
    reference = json.loads(REFERENCE.read_text())
    return {
        op["operationId"]: f"{PACKAGE}.api.{op['tags'][0].replace('-', '_')}.{op['operationId']}"
        for path in reference["paths"].values()
        for op in path.values()
    }


@pytest.fixture(scope="session")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The generated client: its models, errors, client classes and one module per operation."""
    root = tmp_path_factory.mktemp("engine_sdk")
    config = root / "openapi-python-client.yaml"
    # No post hooks: formatting the generated code is not what is under test.
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    # Every proxy variable points at a closed port: a generator that tried to fetch would fail.
    closed = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = closed
    generated = subprocess.run(
        [
            *(sys.executable, "-m", "openapi_python_client", "generate"),
            *("--path", str(REFERENCE), "--output-path", str(root / PACKAGE)),
            *("--meta", "none", "--config", str(config)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(root))
    try:
        ops = {op: importlib.import_module(module) for op, module in _operations().items()}
        package = {
            part: importlib.import_module(f"{PACKAGE}.{part}")
            for part in ("client", "errors", "models")
        }
    finally:
        sys.path.remove(str(root))
    return SimpleNamespace(
        **ops,
        models=package["models"],
        errors=package["errors"],
        Client=package["client"].Client,
        AuthenticatedClient=package["client"].AuthenticatedClient,
    )


# --- the broker, as a user runs it ------------------------------------------------------


@pytest.fixture(scope="module")
def served(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``databroker serve`` on the test database and Redis; its base URL.

    One process for the module; its tests name their sources uniquely."""
    cwd = tmp_path_factory.mktemp("engine_sdk_serve")
    prefix = f"dbtest:{uuid.uuid4().hex[:12]}:"
    env = sidecar_env(
        pg_url, REDIS_URL, cwd / "outbox", redis_prefix=prefix, outbox_flush_interval="0.05"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"databroker exited early:\n{log_of(cwd)}"
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        with databroker(["serve", "--port", str(port)], env, cwd) as process:
            wait_for(healthy, timeout=START_DEADLINE, interval=0.05)
            yield url
    finally:
        drop_prefix(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def admin(sdk: SimpleNamespace, served: str) -> Iterator[Any]:
    """The generated client with the admin token, raising on any undeclared status."""
    client = sdk.AuthenticatedClient(
        base_url=served,
        token=ADMIN_TOKEN,
        raise_on_unexpected_status=True,
        timeout=httpx.Timeout(30.0),
    )
    with client:
        yield client


@pytest.fixture(scope="module")
def worker(sdk: SimpleNamespace, served: str) -> Iterator[Any]:
    """The generated client as a worker holds it: no token (the broker route needs none)."""
    with sdk.Client(
        base_url=served, raise_on_unexpected_status=True, timeout=httpx.Timeout(30.0)
    ) as client:
        yield client


# --- helpers ----------------------------------------------------------------------------


def ok(response: Any, model: Any = None) -> Any:
    """The parsed body of a 200 (of ``model`` when given)."""
    assert response.status_code == 200, response.content
    if model is not None:
        assert isinstance(response.parsed, model), response.parsed
    return response.parsed


def not_found(response: Any) -> dict[str, Any]:
    """A 404 answers ``{"detail": …}``, as the reference's routes do."""
    assert response.status_code == 404, response.content
    body: dict[str, Any] = json.loads(response.content)
    assert body["detail"]
    return body


def invalid(sdk: SimpleNamespace, response: Any, where: str) -> list[Any]:
    """A 422 parsed as the generated ``HTTPValidationError``; ``loc`` starts at ``where``."""
    assert response.status_code == 422, response.content
    assert isinstance(response.parsed, sdk.models.HTTPValidationError), response.parsed
    details: list[Any] = response.parsed.detail
    assert details, response.content
    for detail in details:
        assert isinstance(detail, sdk.models.ValidationError)
        assert detail.loc[0] == where, detail.loc
        assert detail.msg and detail.type_
    return details


def unknown_id() -> str:
    return str(uuid.uuid4())


def today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def create(sdk: SimpleNamespace, admin: Any, source: dict[str, Any], **spec: Any) -> Any:
    """Create a uniquely named source; the stored DataSource."""
    body = sdk.models.DataSourceSpec.from_dict(
        {"name": f"sdk_{uuid.uuid4().hex[:12]}", "source": source, **spec}
    )
    return ok(sdk.create_data_source.sync_detailed(client=admin, body=body), sdk.models.DataSource)


def user_source(upstream: Upstream, **source: Any) -> dict[str, Any]:
    """A JSON source at a fresh upstream path, ``{{ user_id }}`` in its URL.

    User 42 answers ``ANSWER``, user 7 ``[1, 2]``, user 13 a 500."""
    base = f"/sdk/{uuid.uuid4().hex}"
    upstream.answer(f"{base}/42", json.dumps(ANSWER))
    upstream.answer(f"{base}/7", "[1, 2]")
    upstream.answer(f"{base}/13", "down", status=500, content_type="text/plain")
    return {"url": f"{upstream.url}{base}/{{{{ user_id }}}}", "response_type": "JSON", **source}


def published(sdk: SimpleNamespace, admin: Any, source: dict[str, Any], **spec: Any) -> Any:
    created = create(sdk, admin, source, **spec)
    return ok(
        sdk.publish_data_source.sync_detailed(str(created.data_source_id), client=admin),
        sdk.models.DataSource,
    )


def ask(sdk: SimpleNamespace, worker: Any, name: str, params: dict[str, Any]) -> Any:
    """``POST /internal/data-broker`` through the generated client; the raw Response."""
    body = sdk.models.DataBrokerRequest.from_dict(
        {"data_source_name": name, "configured_params": params, "run_id": str(uuid.uuid4())}
    )
    return sdk.request_data_from_broker.sync_detailed(client=worker, body=body)


def set_variables(sdk: SimpleNamespace, admin: Any, source_id: str, **values: Any) -> Any:
    items = [sdk.models.DataSourceEnvVarBase(name=k, value=v) for k, v in values.items()]
    return sdk.set_data_source_env_variables.sync_detailed(source_id, client=admin, body=items)


def keyed_source(upstream: Upstream, **source: Any) -> dict[str, Any]:
    """A source whose API key is a variable, in a header and in the query."""
    return user_source(
        upstream,
        headers={"X-Api-Key": "{{ env.API_KEY }}"},
        params={"key": "{{ env.API_KEY }}"},
        **source,
    )


# --- create, list, get, update, delete, publish --------------------------------------------


def test_create_answers_the_stored_draft(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    source = create(sdk, admin, user_source(upstream), **CACHED, description="users")
    assert source.status == sdk.models.DataSourceStatus.DRAFT
    assert isinstance(source.data_source_id, uuid.UUID)
    assert isinstance(source.source, sdk.models.HTTPSource)
    assert source.source.url.endswith("/{{ user_id }}")
    assert source.runtime_params == ["user_id"]
    assert source.description == "users"
    assert source.caching.enabled is True


def test_a_source_carries_the_fields_the_engine_always_sends(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    source = create(sdk, admin, {"url": f"{upstream.url}/plain"})
    assert isinstance(source.source.body, sdk.models.HTTPSourceBody)
    assert source.source.body.to_dict() == {}
    assert isinstance(source.source.retry, sdk.models.RetryPolicy)
    assert isinstance(source.source.retry.max_retries, int)
    for stamp in (source.created_at, source.last_updated_at):
        assert stamp.utcoffset() == datetime.timedelta(0)


def test_create_accepts_source_auth(sdk: SimpleNamespace, admin: Any, upstream: Upstream) -> None:
    auth = {
        "method": "bearer",
        "token_url": f"{upstream.url}/token",
        "grant_type": "client_credentials",
        "scope": "api.read api.write",
    }
    source = create(sdk, admin, user_source(upstream, auth=auth))
    assert isinstance(source.source.auth, sdk.models.AuthConfig)
    assert source.source.auth.method == sdk.models.AuthMethod.BEARER
    assert source.source.auth.grant_type == sdk.models.GrantType.CLIENT_CREDENTIALS
    assert source.source.auth.scope == "api.read api.write"


def test_create_refuses_a_bad_spec_with_422(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    body = sdk.models.DataSourceSpec.from_dict(
        {"name": "sdk_bad_timeout", "source": user_source(upstream, timeout="soon")}
    )
    details = invalid(sdk, sdk.create_data_source.sync_detailed(client=admin, body=body), "body")
    assert any("timeout" in detail.loc for detail in details)


def test_list_finds_sources_by_status(sdk: SimpleNamespace, admin: Any, upstream: Upstream) -> None:
    draft = create(sdk, admin, user_source(upstream))
    live = published(sdk, admin, user_source(upstream))
    every = ok(sdk.list_data_sources.sync_detailed(client=admin), list)
    assert {draft.data_source_id, live.data_source_id} <= {s.data_source_id for s in every}
    assert all(isinstance(s, sdk.models.DataSource) for s in every)
    only = ok(sdk.list_data_sources.sync_detailed(client=admin, status="PUBLISHED"), list)
    assert live.data_source_id in {s.data_source_id for s in only}
    assert {s.status for s in only} == {sdk.models.DataSourceStatus.PUBLISHED}


def test_list_status_filter_is_case_insensitive(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    live = published(sdk, admin, user_source(upstream))
    only = ok(sdk.list_data_sources.sync_detailed(client=admin, status="published"), list)
    assert live.data_source_id in {s.data_source_id for s in only}
    assert {s.status for s in only} == {sdk.models.DataSourceStatus.PUBLISHED}


def test_list_refuses_a_bad_query_with_422(sdk: SimpleNamespace, admin: Any) -> None:
    answer = sdk.list_data_sources.sync_detailed(client=admin, include_archived="maybe")
    invalid(sdk, answer, "query")


def test_get_answers_the_source_or_404(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    source = create(sdk, admin, user_source(upstream))
    again = ok(
        sdk.get_data_source.sync_detailed(str(source.data_source_id), client=admin),
        sdk.models.DataSource,
    )
    assert again.to_dict() == source.to_dict()
    not_found(sdk.get_data_source.sync_detailed(unknown_id(), client=admin))
    not_found(sdk.get_data_source.sync_detailed("not-a-uuid", client=admin))


def test_update_replaces_a_draft_or_404(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    source = create(sdk, admin, user_source(upstream))
    spec = sdk.models.DataSourceSpec.from_dict(
        {"name": source.name, "source": source.source.to_dict(), "description": "changed"}
    )
    sid = str(source.data_source_id)
    updated = ok(
        sdk.update_data_source.sync_detailed(sid, client=admin, body=spec), sdk.models.DataSource
    )
    assert updated.description == "changed"
    assert updated.data_source_id == source.data_source_id
    not_found(sdk.update_data_source.sync_detailed(unknown_id(), client=admin, body=spec))


def test_update_refuses_a_bad_spec_with_422(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    source = create(sdk, admin, user_source(upstream))
    spec = sdk.models.DataSourceSpec.from_dict(
        {"name": source.name, "source": user_source(upstream, retry={"max_retries": "many"})}
    )
    answer = sdk.update_data_source.sync_detailed(
        str(source.data_source_id), client=admin, body=spec
    )
    invalid(sdk, answer, "body")


def test_delete_removes_a_draft_or_404(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    sid = str(create(sdk, admin, user_source(upstream)).data_source_id)
    assert ok(sdk.delete_data_source.sync_detailed(sid, client=admin)) == {"data_source_id": sid}
    not_found(sdk.get_data_source.sync_detailed(sid, client=admin))
    not_found(sdk.delete_data_source.sync_detailed(sid, client=admin))


def test_delete_archives_a_published_source(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    sid = str(published(sdk, admin, user_source(upstream)).data_source_id)
    assert ok(sdk.delete_data_source.sync_detailed(sid, client=admin)) == {"data_source_id": sid}
    listed = ok(sdk.list_data_sources.sync_detailed(client=admin, include_archived=True), list)
    assert {str(s.data_source_id): s.status for s in listed}[sid] == (
        sdk.models.DataSourceStatus.ARCHIVED
    )


def test_publish_is_idempotent_or_404(sdk: SimpleNamespace, admin: Any, upstream: Upstream) -> None:
    sid = str(create(sdk, admin, user_source(upstream)).data_source_id)
    for _ in range(2):
        source = ok(sdk.publish_data_source.sync_detailed(sid, client=admin), sdk.models.DataSource)
        assert source.status == sdk.models.DataSourceStatus.PUBLISHED
    not_found(sdk.publish_data_source.sync_detailed(unknown_id(), client=admin))


# --- variables and credentials -----------------------------------------------------------


def test_variables_are_set_and_listed_without_their_values(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    sid = str(create(sdk, admin, keyed_source(upstream)).data_source_id)
    answer = set_variables(sdk, admin, sid, API_KEY=SECRET)
    ok(answer)
    assert SECRET.encode() not in answer.content
    listed = sdk.get_data_source_env_variables.sync_detailed(sid, client=admin)
    variables = ok(listed, list)
    assert [v.name for v in variables] == ["API_KEY"]
    assert all(isinstance(v, sdk.models.DataSourceEnvVar) for v in variables)
    assert SECRET.encode() not in listed.content
    not_found(set_variables(sdk, admin, unknown_id(), API_KEY=SECRET))
    not_found(sdk.get_data_source_env_variables.sync_detailed(unknown_id(), client=admin))


def credential(sdk: SimpleNamespace, kind: str, value: Any) -> Any:
    return sdk.models.DataSourceCredentialBase(
        credential_type=sdk.models.DataSourceCredentialBaseCredentialType(kind), value=value
    )


def test_credentials_are_stored_and_answered_masked(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    # As in the engine, credentials may be stored before the source's auth uses them.
    sid = str(create(sdk, admin, user_source(upstream)).data_source_id)
    body = [
        credential(sdk, "CLIENT_ID", "sdk-client"),
        credential(sdk, "CLIENT_SECRET", CLIENT_SECRET),
    ]
    stored = sdk.set_data_source_credentials.sync_detailed(sid, client=admin, body=body)
    read = sdk.get_data_source_credentials.sync_detailed(sid, client=admin)
    for answer in (stored, read):
        credentials = ok(answer, list)
        assert CLIENT_SECRET.encode() not in answer.content
        assert sorted(c.credential_type.value for c in credentials) == [
            "CLIENT_ID",
            "CLIENT_SECRET",
        ]
        for c in credentials:
            assert isinstance(c, sdk.models.DataSourceCredential)
            assert c.value == MASK
            assert str(c.data_source_id) == sid
            assert isinstance(c.credential_id, uuid.UUID)
            assert c.created_at.utcoffset() is not None
    not_found(sdk.set_data_source_credentials.sync_detailed(unknown_id(), client=admin, body=body))
    not_found(sdk.get_data_source_credentials.sync_detailed(unknown_id(), client=admin))


@pytest.mark.parametrize(
    ("operation", "item"),
    [
        pytest.param(
            "set_data_source_env_variables",
            lambda sdk: sdk.models.DataSourceEnvVarBase(name=None, value=SECRET),
            id="variable without a name",
        ),
        pytest.param(
            "set_data_source_credentials",
            lambda sdk: credential(sdk, "CLIENT_SECRET", [SECRET]),
            id="credential value not a string",
        ),
    ],
)
def test_a_bad_item_is_refused_with_422_without_its_value(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream, operation: str, item: Any
) -> None:
    sid = str(create(sdk, admin, keyed_source(upstream)).data_source_id)
    answer = getattr(sdk, operation).sync_detailed(sid, client=admin, body=[item(sdk)])
    invalid(sdk, answer, "body")
    assert SECRET.encode() not in answer.content


# --- the broker route ----------------------------------------------------------------------


def test_broker_answers_from_the_upstream_then_the_cache(
    sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream
) -> None:
    source = published(sdk, admin, user_source(upstream), **CACHED)
    first = ok(ask(sdk, worker, source.name, {"user_id": "42"}), sdk.models.DataBrokerResponse)
    second = ok(ask(sdk, worker, source.name, {"user_id": "42"}), sdk.models.DataBrokerResponse)
    assert first.origin == sdk.models.DataObjectOrigin.REQUEST
    assert second.origin == sdk.models.DataObjectOrigin.CACHE
    assert first.data_object_id == second.data_object_id
    assert first.key == second.key
    assert first.value == second.value == ANSWER
    assert isinstance(first.start_time, float) and isinstance(first.end_time, float)
    assert second.start_time is None and first.error is None


def test_broker_errors_keep_design_codes(
    sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream
) -> None:
    missing = ask(sdk, worker, f"sdk_missing_{uuid.uuid4().hex[:8]}", {})
    assert missing.status_code == 404
    assert json.loads(missing.content)["error"]["code"] == "DATA_SOURCE_NOT_FOUND"
    # DESIGN.md: a body that is not the request shape is 400 INVALID_REQUEST, not the
    # reference's 422, so the generated client raises on it as on any undeclared status.
    source = published(sdk, admin, user_source(upstream))
    body = sdk.models.DataBrokerRequest.from_dict(
        {"data_source_name": source.name, "configured_params": {}, "run_id": "not-a-uuid"}
    )
    with pytest.raises(sdk.errors.UnexpectedStatus) as refused:
        sdk.request_data_from_broker.sync_detailed(client=worker, body=body)
    assert refused.value.status_code == 400
    assert json.loads(refused.value.content)["error"]["code"] == "INVALID_REQUEST"


# --- data objects --------------------------------------------------------------------------


def listed_objects(sdk: SimpleNamespace, admin: Any, sid: str) -> list[Any]:
    """The source's objects; fails at once on anything but a 200, so no wait is spent on it."""
    return list(ok(sdk.list_data_objects.sync_detailed(sid, client=admin), list))


def test_objects_are_listed_newest_first_and_read_formatted(
    sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream
) -> None:
    source = published(sdk, admin, user_source(upstream), **CACHED)
    sid = str(source.data_source_id)
    older = ok(ask(sdk, worker, source.name, {"user_id": "42"}))
    newer = ok(ask(sdk, worker, source.name, {"user_id": "7"}))
    ok(ask(sdk, worker, source.name, {"user_id": "42"}))  # a hit stores no object
    objects = wait_for(
        lambda: (found := listed_objects(sdk, admin, sid)) and len(found) == 2 and found
    )
    assert [o.data_object_id for o in objects] == [newer.data_object_id, older.data_object_id]
    assert [o.key for o in objects] == [newer.key, older.key]
    for meta in objects:
        assert isinstance(meta, sdk.models.DataObjectMetadata)
        assert str(meta.data_source_id) == sid and meta.created_at.utcoffset() is not None
    read = sdk.get_data_object.sync_detailed(sid, str(older.data_object_id), client=admin)
    obj = ok(read, sdk.models.DataObject)
    assert obj.value == ANSWER and obj.key == older.key and str(obj.data_source_id) == sid
    not_found(sdk.get_data_object.sync_detailed(sid, unknown_id(), client=admin))
    not_found(sdk.list_data_objects.sync_detailed(unknown_id(), client=admin))


def test_an_object_is_only_found_under_its_own_source(
    sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream
) -> None:
    source = published(sdk, admin, user_source(upstream))
    other = str(create(sdk, admin, user_source(upstream)).data_source_id)
    fetched = ok(ask(sdk, worker, source.name, {"user_id": "42"}))
    sid = str(source.data_source_id)
    wait_for(lambda: listed_objects(sdk, admin, sid))
    oid = str(fetched.data_object_id)
    not_found(sdk.get_data_object.sync_detailed(other, oid, client=admin))
    not_found(sdk.get_data_object.sync_detailed(unknown_id(), oid, client=admin))


# --- analytics -----------------------------------------------------------------------------


def by_date(parsed: Any, series: str) -> dict[str, float]:
    """One of an analytics answer's series as ``{date: value}``."""
    points = parsed[series]
    assert all(set(p) >= {"date", "value"} for p in points), points
    return {p["date"]: p["value"] for p in points}


@pytest.fixture
def analysed(sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream) -> str:
    """The id of a source called 4 times today: 1 upstream success, 2 hits, 1 upstream failure.

    By the engine's definitions: usage 4; hit ratio CACHE / (CACHE + REQUEST) = 2/4 = 50 %;
    error rate over the upstream calls = 1/2 = 50 %; latency over the 2 upstream calls.
    """
    source = published(sdk, admin, user_source(upstream), **CACHED)
    for _ in range(3):
        ok(ask(sdk, worker, source.name, {"user_id": "42"}))
    with pytest.raises(sdk.errors.UnexpectedStatus) as failed:
        ask(sdk, worker, source.name, {"user_id": "13"})
    assert failed.value.status_code == 502
    sid = str(source.data_source_id)

    def recorded() -> bool:
        usage = ok(sdk.get_data_source_usage.sync_detailed(sid, client=admin))
        return by_date(usage, "requests_by_date").get(today()) == 4

    wait_for(recorded)
    return sid


def test_usage_counts_requests_per_day(sdk: SimpleNamespace, admin: Any, analysed: str) -> None:
    sid = analysed
    day = datetime.date.fromisoformat(today())
    for window in ({}, {"start_date": day, "end_date": day}):
        usage = ok(sdk.get_data_source_usage.sync_detailed(sid, client=admin, **window))
        assert by_date(usage, "requests_by_date")[today()] == 4
    before = {
        "start_date": day - datetime.timedelta(days=3),
        "end_date": day - datetime.timedelta(days=1),
    }
    usage = ok(sdk.get_data_source_usage.sync_detailed(sid, client=admin, **before))
    assert not any(by_date(usage, "requests_by_date").values())


def test_metrics_and_cache_stats_give_latency_and_percentages_per_day(
    sdk: SimpleNamespace, admin: Any, analysed: str
) -> None:
    metrics = ok(sdk.get_data_source_metrics.sync_detailed(analysed, client=admin))
    stats = ok(sdk.get_cache_statistics.sync_detailed(analysed, client=admin))
    assert by_date(metrics, "error_rate_by_date")[today()] == pytest.approx(50.0, abs=0.01)
    assert by_date(stats, "cache_hit_ratio_by_date")[today()] == pytest.approx(50.0, abs=0.01)
    assert 0 < by_date(metrics, "avg_response_time_by_date")[today()] < 30_000  # ms


@pytest.mark.parametrize(
    "operation", ["get_data_source_usage", "get_data_source_metrics", "get_cache_statistics"]
)
def test_analytics_refuse_a_bad_date_with_422_or_404(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream, operation: str
) -> None:
    route = getattr(sdk, operation)
    sid = str(create(sdk, admin, user_source(upstream)).data_source_id)
    details = invalid(sdk, route.sync_detailed(sid, client=admin, start_date="yesterday"), "query")
    assert any("start_date" in detail.loc for detail in details)
    not_found(route.sync_detailed(unknown_id(), client=admin))


# --- test a source -------------------------------------------------------------------------


def test_test_runs_the_real_request_and_masks_secrets(
    sdk: SimpleNamespace, admin: Any, worker: Any, upstream: Upstream
) -> None:
    source = published(sdk, admin, keyed_source(upstream), **CACHED)
    ok(set_variables(sdk, admin, sid := str(source.data_source_id), API_KEY=SECRET))
    for env_vars, sent in (({}, SECRET), ({"API_KEY": OTHER_SECRET}, OTHER_SECRET)):
        body = sdk.models.DataSourceTestParams.from_dict(
            {"params": {"user_id": "42"}, "env_vars": env_vars}
        )
        answer = sdk.data_source_test_by_id.sync_detailed(sid, client=admin, body=body)
        result = ok(answer, sdk.models.DataSourceTestResponse)
        assert result.status_code == 200 and result.error is None
        assert result.response_body.to_dict() == ANSWER
        assert isinstance(result.test_id, uuid.UUID) and result.response_time_ms >= 0
        assert "***" in result.request_url
        headers = {k.lower(): v for k, v in result.request_headers.to_dict().items()}
        assert headers["x-api-key"] == "***"
        assert SECRET.encode() not in answer.content
        assert OTHER_SECRET.encode() not in answer.content
        assert upstream.received[-1]["headers"]["x-api-key"] == sent  # the real value went out
    # Neither the cache nor the objects saw the tests.
    assert ok(ask(sdk, worker, source.name, {"user_id": "42"})).origin.value == "REQUEST"
    wait_for(lambda: listed_objects(sdk, admin, sid))
    assert len(listed_objects(sdk, admin, sid)) == 1


def test_test_reports_an_upstream_timeout_as_408(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    # The upstream never answers until the test is over: each held request's event, on the
    # upstream server's own loop, is set at the end.
    held: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def hang(_: Request) -> Response:
        released = asyncio.Event()
        held.append((asyncio.get_running_loop(), released))
        await released.wait()
        return Response(b"{}", media_type="application/json")

    url = upstream.on(f"/sdk/{uuid.uuid4().hex}/slow", hang)
    sid = str(
        create(sdk, admin, {"url": url, "response_type": "JSON", "timeout": 1}).data_source_id
    )
    try:
        body = sdk.models.DataSourceTestParams.from_dict({})
        answer = sdk.data_source_test_by_id.sync_detailed(sid, client=admin, body=body)
        # As the engine: the test answers 200 and reports the timeout in its body (the
        # engine's SDK would raise on an HTTP 408, which the reference does not declare).
        result = ok(answer, sdk.models.DataSourceTestResponse)
        assert result.status_code == 408
        assert "time" in result.error.lower()
    finally:
        for loop, released in held:
            loop.call_soon_threadsafe(released.set)


def test_test_refuses_params_that_are_not_an_object_with_422_or_404(
    sdk: SimpleNamespace, admin: Any, upstream: Upstream
) -> None:
    sid = str(create(sdk, admin, user_source(upstream)).data_source_id)
    body = sdk.models.DataSourceTestParams.from_dict({"params": ["user_id", "42"]})
    invalid(sdk, sdk.data_source_test_by_id.sync_detailed(sid, client=admin, body=body), "body")
    empty = sdk.models.DataSourceTestParams.from_dict({})
    not_found(sdk.data_source_test_by_id.sync_detailed(unknown_id(), client=admin, body=empty))


# --- our own description --------------------------------------------------------------------


def test_our_openapi_lists_every_reference_operation(served: str) -> None:
    reference = json.loads(REFERENCE.read_text())["paths"]
    ours = httpx.get(f"{served}/openapi.json").json()["paths"]

    def operations(paths: dict[str, Any]) -> set[tuple[str, str]]:
        return {
            (method.upper(), path.rstrip("/"))
            for path, item in paths.items()
            for method in item
            if method in {"get", "put", "post", "delete"}
        }

    assert operations(reference) <= operations(ours)
