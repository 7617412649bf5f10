"""proxy.client: what it imports, its error tree and retry decisions (pure), then against a
real ``databroker serve`` over TCP and over a Unix socket, and its retries against a small
real server on 127.0.0.1 that answers what each test scripts."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import client as broker_client
from proxy import errors as server_errors
from proxy.client import (
    ERRORS,
    Answer,
    AsyncClient,
    BrokerError,
    BrokerUnavailable,
    BudgetExhausted,
    CircuitOpen,
    Client,
    DataSourceNotFound,
    MissingParams,
    RateLimited,
    Retries,
    UnknownParams,
    UpstreamHTTPError,
    parse_retry_after,
)
from tests.conftest import REDIS_URL
from tests.harness import admin_headers, free_port, sidecar_env, wait_for
from tests.imports import loaded_beyond_stdlib
from tests.instances import databroker, log_of
from tests.servers import Upstream, serve_in_thread

# Every code of DESIGN.md's error tables, both releases, and the README's.
DESIGN_CODES = {
    "INVALID_REQUEST",
    "DATA_SOURCE_NOT_FOUND",
    "MISSING_VARIABLES",
    "MISSING_PARAMS",
    "UNKNOWN_PARAMS",
    "INVALID_PARAM",
    "TIMEOUT",
    "CONNECTION_ERROR",
    "HTTP_ERROR",
    "RESPONSE_TOO_LARGE",
    "PARSE_ERROR",
    "INTERNAL",
    "BUDGET_EXHAUSTED",
    "RATE_LIMITED",
    "CIRCUIT_OPEN",
    "SOURCE_PAUSED",
    "AUTH_ERROR",
    "REPLAY_MISS",
    "EGRESS_DENIED",
    "AUDIT_BACKLOG_FULL",
}
FAILED = {
    "data_object_id": None,
    "origin": None,
    "key": None,
    "value": None,
    "start_time": None,
    "end_time": None,
}
SUCCESS = {
    "data_object_id": "6f2b1c1e-0c4e-4a57-9a55-0d1c2b3a4f5e",
    "origin": "REQUEST",
    "key": "23bdedad00a76a068a212944037962ac",
    "value": {"score": 710},
    "start_time": 1.0,
    "end_time": 2.0,
    "error": None,
}
QUICK = Retries(attempts=3, total=5.0, backoff=0.01, max_backoff=0.02)


# --- what it imports -------------------------------------------------------------------------


def test_imports_nothing_but_httpx_and_the_standard_library() -> None:
    source = Path(broker_client.__file__).read_text()
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.level)
    }
    assert imported - set(sys.stdlib_module_names) == {"httpx"}, imported
    # And at run time: what importing it loads beyond httpx.
    assert loaded_beyond_stdlib("proxy.client", already="import httpx") == {
        "proxy",
        "proxy.client",
    }


# --- errors (pure) ---------------------------------------------------------------------------


def server_codes() -> set[str]:
    """Codes the broker route can answer today, from the server's own error tree."""
    found = set()
    pending: list[type[server_errors.BrokerError]] = [server_errors.BrokerError]
    while pending:
        cls = pending.pop()
        if cls is not server_errors.AdminError:
            pending.extend(cls.__subclasses__())
            found.add(cls.code)
    return found


def test_every_error_code_has_its_own_class() -> None:
    assert DESIGN_CODES | server_codes() <= set(ERRORS)
    assert len(set(ERRORS.values())) == len(ERRORS)
    for code, cls in ERRORS.items():
        assert issubclass(cls, BrokerError) and cls.code == code
        assert cls.__name__ in broker_client.__all__


def response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers or {})


def failure(code: str, **details: Any) -> dict[str, Any]:
    return {**FAILED, "error": {"code": code, "message": f"{code} here", **details}}


