"""Source auth on the request path, against a real OAuth2 token endpoint on 127.0.0.1
(``tests.servers.TokenIssuer``): one token for many calls and sidecars, replaced when it
expires or is refused, ``AUTH_ERROR`` when the endpoint fails; basic auth's header."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.keys import KeyLayout
from proxy.secrets import SecretBox, Secrets
from proxy.source_registry import Source
from proxy.source_spec import DataSourceSpec
from proxy.tokens import Tokens
from proxy.upstream import create_client
from tests.conftest import REDIS_URL, Broker
from tests.harness import (
    ADMIN_TOKEN,
    admin_headers,
    async_wait_for,
    broker_request,
    clean_env,
    free_port,
    private_prefix,
    sidecar_env,
    source_row,
)
from tests.instances import serving, sidecar, terminate
from tests.servers import TokenIssuer, Upstream

CLIENT = {"CLIENT_ID": "issuer-client", "CLIENT_SECRET": "issuer-secret"}
USER = {"USERNAME": "issuer-user", "PASSWORD": "issuer-password"}


def bearer(name: str, token_url: str, api: str, **auth: Any) -> dict[str, Any]:
    return {
        "name": name,
        "source": {
            "url": f"{api}?id={{{{ id }}}}",
            "response_type": "JSON",
            "timeout": 5,
            "auth": {
                "method": "bearer",
                "token_url": token_url,
                "grant_type": "client_credentials",
                "scope": "api.read",
                **auth,
            },
        },
    }


async def register(
    client: httpx.AsyncClient, spec: dict[str, Any], credentials: dict[str, str]
) -> str:
    """Create, store the credentials, publish; the source's id."""
    headers = admin_headers()
    created = await client.post("/data-sources", json=spec, headers=headers)
    assert created.status_code == 200, created.text
    sid: str = created.json()["data_source_id"]
    items = [{"credential_type": k, "value": v} for k, v in credentials.items()]
    stored = await client.put(f"/data-sources/{sid}/credentials", json=items, headers=headers)
    assert stored.status_code == 200, stored.text
    published = await client.post(f"/data-sources/{sid}/publish", headers=headers)
    assert published.status_code == 200, published.text
    return sid


async def ok(broker: Broker, name: str, id: str = "1") -> dict[str, Any]:
    answer = await broker.call(name, {"id": id})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["value"] == {"ok": True}
    return body


async def failed(broker: Broker, name: str, status: int, code: str) -> dict[str, Any]:
    answer = await broker.call(name, {"id": "1"})
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert error["code"] == code, error
    return error


async def token_requests(broker: Broker, source: str, outcome: str) -> float:
    """``databroker_token_requests_total`` for one source and outcome (0 if none yet)."""
    metrics = (await broker.client.get("/metrics")).text
    for family in text_string_to_metric_families(metrics):
        if family.name == "databroker_token_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == {
                    "source": source,
                    "outcome": outcome,
                }:
                    return float(sample.value)
    return 0.0


def token_key(broker: Broker, sid: str) -> str:
    return KeyLayout(broker.settings.redis_prefix).token(sid)


@pytest.fixture
async def redis() -> Any:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def issuer(upstream: Upstream) -> TokenIssuer:
    return TokenIssuer()


async def test_one_token_serves_every_call_and_is_kept_encrypted(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer, redis: Any
) -> None:
    name = f"api_{uuid.uuid4().hex[:8]}"  # the metric outlives this test's broker
    sid = await register(broker.client, bearer(name, *issuer.install(upstream)), CLIENT)
    for i in range(5):
        await ok(broker, name, str(i))
    assert len(issuer.forms) == 1
    assert await token_requests(broker, name, "OK") == 1
    assert issuer.forms[0] == {
        "grant_type": "client_credentials",
        "client_id": "issuer-client",
        "client_secret": "issuer-secret",
        "scope": "api.read",
    }
    [token] = issuer.issued
    assert issuer.api_calls == [f"Bearer {token}"] * 5
    stored = await redis.get(token_key(broker, sid))
    assert stored is not None and token.encode() not in stored
    # expires_in 3600: kept for 3540 s, a minute before the endpoint's own expiry.
    assert 3500_000 < await redis.pttl(token_key(broker, sid)) <= 3540_000


