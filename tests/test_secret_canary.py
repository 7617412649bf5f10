"""Secrets canary: variables hold recognisable values, every route and error path is driven,
then everything the broker said or wrote is searched for them.

Searched: every response (body and headers), every span of the in-thread broker's
traces (attributes, recorded exceptions), every log line (caplog at DEBUG for an
in-thread broker; the console script's JSON lines at DEBUG with the access log for a
subprocess one), every Redis key
under the test's prefix and every value behind it, every message published there,
every column of every row of every table, every file left on disk, and /metrics
(label values included). The upstream never answers a 2xx body holding a secret, so a
cache entry or a DataObject holding one is a leak too. Zero occurrences is the only pass.
"""

from __future__ import annotations

import base64
import logging
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis
from cryptography.fernet import Fernet
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from proxy.app import create_app
from proxy.errors import ParseError
from proxy.formats import parse_body
from proxy.secrets import SecretBox, Secrets
from proxy.settings import Settings
from proxy.source_registry import Source
from proxy.source_store import VariableValue
from proxy.templates import render
from tests.conftest import REDIS_URL, TABLES
from tests.harness import ADMIN_TOKEN, async_wait_for, clean_env, free_port, source_row
from tests.instances import log_of, serving, terminate
from tests.servers import TokenIssuer, Upstream, serve_in_thread

CANARY = "canary-7f3a9c"
SECRETS = {
    "HEADER_SECRET": f"{CANARY}-SECRET-header",
    "QUERY_SECRET": f"{CANARY}-SECRET-query",
    "PATH_SECRET": f"{CANARY}-SECRET-path",
    "JSON_SECRET": f"{CANARY}-SECRET-json",
    "FORM_SECRET": f"{CANARY}-SECRET-form",
    "USERINFO": f"{CANARY}-SECRET-user:{CANARY}-SECRET-password",
}
# Credentials (source.auth), and the tokens the issuer mints from them: secrets too.
CREDENTIALS = {
    "CLIENT_ID": f"{CANARY}-CREDENTIAL-client-id",
    "CLIENT_SECRET": f"{CANARY}-CREDENTIAL-client-secret",
    "USERNAME": f"{CANARY}-CREDENTIAL-user",
    "PASSWORD": f"{CANARY}-CREDENTIAL-password",
}
TOKENS = f"{CANARY}-TOKEN"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NOT_RESOLVED = {"INVALID_REQUEST", "DATA_SOURCE_NOT_FOUND"}


def pick(*names: str) -> dict[str, str]:
    return {name: SECRETS[name] for name in names}


# --- the upstream: it sees every secret, and answers 2xx bodies without any ----------------


async def ok_json(_: Request) -> Response:
    return Response(b'{"ok": true}', media_type="application/json")


async def echo_500(request: Request) -> Response:
    """An error page that reflects the whole request, secrets included."""
    echo = {"url": str(request.url), "headers": dict(request.headers)}
    body = orjson.dumps({**echo, "body": (await request.body()).decode()})
    return Response(body, 500, media_type="application/json")


async def headers_echo(request: Request) -> Response:
    """A 2xx reflecting every request header (httpbin's /headers): for ``POST …/test``
    only, which stores nothing; the broker route never calls it."""
    sent = dict(request.headers)
    body = orjson.dumps({"headers": sent, "url": str(request.url)})
    return Response(body, headers={"X-Echo": sent.get("authorization", "")})


async def redirect_echo(request: Request) -> Response:
    location = f"http://127.0.0.1:1/login?key={request.query_params['key']}"
    return Response(location.encode(), 302, headers={"Location": location})


async def charset_echo(request: Request) -> Response:
    """A 2xx whose Content-Type reflects the Authorization header: a secret in an error."""
    token = request.headers["authorization"].removeprefix("Bearer ")
    return Response(b"{}", headers={"Content-Type": f"application/json; charset={token}"})