def test_answers_and_errors_from_the_wire() -> None:
    answer = broker_client._outcome(response(200, {**SUCCESS, "stale": True}))
    assert answer == Answer(**{k: v for k, v in SUCCESS.items() if k != "error"}, stale=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.value = None  # type: ignore[misc]

    error = broker_client._outcome(response(502, failure("HTTP_ERROR", upstream_status=418)))
    assert type(error) is UpstreamHTTPError and error.upstream_status == 418
    assert (error.status, error.code, error.message) == (502, "HTTP_ERROR", "HTTP_ERROR here")

    missing = broker_client._outcome(response(400, failure("MISSING_PARAMS", params=["a"])))
    assert type(missing) is MissingParams and missing.details == {"params": ["a"]}

    unknown = broker_client._outcome(response(409, failure("SOMETHING_NEW")))
    assert type(unknown) is BrokerError and unknown.code == "SOMETHING_NEW"

    for status, body in [(503, b"Service Unavailable"), (200, {"value": 1}), (404, b"{}")]:
        odd = broker_client._outcome(response(status, body))
        assert type(odd) is BrokerError and odd.code is None and odd.status == status


# --- retry decisions (pure) -------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = time.time()
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert parse_retry_after("7") == 7.0
    assert 58 <= (parse_retry_after(in_a_minute, now) or 0) <= 61
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: now
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None


def test_which_errors_are_retried_and_how_long_after() -> None:
    retries = Retries(attempts=3, total=10.0, backoff=0.2, max_backoff=0.3)
    limited = RateLimited("x", status=429)
    assert 0.1 <= (retries.wait(limited, 0, 0.0) or 0) <= 0.2
    assert 0.15 <= (retries.wait(limited, 1, 0.0) or 0) <= 0.3  # doubled, then capped
    assert retries.wait(limited, 2, 0.0) is None  # the third attempt was the last
    told = CircuitOpen("x", status=503, retry_after=2.0)
    assert 2.0 <= (retries.wait(told, 0, 0.0) or 0) <= 2.2
    assert retries.wait(told, 0, 8.5) is None  # would start past `total`
    assert retries.wait(BudgetExhausted("x", status=429), 0, 0.0) is None
    assert retries.wait(DataSourceNotFound("x", status=404), 0, 0.0) is None
    assert retries.wait(BrokerError("proxy page", status=503), 0, 0.0) is not None
    assert retries.wait(BrokerUnavailable("refused", sent=False), 0, 0.0) is not None
    assert retries.wait(BrokerUnavailable("read timeout", sent=True), 0, 0.0) is None


def test_client_needs_one_address() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client()
    with pytest.raises(ValueError, match="not both"):
        AsyncClient("http://127.0.0.1:1", uds="/tmp/x.sock")


# --- against a real databroker serve ----------------------------------------------------------


@dataclass
class Brokers:
    tcp: str
    uds: str
    source: str


@pytest.fixture(scope="module")
def brokers(
    pg_url: str, upstream_server: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Brokers]:
    """Two ``databroker serve`` on one database and Redis prefix: one on TCP, one on a socket.

    The source is registered through the first before the second starts (and loads it).
    """
    root = tmp_path_factory.mktemp("client")
    prefix = f"dbtest:{uuid.uuid4().hex[:12]}:"
    env = sidecar_env(pg_url, REDIS_URL, root / "outbox", redis_prefix=prefix)
    name = f"client_user_{uuid.uuid4().hex[:8]}"

    async def echo(request: Request) -> Response:
        return JSONResponse({"id": request.query_params["id"]})

    url = upstream_server.on(f"/{name}", echo)
    port = free_port()
    with databroker(["serve", "--port", str(port)], env, root, "tcp.log") as tcp:
        base = f"http://127.0.0.1:{port}"
        started(tcp, root, "tcp.log", httpx.Client(base_url=base))
        spec = {
            "name": name,
            "source": {"url": url + "?id={{ user_id }}", "response_type": "JSON", "timeout": 5},
            "caching": {"enabled": True, "ttl": 3600},
        }
        with httpx.Client(base_url=base, headers=admin_headers()) as admin:
            sid = admin.post("/data-sources", json=spec).raise_for_status().json()["data_source_id"]
            admin.post(f"/data-sources/{sid}/publish").raise_for_status()
        socket_path = str(root / "databroker.sock")
        with databroker(["serve", "--uds", socket_path], env, root, "uds.log") as uds:
            transport = httpx.HTTPTransport(uds=socket_path)
            started(uds, root, "uds.log", httpx.Client(transport=transport, base_url="http://x"))
            yield Brokers(tcp=base, uds=socket_path, source=name)


def started(process: subprocess.Popen[bytes], root: Path, log: str, http: httpx.Client) -> None:
    def healthy() -> bool:
        assert process.poll() is None, f"databroker exited:\n{log_of(root, log)}"
        try:
            return http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    with http:
        wait_for(healthy, timeout=60, interval=0.1)


def connect(kind: str, brokers: Brokers, client: type[Client] | type[AsyncClient]) -> Any:
    return client(brokers.tcp) if kind == "tcp" else client(uds=brokers.uds)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tcp", "uds"])
def test_sync_client_against_serve(kind: str, brokers: Brokers) -> None:
    user = uuid.uuid4().hex
    with connect(kind, brokers, Client) as broker:
        first = broker.request(brokers.source, {"user_id": user}, uuid.uuid4())
        again = broker.request(brokers.source, {"user_id": user}, str(uuid.uuid4()))
        assert (first.origin, again.origin) == ("REQUEST", "CACHE")
        assert first.value == again.value == {"id": user}
        assert first.data_object_id == again.data_object_id and first.key == again.key
        assert first.start_time is not None and again.start_time is None
        assert (again.stale, again.replay) == (False, None)

        with pytest.raises(DataSourceNotFound) as not_found:
            broker.request("no_such_source", {}, uuid.uuid4())
        assert (not_found.value.status, not_found.value.code) == (404, "DATA_SOURCE_NOT_FOUND")
        with pytest.raises(MissingParams) as missing:
            broker.request(brokers.source, {}, uuid.uuid4())
        assert missing.value.details["params"] == ["user_id"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tcp", "uds"])
async def test_async_client_against_serve(kind: str, brokers: Brokers) -> None:
    user = uuid.uuid4().hex
    async with connect(kind, brokers, AsyncClient) as broker:
        answers = await asyncio.gather(
            *(broker.request(brokers.source, {"user_id": user}, uuid.uuid4()) for _ in range(5))
        )
        assert {a.data_object_id for a in answers} == {answers[0].data_object_id}
        assert sorted(a.origin for a in answers) == ["CACHE"] * 4 + ["REQUEST"]
        with pytest.raises(UnknownParams) as unknown:
            await broker.request(brokers.source, {"user_id": user, "extra": 1}, uuid.uuid4())
        assert unknown.value.status == 400 and unknown.value.details["params"] == ["extra"]


# --- retries, against a scripted server --------------------------------------------------------


@dataclass
class Script:
    """Answers in order (the last one repeats), and what arrived: when, from which port."""

    answers: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def broker(request: Request) -> Response:
            assert request.client is not None
            self.arrivals.append((time.monotonic(), request.client.port))
            status, headers, body = self.answers[min(len(self.arrivals), len(self.answers)) - 1]
            if isinstance(body, bytes):
                return Response(body, status, headers, media_type="text/plain")
            return JSONResponse(body, status, headers)

        return Starlette(routes=[Route("/internal/data-broker", broker, methods=["POST"])])


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()
    with serve_in_thread(script.app()) as url:
        yield url, script


@pytest.fixture
def server(scripted: tuple[str, Script]) -> tuple[str, Script]:
    url, script = scripted
    script.answers.clear()
    script.arrivals.clear()
    return url, script


def call(kind: str, url: str, retries: Retries, times: int = 1) -> list[Answer]:
    """``times`` requests through one client, sync or async."""
    if kind == "sync":
        with Client(url, retries=retries) as broker:
            return [broker.request("s", {}, uuid.uuid4()) for _ in range(times)]

    async def run() -> list[Answer]:
        async with AsyncClient(url, retries=retries) as broker:
            return [await broker.request("s", {}, uuid.uuid4()) for _ in range(times)]

    return asyncio.run(run())


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@KINDS
def test_retries_a_503_after_its_retry_after(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers += [(503, {"Retry-After": "1"}, failure("CIRCUIT_OPEN")), (200, {}, SUCCESS)]
    (answer,) = call(kind, url, Retries(attempts=3, total=10.0))
    assert answer.value == {"score": 710}
    assert len(script.arrivals) == 2
    assert script.arrivals[1][0] - script.arrivals[0][0] >= 1.0  # the wait really happened


@KINDS
def test_gives_up_after_its_attempts(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers.append((429, {}, failure("RATE_LIMITED")))
    with pytest.raises(RateLimited) as limited:
        call(kind, url, QUICK)
    assert len(script.arrivals) == QUICK.attempts
    assert limited.value.status == 429 and limited.value.retry_after is None


@KINDS
def test_a_retry_after_past_the_total_is_not_waited(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers.append((503, {"Retry-After": "30"}, failure("SOURCE_PAUSED")))
    with pytest.raises(BrokerError) as paused:
        call(kind, url, QUICK)
    assert paused.value.code == "SOURCE_PAUSED" and paused.value.retry_after == 30.0
    assert len(script.arrivals) == 1


@KINDS
def test_a_spent_budget_is_not_retried(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers.append((429, {"Retry-After": "1"}, failure("BUDGET_EXHAUSTED")))
    with pytest.raises(BudgetExhausted):
        call(kind, url, QUICK)
    assert len(script.arrivals) == 1


@KINDS
def test_a_503_not_from_the_broker_is_retried_too(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers.append((503, {}, b"Service Unavailable"))
    with pytest.raises(BrokerError) as busy:
        call(kind, url, QUICK)
    assert (busy.value.code, busy.value.status) == (None, 503)
    assert len(script.arrivals) == QUICK.attempts


@KINDS
def test_one_connection_serves_every_request(kind: str, server: tuple[str, Script]) -> None:
    url, script = server
    script.answers += [(503, {}, failure("AUDIT_BACKLOG_FULL")), (200, {}, SUCCESS)]
    call(kind, url, QUICK, times=3)
    assert len(script.arrivals) == 4
    assert len({port for _, port in script.arrivals}) == 1


@KINDS
def test_nothing_listening_is_unavailable_after_retries(kind: str, tmp_path: Path) -> None:
    socket_path = str(tmp_path / "absent.sock")

    async def run_async() -> None:
        async with AsyncClient(uds=socket_path, retries=QUICK) as broker:
            await broker.request("s", {}, uuid.uuid4())

    with pytest.raises(BrokerUnavailable) as unavailable:
        if kind == "sync":
            with Client(uds=socket_path, retries=QUICK) as broker:
                broker.request("s", {}, uuid.uuid4())
        else:
            asyncio.run(run_async())
    assert unavailable.value.sent is False
    assert isinstance(unavailable.value.__cause__, httpx.ConnectError)
