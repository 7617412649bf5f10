"""``POST /data-sources/{id}/test`` against a real upstream: the broker's own request path,
every secret value masked wherever the answer would echo it, no cache entry, no DataObject."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.tables import data_object
from tests.conftest import TABLES, Broker
from tests.harness import async_wait_for
from tests.servers import Upstream

KEY = "tryout-canary-key/9+q"  # a '/' and a '+': its encoded forms differ from it
OVERRIDE = "tryout-canary-override-7d"
PASSWORD = "tryout-canary-password-3e"


@pytest.fixture(autouse=True)
async def leave_no_secrets(db: AsyncEngine) -> AsyncIterator[None]:
    """Brokers later in the session start on this database with keys of their own: the
    variables and credentials stored here under this broker's key would stop their start-up."""
    yield
    async with db.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))


def keyed(upstream: Upstream, path: str, **source: Any) -> dict[str, Any]:
    """A source with its key in the path, the query and a header; ``{{ id }}`` a runtime param."""
    return {
        "name": f"tryout_{uuid.uuid4().hex[:8]}",
        "source": {
            "url": f"{upstream.url}{path}/{{{{ env.KEY }}}}/{{{{ id }}}}",
            "params": {"key": "{{ env.KEY }}"},
            "headers": {"X-Api-Key": "{{ env.KEY }}", "Accept": "application/json"},
            "response_type": "JSON",
            **source,
        },
        "caching": {"enabled": True, "ttl": 600},
    }


async def echo(request: Request) -> Response:
    """What a careless upstream does: the key back in its body and in a header."""
    key = request.headers.get("x-api-key", "")
    return JSONResponse(
        {"you_sent": key, "url": str(request.url), "n": 42}, headers={"X-Echo": key}
    )


async def try_source(broker: Broker, sid: str, **body: Any) -> httpx.Response:
    return await broker.admin("POST", f"/data-sources/{sid}/test", body)


async def objects(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(data_object)) or 0)


async def test_the_real_request_goes_out_and_no_secret_comes_back(
    broker: Broker, upstream: Upstream
) -> None:
    base = f"/tryout/{uuid.uuid4().hex}"
    for key in (KEY, OVERRIDE):
        upstream.on(f"{base}/{key}/7", echo)
    source = await broker.register(keyed(upstream, base), {"KEY": KEY})
    sid = source["data_source_id"]
    for override, sent in (({}, KEY), ({"env_vars": {"KEY": OVERRIDE}}, OVERRIDE)):
        answer = await try_source(broker, sid, params={"id": "7"}, **override)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        # The upstream saw the real value, in every place the templates put it.
        seen = upstream.received[-1]
        assert seen["headers"]["x-api-key"] == sent and f"/{sent}/7" in seen["path"]
        # The answer holds no form of either value, and says where they were.
        for secret in (KEY, OVERRIDE):
            for form in (secret, secret.replace("/", "%2F"), secret.replace("+", "%2B")):
                assert form not in answer.text
        assert result["request_url"] == f"{upstream.url}{base}/***/7?key=***"
        assert result["request_headers"]["X-Api-Key"] == "***"
        assert result["request_headers"]["Accept"] == "application/json"
        assert result["status_code"] == 200 and result["error"] is None
        assert result["response_body"]["you_sent"] == "***" and result["response_body"]["n"] == 42
        assert result["response_headers"]["x-echo"] == "***"
        assert result["response_time_ms"] > 0
        uuid.UUID(result["test_id"])


async def test_neither_the_cache_nor_the_objects_see_a_test(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    base = f"/tryout/{uuid.uuid4().hex}"
    upstream.on(f"{base}/{KEY}/7", echo)
    source = await broker.register(keyed(upstream, base), {"KEY": KEY})
    for _ in range(2):
        answer = await try_source(broker, source["data_source_id"], params={"id": "7"})
        assert answer.json()["status_code"] == 200, answer.text
    called = await broker.call(source["name"], {"id": "7"})
    assert called.json()["origin"] == "REQUEST"  # the tests cached nothing
    assert upstream.hits(f"{base}/{KEY}/7") == 3
    await async_wait_for(lambda: objects_are(db, 1))


async def objects_are(db: AsyncEngine, count: int) -> bool:
    # Only the broker request's object: were the tests' journaled, they would be shipped
    # with it, in the same or an earlier batch.
    return await objects(db) == count


async def test_retries_and_upstream_failures_are_reported_in_the_body(
    broker: Broker, upstream: Upstream
) -> None:
    path = f"/tryout/{uuid.uuid4().hex}/down"
    upstream.answer(path, "down", status=503, content_type="text/plain")
    retry = {"max_retries": 2, "backoff_factor": 0}
    source = await broker.register(
        {"name": "down", "source": {"url": f"{upstream.url}{path}", "retry": retry}}
    )
    result = (await try_source(broker, source["data_source_id"])).json()
    assert result["status_code"] == 503 and "503" in result["error"]
    assert upstream.hits(path) == 3  # the source's retries, as a broker request makes them


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://169.254.169.254/latest/meta-data", 403, "EGRESS_DENIED"),
        ("http://127.0.0.1:9/closed", 502, "CONNECTION_ERROR"),
    ],
)
async def test_the_egress_policy_and_transport_errors_apply(
    broker: Broker, url: str, status: int, code: str
) -> None:
    source = await broker.register({"name": "elsewhere", "source": {"url": url}})
    result = (await try_source(broker, source["data_source_id"])).json()
    assert result["status_code"] == status and result["error"].startswith(code)


async def test_values_that_do_not_fit_the_source_are_400_in_the_body_or_refused(
    broker: Broker, upstream: Upstream
) -> None:
    source = await broker.register(keyed(upstream, "/tryout/never"), {"KEY": KEY})
    sid = source["data_source_id"]
    missing = (await try_source(broker, sid)).json()
    assert missing["status_code"] == 400 and missing["error"].startswith("MISSING_PARAMS")
    unknown = (await try_source(broker, sid, params={"id": "1", "other": "x"})).json()
    assert unknown["status_code"] == 400 and unknown["error"].startswith("UNKNOWN_PARAMS")
    undeclared = await try_source(broker, sid, params={"id": "1"}, env_vars={"NOPE": OVERRIDE})
    assert undeclared.status_code == 400 and undeclared.json()["code"] == "REFUSED"
    assert OVERRIDE not in undeclared.text
    not_an_object = await try_source(broker, sid, params=["id", "1"])
    assert not_an_object.status_code == 422
    assert not_an_object.json()["detail"][0]["loc"] == ["body", "params"]
    assert upstream.hits("/tryout/never") == 0


async def test_source_auth_is_sent_and_never_shown(broker: Broker, upstream: Upstream) -> None:
    path = f"/tryout/{uuid.uuid4().hex}/basic"
    upstream.on(path, echo)
    source = await broker.register(
        {"name": "basic", "source": {"url": f"{upstream.url}{path}", "auth": {"method": "basic"}}}
    )
    sid = source["data_source_id"]
    credentials = [
        {"credential_type": "USERNAME", "value": "ada"},
        {"credential_type": "PASSWORD", "value": PASSWORD},
    ]
    assert (await broker.admin("PUT", f"/data-sources/{sid}/credentials", credentials)).is_success
    answer = await try_source(broker, sid)
    assert answer.json()["status_code"] == 200, answer.text
    sent = upstream.received[-1]["headers"]["authorization"]
    assert sent == "Basic " + base64.b64encode(f"ada:{PASSWORD}".encode()).decode()
    assert PASSWORD not in answer.text and sent not in answer.text