@contextmanager
def black_hole() -> Iterator[int]:
    """A port whose connections are accepted (the kernel's backlog) and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def failing(name: str, url: str, **source: Any) -> dict[str, Any]:
    """A source that carries the header and query secrets to a failing upstream."""
    return {
        "name": name,
        "source": {
            "url": f"{url}?key={{{{ env.QUERY_SECRET }}}}",
            "headers": {"Authorization": "Bearer {{ env.HEADER_SECRET }}"},
            "timeout": 0.5,
            "response_type": "JSON",
            **source,
        },
        "caching": {"enabled": True, "ttl": 60},
    }


# --- the scenario: every route, every error path -------------------------------------------


@dataclass
class Driven:
    responses: list[httpx.Response] = field(default_factory=list)
    resolved: int = 0  # broker calls that resolved a source: each leaves one audit row


async def drive(client: httpx.AsyncClient, upstream: Upstream, hole: int) -> Driven:
    seen = Driven()

    async def record(response: httpx.Response) -> None:
        await response.aread()
        seen.responses.append(response)

    client.event_hooks = {"request": [], "response": [record]}
    base = upstream.url

    async def admin(method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        answer = await client.request(method, path, json=body, headers=ADMIN)
        assert answer.status_code == expect, answer.text
        return answer.json()

    async def register(
        spec: dict[str, Any], variables: dict[str, str], publish: bool = True
    ) -> str:
        sid: str = (await admin("POST", "/data-sources", spec))["data_source_id"]
        items = [{"name": k, "value": v} for k, v in variables.items()]
        await admin("PUT", f"/data-sources/{sid}/variables", items)
        if publish:
            await admin("POST", f"/data-sources/{sid}/publish")
        return sid

    async def with_credentials(spec: dict[str, Any], kinds: tuple[str, ...]) -> str:
        sid: str = (await admin("POST", "/data-sources", spec))["data_source_id"]
        items = [{"credential_type": k, "value": CREDENTIALS[k]} for k in kinds]
        await admin("PUT", f"/data-sources/{sid}/credentials", items)
        await admin("POST", f"/data-sources/{sid}/publish")
        return sid

    async def call(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"data_source_name": name, "configured_params": params or {}}
        answer = await client.post(
            "/internal/data-broker", json={**body, "run_id": str(uuid.uuid4())}
        )
        result: dict[str, Any] = {"status": answer.status_code, **answer.json()}
        if result["error"] is None or result["error"]["code"] not in NOT_RESOLVED:
            seen.resolved += 1
        return result

    # A secret in the URL path and query, two headers, a nested JSON body; another in a form.
    upstream.on(f"/echo/{SECRETS['PATH_SECRET']}/42", ok_json)
    upstream.on("/token", ok_json)
    everywhere: dict[str, Any] = {
        "name": "everywhere",
        "source": {
            "url": f"{base}/echo/{{{{ env.PATH_SECRET }}}}/{{{{ id }}}}?key={{{{ env.QUERY_SECRET }}}}",
            "method": "POST",
            "headers": {
                "Authorization": "Bearer {{ env.HEADER_SECRET }}",
                "X-Api-Key": {"env": "HEADER_SECRET"},
            },
            "params": {"sig": "{{ env.QUERY_SECRET }}"},
            "body": {
                "token": "{{ env.JSON_SECRET }}",
                "nested": {"list": ["{{ env.JSON_SECRET }}", 1]},
                "id": "{{ id }}",
            },
            "response_type": "JSON",
        },
        "caching": {"enabled": True, "ttl": 60},
    }
    sid = await register(
        everywhere, pick("HEADER_SECRET", "QUERY_SECRET", "PATH_SECRET", "JSON_SECRET")
    )
    form = {
        "name": "form",
        "source": {
            "url": f"{base}/token",
            "method": "POST",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            "body": {"client_secret": "{{ env.FORM_SECRET }}", "grant_type": "client_credentials"},
            "response_type": "JSON",
        },
    }
    form_id = await register(form, pick("FORM_SECRET"))
    upstream.on("/basic", ok_json)
    host = base.removeprefix("http://")
    basic = {"name": "basic", "source": {"url": f"http://{{{{ env.USERINFO }}}}@{host}/basic"}}
    await register(basic, pick("USERINFO"))

    # Source auth: an OAuth2 endpoint minting canary tokens, and basic auth.
    issuer = TokenIssuer(
        client_id=CREDENTIALS["CLIENT_ID"],
        client_secret=CREDENTIALS["CLIENT_SECRET"],
        token_prefix=TOKENS,
    )
    token_url, api = issuer.install(upstream)
    oauth = {
        "name": "oauth",
        "source": {
            "url": f"{api}?id={{{{ id }}}}",
            "response_type": "JSON",
            "auth": {
                "method": "bearer",
                "token_url": token_url,
                "grant_type": "client_credentials",
            },
        },
        "caching": {"enabled": True, "ttl": 60},
    }
    oauth_id = await with_credentials(oauth, ("CLIENT_ID", "CLIENT_SECRET"))
    basic_auth = {
        "name": "basic_auth",
        "source": {"url": f"{base}/basic", "auth": {"method": "basic"}},
    }
    await with_credentials(basic_auth, ("USERNAME", "PASSWORD"))
    refused_token = {
        "name": "refused_token",
        "source": {
            "url": f"{api}?again=1",
            "auth": {"method": "bearer", "token_url": f"{base}/fail", "grant_type": "password"},
        },
    }
    await with_credentials(refused_token, ("USERNAME", "PASSWORD"))

    upstream.on("/fail", echo_500)
    upstream.on("/moved", redirect_echo)
    upstream.answer("/broken", b'{"half": ')
    upstream.on("/charset", charset_echo)
    header_query = pick("HEADER_SECRET", "QUERY_SECRET")
    expected = {
        "timeout": ("TIMEOUT", failing("timeout", f"http://127.0.0.1:{hole}/slow"), header_query),
        "refused": (
            "CONNECTION_ERROR",
            failing("refused", f"http://127.0.0.1:{free_port()}/r/{{{{ env.PATH_SECRET }}}}"),
            pick("HEADER_SECRET", "QUERY_SECRET", "PATH_SECRET"),
        ),
        "http_error": ("HTTP_ERROR", failing("http_error", f"{base}/fail"), header_query),
        "redirect": ("HTTP_ERROR", failing("redirect", f"{base}/moved"), header_query),
        "parse_error": ("PARSE_ERROR", failing("parse_error", f"{base}/broken"), header_query),
        "bad_charset": ("PARSE_ERROR", failing("bad_charset", f"{base}/charset"), header_query),
        # A variable httpx refuses in the URL (its message would quote it).
        "bad_port": (
            "INTERNAL",
            {"name": "bad_port", "source": {"url": "http://127.0.0.1:{{ env.PORT }}/x"}},
            {"PORT": f"{CANARY}-SECRET-port"},
        ),
        # A variable that would inject a header: refused, naming the variable.
        "crlf": (
            "INVALID_PARAM",
            {"name": "crlf", "source": {"url": f"{base}/never", "headers": {"X": "{{ env.BAD }}"}}},
            {"BAD": f"{CANARY}-SECRET-crlf\r\nX-Injected: 1"},
        ),
        # Credentials in the URL's userinfo, to an address the egress policy refuses.
        "egress_denied": (
            "EGRESS_DENIED",
            failing("egress_denied", "http://{{ env.USERINFO }}@169.254.169.254/latest"),
            pick("HEADER_SECRET", "QUERY_SECRET", "USERINFO"),
        ),
        "half_set": (
            "MISSING_VARIABLES",
            {
                "name": "half_set",
                "source": {
                    "url": f"{base}/never",
                    "headers": {"A": "{{ env.HEADER_SECRET }}", "B": "{{ env.UNSET }}"},
                },
            },
            pick("HEADER_SECRET"),
        ),
    }
    for _, spec, variables in expected.values():
        await register(spec, variables)

    # The broker: a miss, a hit, each request error, each upstream error.
    miss, hit = await call("everywhere", {"id": "42"}), await call("everywhere", {"id": "42"})
    assert (miss["origin"], hit["origin"]) == ("REQUEST", "CACHE"), (miss, hit)
    assert miss["value"] == {"ok": True}
    for params, code in [
        ({"id": ".."}, "INVALID_PARAM"),
        ({}, "MISSING_PARAMS"),
        ({"id": "42", "debug": True}, "UNKNOWN_PARAMS"),
    ]:
        assert (await call("everywhere", params))["error"]["code"] == code
    assert (await call("form"))["value"] == {"ok": True}
    assert (await call("basic"))["value"] == '{"ok": true}'  # PLAIN_TEXT
    assert (await call("basic_auth"))["value"] == '{"ok": true}'
    assert (await call("oauth", {"id": "1"}))["origin"] == "REQUEST"
    assert (await call("oauth", {"id": "1"}))["origin"] == "CACHE"
    issuer.revoke_all()  # the next miss is refused (401), gets a new token and retries
    assert (await call("oauth", {"id": "2"}))["value"] == {"ok": True}
    assert len(issuer.forms) == 2
    assert (await call("refused_token"))["error"]["code"] == "AUTH_ERROR"
    for name, (code, _, _) in expected.items():
        answer = await call(name)
        assert answer["error"] is not None and answer["error"]["code"] == code, answer
    assert (await call("nobody_registered_this"))["status"] == 404
    invalid = await client.post("/internal/data-broker", content=b'{"data_source_name": ')
    assert invalid.status_code == 400

    # The admin routes, each way they answer.
    for path in (
        "/data-sources",
        "/data-sources/?include_archived=true",
        "/data-sources?status=PUBLISHED",
    ):
        assert len(await admin("GET", path)) >= 2
    assert (await admin("GET", f"/data-sources/{sid}"))["name"] == "everywhere"
    masked = await admin("GET", f"/data-sources/{oauth_id}/credentials")
    assert {c["value"] for c in masked} == {"********"}
    for items in (
        [{"credential_type": "CLIENT_SECRET", "value": [CREDENTIALS["CLIENT_SECRET"]]}],
        [{"credential_type": "API_KEY", "value": CREDENTIALS["CLIENT_SECRET"]}],
        [{"credential_type": "CLIENT_SECRET", "value": "x", "extra": CREDENTIALS["PASSWORD"]}],
    ):
        await admin("PUT", f"/data-sources/{oauth_id}/credentials", items, expect=422)
    listed = await admin("GET", f"/data-sources/{sid}/variables")
    assert {v["name"] for v in listed if v["is_set"]} == set(
        pick("HEADER_SECRET", "QUERY_SECRET", "PATH_SECRET", "JSON_SECRET")
    )
    await admin("PUT", f"/data-sources/{sid}", {**everywhere, "description": "now described"})
    changed_method = {**everywhere, "source": {**everywhere["source"], "method": "PUT"}}
    await admin("PUT", f"/data-sources/{sid}", changed_method, expect=400)
    await admin("POST", f"/data-sources/{sid}/publish")
    draft_spec = {
        "name": "draft",
        "source": {"url": f"{base}/d", "headers": {"K": "{{ env.FORM_SECRET }}"}},
    }
    draft = await register(draft_spec, pick("FORM_SECRET"), publish=False)
    await admin("PUT", f"/data-sources/{draft}", {**draft_spec, "description": "replaced"})
    await admin("DELETE", f"/data-sources/{draft}")
    await admin("DELETE", f"/data-sources/{form_id}")  # published: archived, still served
    assert (await call("form"))["value"] == {"ok": True}
    await admin("GET", f"/data-sources/{uuid.uuid4()}", expect=404)

    # Validation errors whose request holds a secret: none may echo it.
    secret = SECRETS["HEADER_SECRET"]
    for items, refused in (
        ([{"name": "NOT_DECLARED", "value": secret}], 400),
        ([{"name": "HEADER_SECRET", "value": {"nested": secret}}], 422),
        ([{"name": "HEADER_SECRET", "value": [secret]}], 422),
        ([{"name": "HEADER_SECRET", "value": secret, "extra": secret}], 422),
        (
            [
                {"name": "HEADER_SECRET", "value": secret},
                {"name": "HEADER_SECRET", "value": secret},
            ],
            422,
        ),
        ({"HEADER_SECRET": secret}, 422),
    ):
        await admin("PUT", f"/data-sources/{sid}/variables", items, expect=refused)
    truncated = f'[{{"name": "HEADER_SECRET", "value": "{secret}"'.encode()
    answer = await client.put(f"/data-sources/{sid}/variables", content=truncated, headers=ADMIN)
    assert answer.status_code == 422, answer.text
    good = {"url": f"{base}/x"}
    for bad, refused in (
        ({"source": {"url": secret}}, 400),  # not a template the broker can render
        ({"source": {**good, "method": secret}}, 422),
        ({"source": {**good, "response_type": secret}}, 422),
        ({"source": {**good, "timeout": secret}}, 422),
        ({"source": {**good, "retry": {"max_retries": secret}}}, 422),
        ({"source": {**good, "headers": {"X": f"{secret}\r\n"}}}, 400),
        ({"source": good, "caching": {"ttl": secret}}, 422),
        ({"source": good, "project_id": secret}, 422),
    ):
        await admin("POST", "/data-sources", {"name": "bad", **bad}, expect=refused)
    # Testing a source shows what it sent and got: every secret masked, auth included.
    upstream.on("/headers", headers_echo)
    for name, auth, kinds in (
        (
            "oauth_echo",
            {"method": "bearer", "token_url": token_url, "grant_type": "client_credentials"},
            ("CLIENT_ID", "CLIENT_SECRET"),
        ),
        ("basic_echo", {"method": "basic"}, ("USERNAME", "PASSWORD")),
    ):
        echoing = {
            "name": name,
            "source": {
                "url": f"{base}/headers?q={{{{ env.QUERY_SECRET }}}}",
                "headers": {"X-Api-Key": "{{ env.HEADER_SECRET }}"},
                "response_type": "JSON",
                "auth": auth,
            },
        }
        echo_id: str = (await admin("POST", "/data-sources", echoing))["data_source_id"]
        await admin(
            "PUT",
            f"/data-sources/{echo_id}/variables",
            [{"name": k, "value": v} for k, v in pick("QUERY_SECRET", "HEADER_SECRET").items()],
        )
        items = [{"credential_type": k, "value": CREDENTIALS[k]} for k in kinds]
        await admin("PUT", f"/data-sources/{echo_id}/credentials", items)
        tested = await admin("POST", f"/data-sources/{echo_id}/test", {"params": {}})
        assert tested["status_code"] == 200, tested
        assert tested["response_body"]["headers"]["x-api-key"] == "***"
    tested = await admin("POST", f"/data-sources/{sid}/test", {"params": {"id": "42"}})
    assert tested["status_code"] == 200, tested

    wrong = await client.get("/data-sources", headers={"Authorization": f"Bearer {secret}"})
    assert wrong.status_code == 401

    for path in ("/metrics", "/readyz", "/healthz", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path
    return seen


def assert_secrets_reached_upstream(upstream: Upstream) -> None:
    """The secrets were really used: else finding none of them would prove nothing."""
    sent = upstream.received
    assert any(
        r["headers"].get("authorization") == f"Bearer {SECRETS['HEADER_SECRET']}" for r in sent
    )
    assert any(r["headers"].get("x-api-key") == SECRETS["HEADER_SECRET"] for r in sent)
    assert any(SECRETS["QUERY_SECRET"] in r["query"] for r in sent)
    assert any(SECRETS["PATH_SECRET"] in r["path"] for r in sent)
    assert any(SECRETS["JSON_SECRET"].encode() in r["body"] for r in sent)
    assert any(f"client_secret={SECRETS['FORM_SECRET']}".encode() in r["body"] for r in sent)
    userinfo = base64.b64encode(SECRETS["USERINFO"].encode()).decode()
    assert any(r["headers"].get("authorization") == f"Basic {userinfo}" for r in sent)
    user = f"{CREDENTIALS['USERNAME']}:{CREDENTIALS['PASSWORD']}"
    basic = f"Basic {base64.b64encode(user.encode()).decode()}"
    assert any(r["headers"].get("authorization") == basic for r in sent)
    secret = f"client_secret={CREDENTIALS['CLIENT_SECRET']}".encode()
    assert any(r["path"] == "/oauth/token" and secret in r["body"] for r in sent)
    assert any(r["headers"].get("authorization", "").startswith(f"Bearer {TOKENS}") for r in sent)


# --- the search ----------------------------------------------------------------------------


def found(where: str, blob: bytes | str | None) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob or b""
    return [where] if CANARY.encode() in data.lower() else []


def in_responses(responses: list[httpx.Response]) -> list[str]:
    leaks = []
    for r in responses:
        where = f"{r.request.method} {r.request.url.path} → {r.status_code}"
        leaks += found(f"response body of {where}", r.content)
        leaks += found(f"response headers of {where}", repr(r.headers.multi_items()))
    return leaks


def in_redis(prefix: str) -> list[str]:
    client = sync_redis.Redis.from_url(REDIS_URL)
    readers = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": client.smembers,
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
        b"stream": client.xrange,
    }
    leaks, keys = [], 0
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            keys += 1
            leaks += found(f"Redis key {key!r}", key)
            leaks += found(f"Redis value of {key!r}", repr(readers[client.type(key)](key)))  # type: ignore[index]
    finally:
        client.close()
    assert keys > 0, "no Redis key under the prefix: the search would prove nothing"
    return leaks


async def in_database(db: AsyncEngine) -> list[str]:
    leaks = []
    async with db.connect() as conn:
        for table in TABLES:
            for row in await conn.execute(text(f"SELECT * FROM {table}")):
                for column, value in row._mapping.items():
                    blob = value if isinstance(value, bytes) else repr(value)
                    leaks += found(f"{table}.{column}", blob)
    return leaks


def on_disk(root: Path) -> list[str]:
    return [
        leak
        for path in sorted(root.rglob("*"))
        if path.is_file()
        for leak in found(f"file {path.relative_to(root)}", path.read_bytes())
    ]


async def audited(db: AsyncEngine, count: int) -> None:
    async def enough() -> bool:
        async with db.connect() as conn:
            rows = (await conn.execute(text("SELECT count(*) FROM run_data_request"))).scalar()
        assert rows is not None and rows <= count, f"{rows} audit rows for {count} requests"
        return rows == count

    await async_wait_for(enough, timeout=20)


async def stored_secrets(db: AsyncEngine, key: str) -> set[str]:
    """Every stored variable, decrypted: the secrets are in the database, encrypted."""
    box = SecretBox([key])
    async with db.connect() as conn:
        tokens = (await conn.execute(text("SELECT value FROM data_source_env_var"))).scalars()
        return {box.decrypt(t) for t in tokens if t is not None}


@contextmanager
def published_messages(prefix: str) -> Iterator[list[bytes]]:
    """Every Pub/Sub message published under the prefix while the block runs."""
    client = sync_redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    pubsub.psubscribe(f"{prefix}*")
    messages: list[bytes] = []
    try:
        yield messages
        while (message := pubsub.get_message(timeout=1.0)) is not None:
            if message["type"] == "pmessage":
                messages.append(repr(message).encode())
    finally:
        pubsub.close()
        client.close()


async def search_everything(
    seen: Driven, logs: str, db: AsyncEngine, prefix: str, messages: list[bytes], root: Path
) -> list[str]:
    assert messages, "no registry announcement seen: the Pub/Sub search would prove nothing"
    return [
        *in_responses(seen.responses),
        *(leak for line in logs.splitlines() for leak in found(f"log line {line[:200]!r}", line)),
        *in_redis(prefix),
        *(leak for m in messages for leak in found("a published message", m)),
        *await in_database(db),
        *on_disk(root),
    ]


# --- the two passes ------------------------------------------------------------------------


async def test_no_secret_leaves_an_in_thread_broker(
    settings: Settings,
    db: AsyncEngine,
    upstream: Upstream,
    redis_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    spans: InMemorySpanExporter,
) -> None:
    caplog.set_level(logging.DEBUG)
    with black_hole() as hole, published_messages(redis_prefix) as messages:
        with serve_in_thread(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                seen = await drive(client, upstream, hole)
                await audited(db, seen.resolved)
    # Traces on: every span of every request searched, failed ones (the upstream's) included.
    traced = spans.get_finished_spans()
    assert {span.name for span in traced if span.status.status_code is StatusCode.ERROR} >= {
        "databroker.request",
        "upstream",
    }
    assert_secrets_reached_upstream(upstream)
    assert settings.secret_key is not None
    assert set(SECRETS.values()) <= await stored_secrets(db, settings.secret_key.get_secret_value())
    assert len(caplog.records) > 0
    logs = caplog.text + "".join(repr(vars(r)) for r in caplog.records)
    leaks = await search_everything(seen, logs, db, redis_prefix, messages, tmp_path)
    leaks += [leak for span in traced for leak in found(f"span {span.name}", span.to_json())]
    assert leaks == [], "secrets found in:\n" + "\n".join(leaks)


@pytest.mark.slow
async def test_no_secret_leaves_the_console_script(
    pg_url: str, db: AsyncEngine, upstream: Upstream, redis_prefix: str, tmp_path: Path
) -> None:
    key = Fernet.generate_key().decode()
    env = clean_env(
        database_url=pg_url,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        admin_token=ADMIN_TOKEN,
        secret_key=key,
        outbox_dir=str(tmp_path / "outbox"),
        # Every line there is: JSON (a database URL is set), at DEBUG, with the access log.
        log_level="debug",
        access_log="1",
    )
    with black_hole() as hole, published_messages(redis_prefix) as messages:
        async with serving(env, tmp_path) as (process, client):
            seen = await drive(client, upstream, hole)
            terminate(process)  # SIGTERM: the outbox is shipped before exit
    await audited(db, seen.resolved)
    assert_secrets_reached_upstream(upstream)
    assert set(SECRETS.values()) <= await stored_secrets(db, key)
    logs = log_of(tmp_path)
    assert "Uvicorn running" in logs or "Application startup complete" in logs, logs
    assert '"logger":"databroker.access"' in logs and '"run_id":' in logs, logs
    leaks = await search_everything(seen, logs, db, redis_prefix, messages, tmp_path)
    assert leaks == [], "secrets found in:\n" + "\n".join(leaks)


@pytest.mark.parametrize(
    ("body", "charset"),
    [
        (f'<?xml version="1.0" encoding="{CANARY}"?><a/>'.encode(), None),
        (b"{}", CANARY),
    ],
)
def test_a_parse_error_quotes_nothing_the_upstream_sent(body: bytes, charset: str | None) -> None:
    """An upstream reflecting a secret into its declared encoding must not put it in the error."""
    response_type = "XML" if body.startswith(b"<") else "JSON"
    with pytest.raises(ParseError) as info:
        parse_body(body, response_type, charset)
    assert CANARY not in info.value.message


# --- objects that hold a secret never show it ----------------------------------------------


def shown(obj: object) -> str:
    """Everything a traceback, a ``%r``/``%s`` or a test diff prints of ``obj``."""
    return f"{obj!r} {obj!s}"


def test_a_served_source_shows_its_variables_by_name_only() -> None:
    now = datetime.now(UTC)
    row = source_row(
        data_source_id=uuid.uuid4(),
        name="scored",
        description=None,
        source={"url": "https://x.example/{{ id }}", "headers": {"X-Key": "{{ env.KEY }}"}},
        caching_enabled=False,
        caching_ttl=None,
        caching_stale_if_error=None,
        runtime_params=["id"],
        variables=["KEY"],
        status="PUBLISHED",
        project_id=None,
        meta=None,
        created_at=now,
        last_updated_at=now,
    )
    source = Source.from_row(row, Secrets({"KEY": SECRETS["HEADER_SECRET"]}), Secrets(CREDENTIALS))
    rendered = render(source.compiled, {"id": "1"}, source.values)
    assert dict(rendered.headers)["X-Key"] == SECRETS["HEADER_SECRET"]  # it is in there
    assert source.credentials["PASSWORD"] == CREDENTIALS["PASSWORD"]
    for obj in (source, source.values, source.credentials, rendered):
        assert CANARY not in shown(obj)
    assert "KEY" in repr(source.values)  # names are not secret: MISSING_VARIABLES lists them
    # A diff of two sources drills into their fields: the values compare, but print by name.
    other = Secrets({"KEY": SECRETS["QUERY_SECRET"]})
    assert source.values != other and CANARY not in shown(other)


def test_keys_and_urls_with_passwords_are_never_shown() -> None:
    key = Fernet.generate_key().decode()
    settings = Settings(
        database_url=f"postgresql+asyncpg://u:{CANARY}@db/x",
        redis_url=f"redis://:{CANARY}@redis:6379/0",
        secret_key=key,
        admin_token=CANARY,
    )
    box = SecretBox([key])
    item = VariableValue(name="TOKEN", value=SECRETS["JSON_SECRET"])
    for obj in (settings, box, item):
        assert CANARY not in shown(obj) and key not in shown(obj)