async def test_the_password_grant_sends_the_user_and_the_client(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer
) -> None:
    spec = bearer("api", *issuer.install(upstream), grant_type="password", scope=None)
    await register(broker.client, spec, {**USER, **CLIENT})
    await ok(broker, "api")
    assert issuer.forms == [
        {
            "grant_type": "password",
            "username": "issuer-user",
            "password": "issuer-password",
            "client_id": "issuer-client",
            "client_secret": "issuer-secret",
        }
    ]


async def test_an_expired_token_is_replaced_once(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer, redis: Any
) -> None:
    issuer.expires_in = 2  # used for 1.6 s: replaced before the endpoint expires it
    sid = await register(broker.client, bearer("api", *issuer.install(upstream)), CLIENT)
    await ok(broker, "api")
    await ok(broker, "api", "2")
    assert len(issuer.forms) == 1
    assert await redis.exists(token_key(broker, sid))
    await async_wait_for(_gone(redis, token_key(broker, sid)))
    for i in range(3):
        await ok(broker, "api", str(i))
    assert len(issuer.forms) == 2
    assert len(set(issuer.api_calls)) == 2


def _gone(redis: Any, key: str) -> Any:
    async def gone() -> bool:
        return not await redis.exists(key)

    return gone


async def test_a_401_replaces_the_token_once_and_retries_once(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer
) -> None:
    await register(broker.client, bearer("api", *issuer.install(upstream)), CLIENT)
    await ok(broker, "api")
    issuer.revoke_all()  # the endpoint's tokens die before their time
    await ok(broker, "api", "2")
    assert len(issuer.forms) == 2
    first, refused, retried = issuer.api_calls
    assert first == refused != retried

    # An API that refuses every token: one new token, one retry, then its 401 is the answer.
    upstream.answer("/api", b'{"error": "invalid_token"}', status=401)
    error = await failed(broker, "api", 502, "HTTP_ERROR")
    assert error["upstream_status"] == 401
    assert len(issuer.forms) == 3
    assert upstream.hits("/api") == 5


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda issuer: setattr(issuer, "failing", 503), "HTTP 503"),
        (lambda issuer: setattr(issuer, "client_secret", "rotated"), "HTTP 401"),
        (lambda issuer: setattr(issuer, "garbage", b"<html>"), "not JSON"),
    ],
    ids=["down", "refused", "not-json"],
)
async def test_a_failing_token_endpoint_answers_auth_error_and_calls_no_api(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer, break_it: Any, message: str
) -> None:
    name = f"api_{uuid.uuid4().hex[:8]}"
    await register(broker.client, bearer(name, *issuer.install(upstream)), CLIENT)
    break_it(issuer)
    # A slow failure: the calls meet it in flight or on the lock for its 2 s hold, even
    # on a busy machine that sends them over a second or two.
    issuer.delay = 1.0
    answers = await asyncio.gather(*(broker.call(name, {"id": str(i)}) for i in range(50)))
    for answer in answers:
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "AUTH_ERROR"
        assert message in answer.json()["error"]["message"]
    # One request for the 50 calls: its failure is shared with those who waited for it.
    assert upstream.hits("/oauth/token") == 1
    assert await token_requests(broker, name, "AUTH_ERROR") == 1
    assert issuer.api_calls == []


async def test_an_unreachable_or_forbidden_token_endpoint(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer
) -> None:
    _, api = issuer.install(upstream)
    closed = f"http://127.0.0.1:{free_port()}/token"
    await register(broker.client, bearer("closed", closed, api), CLIENT)
    error = await failed(broker, "closed", 502, "AUTH_ERROR")
    assert "could not be reached" in error["message"]
    # The egress policy decides where a token request goes, as for any upstream call.
    metadata = "http://169.254.169.254/latest/token"
    await register(broker.client, bearer("metadata", metadata, api), CLIENT)
    await failed(broker, "metadata", 403, "EGRESS_DENIED")
    assert issuer.api_calls == []


async def test_missing_credentials_are_named(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer
) -> None:
    await register(broker.client, bearer("api", *issuer.install(upstream)), {"CLIENT_ID": "c"})
    error = await failed(broker, "api", 400, "MISSING_VARIABLES")
    assert error["variables"] == ["CLIENT_SECRET"]
    assert issuer.forms == []


