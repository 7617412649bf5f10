"""Hostile requests against the running broker: each is a 4xx with a stable code, never a 500.

The broker route answers 400 INVALID_REQUEST (or the param codes once a source
resolved); the admin routes answer 422 VALIDATION_ERROR, and 413 BODY_TOO_LARGE
past the size cap. Every case goes over a
real socket, so uvicorn's own handling of the bytes is part of what is proven.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from proxy.routes.bodies import MAX_BODY_BYTES
from tests.conftest import Broker
from tests.harness import ADMIN_TOKEN
from tests.servers import Upstream

BROKER = "/internal/data-broker"
JSON = "application/json"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SOURCE = "hostile_requests"


def request(**over: Any) -> dict[str, Any]:
    return {
        "data_source_name": SOURCE,
        "configured_params": {"id": "1", "q": "a", "h": "b", "b": "c"},
        "run_id": str(uuid.uuid4()),
        **over,
    }


def raw(**over: Any) -> bytes:
    return orjson.dumps(request(**over))


def nested(depth: int) -> bytes:
    """A JSON list ``depth`` levels deep (past what orjson writes, within what it reads)."""
    return b"[" * depth + b'"leaf"' + b"]" * depth


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A body sent chunked: no Content-Length for the server to refuse it by."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b" " * piece
        sent += piece


@pytest.fixture
async def hostile(shared_broker: Broker, upstream: Upstream) -> Broker:
    """A published source using a runtime param in the path, the query, a header and the body."""
    upstream.answer("/h/1", b'{"ok": true}')
    listed = await shared_broker.admin("GET", "/data-sources")
    if SOURCE in {source["name"] for source in listed.json()}:
        return shared_broker
    await shared_broker.register(
        {
            "name": SOURCE,
            "source": {
                "url": f"{upstream.url}/h/{{{{ id }}}}?q={{{{ q }}}}",
                "method": "POST",
                "headers": {"X-H": "{{ h }}"},
                "body": {"b": "{{ b }}"},
                "response_type": "JSON",
            },
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    return shared_broker


# Each: a body and its Content-Type (None: no header at all).
BROKER_CASES: dict[str, tuple[bytes, str | None]] = {
    "empty": (b"", JSON),
    "not-json": (b"{not json", JSON),
    "array": (b"[1, 2]", JSON),
    "deep-array-100k": (b"[" * 100_000, JSON),
    "deep-object-100k": (b'{"a":' * 100_000, JSON),
    "deep-params-500": (raw().replace(b'"1"', nested(500)), JSON),
    "deep-params-70": (raw().replace(b'"1"', nested(70)), JSON),
    "non-utf8": (raw().replace(b'"a"', b'"\xff\xfe"'), JSON),
    "utf16": (orjson.dumps(request()).decode().encode("utf-16"), JSON),
    "lone-surrogate": (raw().replace(b'"a"', b'"\\ud800"'), JSON),
    "nan": (raw().replace(b'"a"', b"NaN"), JSON),
    "infinity": (raw().replace(b'"a"', b"Infinity"), JSON),
    "overflowing-number": (raw().replace(b'"a"', b"1e400"), JSON),
    "duplicate-key": (raw()[:-1] + b',"data_source_name":"other"}', JSON),
    "duplicate-param": (raw().replace(b'{"id":"1"', b'{"id":"1","id":"2"'), JSON),
    "unknown-field": (raw(debug=True), JSON),
    "null-run-id": (raw(run_id=None), JSON),
    "form": (b"data_source_name=hostile&run_id=1", "application/x-www-form-urlencoded"),
    "form-with-json-body": (raw(), "application/x-www-form-urlencoded"),
    "text-with-json-body": (raw(), "text/plain"),
    "no-content-type": (raw(), None),
    "multipart": (raw(), "multipart/form-data; boundary=x"),
}


@pytest.mark.parametrize("case", list(BROKER_CASES))
async def test_broker_refuses_hostile_bodies(
    hostile: Broker, upstream: Upstream, case: str
) -> None:
    body, content_type = BROKER_CASES[case]
    headers = {} if content_type is None else {"content-type": content_type}
    answer = await hostile.client.post(BROKER, content=body, headers=headers)
    assert answer.status_code == 400, answer.text[:500]
    document = answer.json()
    assert document["error"]["code"] == "INVALID_REQUEST"
    assert document["value"] is None
    assert upstream.received == []


async def test_json_with_a_charset_and_a_suffix_is_json(hostile: Broker) -> None:
    """What the refusals above must not catch: the same body declared JSON another way."""
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        answer = await hostile.client.post(
            BROKER, content=raw(), headers={"content-type": content_type}
        )
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", [BROKER, "/data-sources", "/data-sources/"])
async def test_oversized_bodies_are_refused(
    shared_broker: Broker, path: str, chunked: bool
) -> None:
    size = 2 * MAX_BODY_BYTES
    content: bytes | AsyncIterator[bytes] = chunks(size) if chunked else b" " * size
    headers = {"content-type": JSON, **AUTH}
    answer = await _post_tolerating_early_answer(shared_broker, path, content, headers)
    if path == BROKER:
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "INVALID_REQUEST"
    else:
        assert answer.status_code == 413
        assert answer.json()["code"] == "BODY_TOO_LARGE"
    assert str(MAX_BODY_BYTES) in answer.text


@pytest.mark.parametrize("path", [BROKER, "/data-sources"])
async def test_an_endless_body_is_answered_without_waiting_for_its_end(
    shared_broker: Broker, path: str
) -> None:
    """Over a raw socket, the chunked body never ends: the answer comes at the cap."""
    url = httpx.URL(shared_broker.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        for _ in range(2 * MAX_BODY_BYTES // 65536):
            writer.write(chunk)
            await writer.drain()
        # No last chunk: the body is still "being sent" while the answer is read.
        async with asyncio.timeout(30):  # a guard against hanging, not a timing claim
            status = await reader.readline()
    finally:
        writer.close()
    assert status.split()[1] == (b"400" if path == BROKER else b"413")


async def test_a_body_just_under_the_cap_is_read(hostile: Broker) -> None:
    """The cap is on bytes, not on a guess: padding up to it still parses."""
    body = raw()
    padded = body + b" " * (MAX_BODY_BYTES - len(body))
    answer = await hostile.client.post(BROKER, content=padded, headers={"content-type": JSON})
    assert answer.status_code == 200, answer.text


async def _post_tolerating_early_answer(
    broker: Broker, path: str, content: Any, headers: dict[str, str]
) -> httpx.Response:
    """POST; the server may answer and close before the client finished sending.

    That is the point of the cap, and an HTTP/1.1 client then sees either the answer
    or a broken write. On a broken write the same request is sent whole with a
    declared length, which the server refuses before reading anything.
    """
    try:
        return await broker.client.post(path, content=content, headers=headers)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        declared = {**headers, "content-length": str(2 * MAX_BODY_BYTES)}
        return await broker.client.post(path, content=b" " * (2 * MAX_BODY_BYTES), headers=declared)


async def test_many_params_under_the_cap_answer_briefly(hostile: Broker) -> None:
    """60k undeclared keys: UNKNOWN_PARAMS, and the answer does not echo all of them."""
    params = {f"k{i:05}": 0 for i in range(60_000)} | {"id": "1", "q": "a", "h": "b", "b": "c"}
    body = raw(configured_params=params)
    assert len(body) < MAX_BODY_BYTES
    answer = await hostile.client.post(BROKER, content=body, headers={"content-type": JSON})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "UNKNOWN_PARAMS"
    assert error["params"][0] == "k00000"
    assert len(answer.content) < 16 * 1024


async def test_a_huge_undeclared_param_name_is_not_echoed_whole(hostile: Broker) -> None:
    name = "n" * 900_000
    params = {"id": "1", "q": "a", "h": "b", "b": "c", name: 1}
    answer = await hostile.client.post(
        BROKER, content=raw(configured_params=params), headers={"content-type": JSON}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "UNKNOWN_PARAMS"
    assert len(answer.content) < 16 * 1024


@pytest.mark.parametrize("param", ["id", "q", "h"])
async def test_a_900k_value_cannot_reach_the_url_or_a_header(
    hostile: Broker, upstream: Upstream, param: str
) -> None:
    params = {"id": "1", "q": "a", "h": "b", "b": "c", param: "v" * 900_000}
    answer = await hostile.client.post(
        BROKER, content=raw(configured_params=params), headers={"content-type": JSON}
    )
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("INVALID_PARAM", param)
    assert "vvvv" not in answer.text
    assert upstream.received == []


async def test_a_900k_value_in_the_json_body_is_sent(hostile: Broker, upstream: Upstream) -> None:
    """A body has room for it: big is not hostile where the upstream accepts it."""
    params = {"id": "1", "q": "a", "h": "b", "b": "v" * 900_000}
    answer = await hostile.client.post(
        BROKER, content=raw(configured_params=params), headers={"content-type": JSON}
    )
    assert answer.status_code == 200, answer.text[:300]
    assert orjson.loads(upstream.received[-1]["body"]) == {"b": "v" * 900_000}


SPEC = {"name": "admin_hostile", "source": {"url": "http://127.0.0.1:9/x"}}
ADMIN_CASES: dict[str, tuple[bytes, str | None]] = {
    "empty": (b"", JSON),
    "not-json": (b"{not json", JSON),
    "deep-array-100k": (b"[" * 100_000, JSON),
    "deep-object-100k": (b'{"a":' * 100_000, JSON),
    "deep-metadata-500": (
        orjson.dumps(SPEC)[:-1] + b',"metadata":{"m":' + nested(500) + b"}}",
        JSON,
    ),
    "non-utf8": (orjson.dumps(SPEC).replace(b"admin_hostile", b"\xff\xfe"), JSON),
    "utf16": (orjson.dumps(SPEC).decode().encode("utf-16"), JSON),
    "lone-surrogate": (orjson.dumps(SPEC).replace(b"admin_hostile", b"\\ud800"), JSON),
    "nan-metadata": (orjson.dumps(SPEC)[:-1] + b',"metadata":{"m":NaN}}', JSON),
    "infinity-timeout": (
        orjson.dumps(SPEC).replace(b'"}}', b'","timeout":Infinity}}'),
        JSON,
    ),
    "overflowing-metadata": (orjson.dumps(SPEC)[:-1] + b',"metadata":{"m":1e400}}', JSON),
    "duplicate-key": (orjson.dumps(SPEC)[:-1] + b',"name":"other"}', JSON),
    "huge-name": (orjson.dumps({**SPEC, "name": "n" * 900_000}), JSON),
    "huge-description": (orjson.dumps({**SPEC, "description": "d" * 900_000}), JSON),
    "nul-in-description": (orjson.dumps({**SPEC, "description": "a\u0000b"}), JSON),
    "huge-ttl": (orjson.dumps({**SPEC, "caching": {"ttl": {"days": 10**9}}}), JSON),
    "unknown-field": (orjson.dumps({**SPEC, "ttl_seconds": 5}), JSON),
    "unknown-nested-field": (orjson.dumps({**SPEC, "source": {"url": "http://a", "x": 1}}), JSON),
    "form": (b"name=admin_hostile", "application/x-www-form-urlencoded"),
    "text-with-json-body": (orjson.dumps(SPEC), "text/plain"),
    "no-content-type": (orjson.dumps(SPEC), None),
}


@pytest.mark.parametrize("case", list(ADMIN_CASES))
async def test_admin_refuses_hostile_bodies(shared_broker: Broker, case: str) -> None:
    broker = shared_broker
    body, content_type = ADMIN_CASES[case]
    headers = AUTH if content_type is None else {**AUTH, "content-type": content_type}
    created = await broker.client.post("/data-sources", content=body, headers=headers)
    assert created.status_code == 422, created.text[:500]
    assert created.json()["code"] == "VALIDATION_ERROR"

    # The same bytes as a replacement and as variables: every body-reading admin route.
    draft = await broker.register({**SPEC, "name": f"draft {case}"}, publish=False)
    sid = draft["data_source_id"]
    for path in (f"/data-sources/{sid}", f"/data-sources/{sid}/variables"):
        answer = await broker.client.put(path, content=body, headers=headers)
        assert answer.status_code == 422, (path, answer.text[:500])
        assert answer.json()["code"] == "VALIDATION_ERROR"
    assert (await broker.admin("GET", f"/data-sources/{sid}")).json() == draft
    listed = await broker.admin("GET", "/data-sources")
    assert SPEC["name"] not in {source["name"] for source in listed.json()}


@pytest.mark.parametrize(
    "items",
    [
        b'[{"name": "TOKEN", "value": NaN}]',
        b'[{"name": "TOKEN", "value": 1e400}]',
        b'[{"name": "TOKEN", "value": "a", "value": "b"}]',
        b'[{"name": "TOKEN", "value": "a", "secret": true}]',
        b'[{"name": "TOKEN\\u0000", "value": "a"}]',
    ],
    ids=["nan", "overflow", "duplicate", "unknown-field", "nul-in-name"],
)
async def test_admin_variables_refuse_hostile_values(shared_broker: Broker, items: bytes) -> None:
    broker = shared_broker
    source = await broker.register(
        {"name": f"vars {uuid.uuid4()}", "source": {"url": "http://127.0.0.1:9/{{ env.TOKEN }}"}},
        publish=False,
    )
    path = f"/data-sources/{source['data_source_id']}/variables"
    answer = await broker.client.put(path, content=items, headers={**AUTH, "content-type": JSON})
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "VALIDATION_ERROR"
    stored = (await broker.admin("GET", path)).json()
    assert [(v["name"], v["is_set"]) for v in stored] == [("TOKEN", False)]
