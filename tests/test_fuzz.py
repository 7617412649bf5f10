"""Fuzzing the broker's own OpenAPI document against a running broker: no server errors.

schemathesis generates requests from ``proxy.openapi.document()`` — valid ones and,
in negative mode, ones that break the schema — for the broker route and every admin
route, and sends them over a real socket. Any 5xx fails, except a 502 carrying an
upstream code from the broker route: that is the upstream's verdict, not ours.

To get past DATA_SOURCE_NOT_FOUND, part of the broker requests are aimed at sources
registered for the module (their params filled with the generated values, so those
reach the templates and the upstream); part of the id-taking admin requests name a
real draft. Runs are derandomized and bounded, so CI sees the same requests each time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.requests import Request
from starlette.responses import Response

from proxy.openapi import document
from proxy.settings import Settings
from tests.harness import ADMIN_TOKEN
from tests.servers import Upstream

AnyCase = Case[Any]
SCHEMA = schemathesis.openapi.from_dict(document())
BROKER = "/internal/data-broker"
OPERATIONS = [
    (path, method.upper())
    for path, item in document()["paths"].items()
    if path == BROKER or path.startswith("/data-sources")
    for method in item
]
SPEC_BODIES = {
    ("/data-sources", "POST"),
    ("/data-sources/", "POST"),
    ("/data-sources/{data_source_id}", "PUT"),
}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UPSTREAM_VERDICTS = {"TIMEOUT", "CONNECTION_ERROR", "HTTP_ERROR", "RESPONSE_TOO_LARGE"}
# Beyond "no 5xx": every status and body is the documented one, and a request that breaks
# the schema is refused (4xx) — except data source bodies, which pydantic coerces where it
# can (true → 1, "5" → 5) as the reference engine's FastAPI does.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(frozen=True)
class Target:
    url: str
    session: requests.Session
    upstream: Upstream


# Sources the broker requests are aimed at: params in the query, a header and the body;
# a param in the path (mostly 404 upstream: a 502); no params at all.
AIMED: dict[str, dict[str, Any]] = {
    "fuzz_query": {
        "url": "{up}/fuzz?q={{{{ id }}}}",
        "method": "POST",
        "headers": {"X-Id": "{{ id }}"},
        "body": {"id": "{{ id }}", "text": "<{{ id }}>"},
        "response_type": "JSON",
    },
    "fuzz_path": {"url": "{up}/fuzz/{{{{ id }}}}", "response_type": "JSON"},
    "fuzz_plain": {"url": "{up}/fuzz", "response_type": "JSON"},
}


async def _answer(request: Request) -> Response:
    return Response(b'{"ok": true, "n": [1, 2.5, null]}', media_type="application/json")


@pytest.fixture(scope="module")
def target(module_server: tuple[str, Settings], upstream_server: Upstream) -> Iterator[Target]:
    url, _ = module_server
    upstream_server.handlers["/fuzz"] = _answer
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as admin:
        for name, source in AIMED.items():
            spec = {**source, "url": source["url"].format(up=upstream_server.url)}
            sid = _ok(admin.post("/data-sources", json={"name": name, "source": spec}))
            _ok(admin.post(f"/data-sources/{sid}/publish"))
    with requests.Session() as session:
        yield Target(url, session, upstream_server)


def _draft(target: Target) -> str:
    """A fresh draft for the id-taking routes: an earlier test may have replaced or deleted one."""
    draft: dict[str, Any] = {
        "name": f"fuzz_draft_{uuid.uuid4()}",
        "source": {"url": "http://127.0.0.1:9/{{ env.K }}"},
    }
    return _ok(target.session.post(f"{target.url}/data-sources", json=draft, headers=AUTH))


def _ok(answer: httpx.Response | requests.Response) -> str:
    assert answer.status_code == 200, answer.text
    data_source_id: str = answer.json()["data_source_id"]
    return data_source_id


def _aim(drawn: tuple[AnyCase, str | None, bool]) -> AnyCase:
    """Point a generated broker request at a registered source, keeping its other fields,
    or all but the freshness and replay extensions: a negative case spoils any of its
    fields, and one that spoiled only those would otherwise never reach the upstream."""
    case, name, extended = drawn
    if name is None or not isinstance(case.body, dict):
        return case
    params = case.body.get("configured_params")
    value = next(iter(params.values())) if isinstance(params, dict) and params else "x"
    aimed = {} if name == "fuzz_plain" else {"id": value}
    kept = {k: v for k, v in case.body.items() if extended or k not in ("max_age", "replay")}
    case.body = {**kept, "data_source_name": name, "configured_params": aimed}
    return case


def _repair(drawn: tuple[AnyCase, bool]) -> AnyCase:
    """Give a generated data source a reachable url, so some register and reach the store."""
    case, repair = drawn
    body = case.body
    source = body.get("source") if isinstance(body, dict) else None
    if repair and isinstance(body, dict) and isinstance(source, dict):
        case.body = {**body, "source": {**source, "url": "http://127.0.0.1:9/x"}}
    return case


def _strategy(
    path: str, method: str, mode: GenerationMode, draft_id: str
) -> st.SearchStrategy[AnyCase]:
    operation = SCHEMA[path][method]
    generated = operation.as_strategy(generation_mode=mode)
    if path == BROKER:
        names = st.sampled_from([None, *AIMED])
        return st.tuples(generated, names, st.booleans()).map(_aim)
    if "{data_source_id}" in path:
        fixed = {"data_source_id": draft_id}
        generated |= operation.as_strategy(generation_mode=mode, path_parameters=fixed)
    if (path, method) in SPEC_BODIES:
        generated = st.tuples(generated, st.booleans()).map(_repair)
    return generated


def _check(case: AnyCase, response: Any) -> None:
    if case.operation.path == BROKER and response.status_code == 502:
        assert response.json()["error"]["code"] in UPSTREAM_VERDICTS, response.text
        return
    lenient = (case.operation.path, case.operation.method.upper()) in SPEC_BODIES
    case.validate_response(
        response, checks=CHECKS if lenient else [*CHECKS, negative_data_rejection]
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_no_server_errors(target: Target, path: str, method: str, mode: GenerationMode) -> None:
    statuses: list[int] = []
    upstream_hits = len(target.upstream.received)

    @FUZZ
    @given(case=_strategy(path, method, mode, _draft(target)))
    def fuzz(case: AnyCase) -> None:
        response = case.call(base_url=target.url, session=target.session, headers=AUTH, timeout=30)
        statuses.append(response.status_code)
        _check(case, response)

    fuzz()
    # The fuzzing reached the broker, and not only its refusals.
    assert len(statuses) >= 10
    if mode == GenerationMode.POSITIVE and path in (BROKER, "/data-sources"):
        assert 200 in statuses, statuses
    if path == BROKER:
        assert len(target.upstream.received) > upstream_hits


def test_the_fuzzed_document_is_the_served_one(target: Target) -> None:
    """What was fuzzed is what clients read at /openapi.json."""
    assert target.session.get(f"{target.url}/openapi.json").json() == document()