async def test_new_credentials_drop_the_cached_token(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer, redis: Any
) -> None:
    sid = await register(broker.client, bearer("api", *issuer.install(upstream)), CLIENT)
    await ok(broker, "api")
    issuer.client_secret = "rotated"
    body = [{"credential_type": "CLIENT_SECRET", "value": "rotated"}]
    stored = await broker.admin("PUT", f"/data-sources/{sid}/credentials", body)
    assert stored.status_code == 200, stored.text
    assert not await redis.exists(token_key(broker, sid))
    await ok(broker, "api", "2")
    assert [form["client_secret"] for form in issuer.forms] == ["issuer-secret", "rotated"]


@pytest.mark.parametrize(
    ("credentials", "user"),
    [({**USER, **CLIENT}, "issuer-user:issuer-password"), (CLIENT, "issuer-client:issuer-secret")],
    ids=["username-password", "client-id-secret"],
)
async def test_basic_auth_header_reaches_the_upstream(
    broker: Broker, upstream: Upstream, credentials: dict[str, str], user: str
) -> None:
    url = upstream.answer("/basic", b'{"ok": true}')
    spec = {
        "name": "basic",
        "source": {
            "url": f"{url}?id={{{{ id }}}}",
            "response_type": "JSON",
            # Our header wins over one the source's own headers set.
            "headers": {"Authorization": "Basic bm90OnVz"},
            "auth": {"method": "basic"},
        },
    }
    await register(broker.client, spec, credentials)
    await ok(broker, "basic")
    [sent] = upstream.received
    assert sent["headers"]["authorization"] == "Basic " + base64.b64encode(user.encode()).decode()


async def test_basic_auth_without_credentials_is_missing_variables(
    broker: Broker, upstream: Upstream
) -> None:
    url = upstream.answer("/basic", b'{"ok": true}')
    spec = {
        "name": "basic",
        "source": {"url": f"{url}?id={{{{ id }}}}", "auth": {"method": "basic"}},
    }
    await register(broker.client, spec, {"USERNAME": "u"})
    error = await failed(broker, "basic", 400, "MISSING_VARIABLES")
    assert error["variables"] == ["USERNAME", "PASSWORD"]
    assert upstream.received == []


def served(issuer: TokenIssuer, upstream: Upstream) -> Source:
    """A bearer source as the registry serves it, built without a broker."""
    spec = DataSourceSpec.model_validate(bearer("api", *issuer.install(upstream)))
    row = source_row(
        data_source_id=uuid.uuid4(),
        name=spec.name,
        source=spec.source.model_dump(mode="json", exclude_none=True),
        caching_enabled=False,
        runtime_params=["id"],
        variables=[],
        status="PUBLISHED",
        last_updated_at=datetime.now(UTC),
    )
    return Source.from_row(row, Secrets(), Secrets(CLIENT))


def box() -> SecretBox:
    return SecretBox([Fernet.generate_key().decode()])


async def test_without_redis_a_process_still_requests_one_token_at_a_time(
    upstream: Upstream, issuer: TokenIssuer
) -> None:
    source = served(issuer, upstream)
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}")
    async with create_client() as client:
        tokens = Tokens(unreachable, KeyLayout("nowhere:"), box(), client)
        first = await asyncio.gather(*(tokens.token(source, 5) for _ in range(20)))
        again = await tokens.token(source, 5)
    await unreachable.aclose()
    assert len(set(first)) == 1 and again != first[0]  # nothing kept without Redis
    assert len(issuer.forms) == 2


async def test_a_holder_that_finds_a_token_stored_meanwhile_uses_it_and_lets_go(
    upstream: Upstream, issuer: TokenIssuer, redis: Any, redis_prefix: str
) -> None:
    """The race window: another sidecar stored a token and released between this
    caller's read and its lock. The stored token is used, and the lock released at once,
    so the next refresh need not wait for it to expire."""
    source = served(issuer, upstream)
    layout, secrets = KeyLayout(redis_prefix), box()
    lock = layout.token_lock(source.data_source_id)
    async with create_client() as client:
        tokens = Tokens(redis, layout, secrets, client)
        await redis.set(layout.token(source.data_source_id), secrets.encrypt("stored-meanwhile"))
        await redis.set(lock, "mine")
        assert await tokens._request_holding(source, 5, lock, "mine", None) == "stored-meanwhile"
        assert not await redis.exists(lock)
        # A refresh of that very token requests a new one, kept for the next callers.
        fresh = await tokens.token(source, 5, rejected="stored-meanwhile")
    assert fresh in issuer.issued and len(issuer.forms) == 1
    assert secrets.decrypt((await redis.get(layout.token(source.data_source_id))).decode()) == fresh


async def reflect(request: Request) -> Response:
    """An upstream that echoes the Authorization it got (as httpbin's /headers does)."""
    sent = request.headers.get("authorization", "")
    return JSONResponse({"you_sent": sent}, headers={"X-Echo": sent})


@pytest.mark.parametrize("method", ["bearer", "basic"])
async def test_testing_a_source_masks_the_auth_it_sent(
    broker: Broker, upstream: Upstream, issuer: TokenIssuer, method: str
) -> None:
    token_url, _ = issuer.install(upstream)
    url = upstream.on("/reflect", reflect)
    spec = bearer("reflecting", token_url, url)
    if method == "basic":
        spec["source"]["auth"] = {"method": "basic"}
    sid = await register(broker.client, spec, {**CLIENT, **USER})
    answer = await broker.admin("POST", f"/data-sources/{sid}/test", {"params": {"id": "1"}})
    assert answer.status_code == 200, answer.text
    tested = answer.json()
    assert tested["status_code"] == 200, tested
    sent = upstream.received[-1]["headers"]["authorization"]
    assert sent.startswith("Bearer " if method == "bearer" else "Basic ")
    assert tested["response_body"]["you_sent"] == sent.split(" ")[0] + " ***"
    assert sent.split(" ")[1] not in answer.text


@pytest.mark.slow
async def test_200_calls_across_3_sidecars_fetch_one_token(
    pg_url: str, db: AsyncEngine, upstream: Upstream, issuer: TokenIssuer, tmp_path: Path
) -> None:
    # ``db``: empty tables, so the sidecars (one key, shared) meet no other test's secrets.
    token_url, api = issuer.install(upstream)
    with private_prefix(REDIS_URL) as prefix:
        env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=prefix)
        async with (
            sidecar({**env, "DATABROKER_OUTBOX_DIR": str(tmp_path / "o1")}, tmp_path) as one,
            sidecar({**env, "DATABROKER_OUTBOX_DIR": str(tmp_path / "o2")}, tmp_path) as two,
            sidecar({**env, "DATABROKER_OUTBOX_DIR": str(tmp_path / "o3")}, tmp_path) as three,
        ):
            name = f"fleet_{uuid.uuid4().hex[:8]}"
            await register(one.client, bearer(name, token_url, api), CLIENT)
            sidecars = [one, two, three]
            for each in sidecars:  # each knows the source (a refusal needs no token)
                refused = await each.client.post("/internal/data-broker", json=broker_request(name))
                assert refused.json()["error"]["code"] == "MISSING_PARAMS"
            issuer.delay = 0.5  # all three sidecars ask while the first request is in flight

            async def call(i: int) -> httpx.Response:
                client = sidecars[i % 3].client
                return await client.post(
                    "/internal/data-broker", json=broker_request(name, {"id": str(i)})
                )

            answers = await asyncio.gather(*(call(i) for i in range(200)))
    assert [a.status_code for a in answers] == [200] * 200, answers[0].text
    assert {a.json()["origin"] for a in answers} == {"REQUEST"}
    assert len(issuer.forms) == 1
    assert len(issuer.api_calls) == 200 and len(set(issuer.api_calls)) == 1


@pytest.mark.slow
async def test_the_embedded_default_authenticates_too(
    upstream: Upstream, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """SQLite and the in-process Redis: the same path, credentials and token kept encrypted."""
    async with serving(clean_env(admin_token=ADMIN_TOKEN), tmp_path) as (process, client):
        await register(client, bearer("api", *issuer.install(upstream)), CLIENT)
        for i in range(3):
            answer = await client.post(
                "/internal/data-broker", json=broker_request("api", {"id": str(i)})
            )
            assert answer.status_code == 200, answer.text
        terminate(process)
    assert len(issuer.forms) == 1 and len(issuer.api_calls) == 3
    with sqlite3.connect(tmp_path / ".databroker" / "databroker.db") as conn:
        stored = conn.execute(
            "SELECT credential_type, value FROM data_source_credential"
        ).fetchall()
    conn.close()
    assert sorted(kind for kind, _ in stored) == sorted(CLIENT)
    assert not any(CLIENT["CLIENT_SECRET"] in value for _, value in stored)
