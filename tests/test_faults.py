"""The fault suite: real processes, really killed and stopped, and hostile upstreams.

The sidecar runs as ``databroker serve`` on a private PostgreSQL and a private
Redis (``tests.instances``), never the machine's shared ones: it is killed
with SIGKILL under load, its database and its Redis are stopped and started
again under it. Hostile upstreams go through the in-thread broker. Every test
asserts exact counts; the figures it measures are printed (``-s`` shows them)
and kept in ``bench-results/faults.json`` for the README.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.requests import Request
from starlette.responses import Response

from proxy.keys import make_cache_key
from tests.conftest import REDIS_URL, Broker
from tests.harness import async_wait_for, register, sidecar_env, wait_for
from tests.instances import PostgresInstance, RedisCluster, RedisInstance, Sidecar, sidecar
from tests.servers import Upstream
from tests.test_flow import rows
from tests.test_shutdown import slow_json

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parent.parent / "bench-results" / "faults.json"
MiB = 1024 * 1024
GiB = 1024 * MiB


def report(name: str, **figures: Any) -> None:
    """Print a test's figures and keep them in bench-results/faults.json (merged by name)."""
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    try:
        results = json.loads(RESULTS.read_text())
    except (FileNotFoundError, ValueError):
        results = {}
    results[name] = figures
    # Written whole then renamed: a concurrent run reads the old file or the new, never half.
    partial = RESULTS.with_name(f".{RESULTS.name}.{uuid.uuid4().hex}")
    partial.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    partial.replace(RESULTS)


@pytest.fixture
async def private_db(private_pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's side of the private database; no pool, so a Postgres restart costs nothing."""
    engine = create_async_engine(private_pg_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


def counted_spec(name: str, url: str) -> dict[str, Any]:
    """A cached JSON source with one runtime param ``n``: distinct ``n``, distinct keys."""
    return {
        "name": name,
        "source": {"url": url, "params": {"n": "{{ n }}"}, "response_type": "JSON", "timeout": 10},
        "caching": {"enabled": True, "ttl": 600},
    }


async def audit_counts(db: AsyncEngine) -> tuple[Counter[uuid.UUID], set[uuid.UUID]]:
    """Audit rows per run_id, and the ids of every stored DataObject."""
    audit = await rows(db, "SELECT run_id FROM run_data_request")
    objects = await rows(db, "SELECT data_object_id FROM data_object")
    return (
        Counter(r["run_id"] for r in audit),  # type: ignore[misc]
        {r["data_object_id"] for r in objects},  # type: ignore[misc]
    )


def outbox_bytes(directory: Path) -> int:
    """What every segment in the outbox directory holds (shipped segments are removed)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


async def fire(
    node: Sidecar, name: str, params: list[dict[str, Any]]
) -> list[tuple[uuid.UUID, httpx.Response]]:
    """Send one request per params dict at once, each with a run_id of its own."""
    run_ids = [uuid.uuid4() for _ in params]
    answers = await asyncio.gather(
        *(node.call(name, p, r) for p, r in zip(params, run_ids, strict=True))
    )
    return list(zip(run_ids, answers, strict=True))


# --- kill -9 under load ------------------------------------------------------------------


async def test_kill_9_under_load_loses_and_doubles_nothing(
    private_pg_url: str,
    private_db: AsyncEngine,
    private_redis: RedisInstance,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "outbox"
    env = sidecar_env(private_pg_url, private_redis.url, outbox)
    url = slow_json(upstream, "/load")
    total = 400
    run_ids = [uuid.uuid4() for _ in range(total)]
    answered: dict[uuid.UUID, dict[str, Any]] = {}
    cut: list[uuid.UUID] = []

    async with sidecar(env, tmp_path, max_connections=total) as first:
        sid = (await register(first.client, counted_spec("load", url)))["data_source_id"]

        async def call(i: int) -> None:
            try:
                answer = await first.call("load", {"n": str(i)}, run_ids[i])
            except httpx.TransportError:  # in flight or queued when the process died
                cut.append(run_ids[i])
                return
            answered[run_ids[i]] = {"status": answer.status_code, "n": str(i), **answer.json()}

        calls = [asyncio.create_task(call(i)) for i in range(total)]
        try:

            async def a_quarter_answered() -> bool:
                return len(answered) >= total // 4

            await async_wait_for(a_quarter_answered, timeout=30, interval=0.005)
            first.kill()
            await asyncio.gather(*calls)
        finally:
            for task in calls:
                task.cancel()
    calls_before_restart = upstream.hits("/load")

    assert len(answered) + len(cut) == total
    assert cut, "the kill landed after the load: nothing was in flight"
    for answer in answered.values():
        assert answer["status"] == 200, answer
        assert answer["origin"] == "REQUEST" and answer["value"] == {"n": answer["n"]}, answer

    # The same outbox directory: the new process ships what the killed one left.
    async with sidecar(env, tmp_path) as second:
        await async_wait_for(lambda: _drained(second, outbox), timeout=30)

    per_run, _ = await audit_counts(private_db)
    lost = set(answered) - set(per_run)
    duplicates = sum(count - 1 for count in per_run.values())
    journaled_unanswered = set(per_run) - set(answered)
    audit = await rows(private_db, "SELECT run_id, data_object_id FROM run_data_request")
    stored = {
        str(r["data_object_id"]): r
        for r in await rows(
            private_db, "SELECT data_object_id, data_source_id, key, value FROM data_object"
        )
    }
    # The raw body is journaled as soon as it arrives, the audit row when the answer is
    # ready: a kill between the two leaves a DataObject no request row names.
    orphans = set(stored) - {str(r["data_object_id"]) for r in audit}
    report(
        "kill_9_under_load",
        requests=total,
        answered=len(answered),
        cut_by_the_kill=len(cut),
        records_lost=len(lost),
        duplicates=duplicates,
        journaled_but_unanswered=len(journaled_unanswered),
        data_objects_without_audit_row=len(orphans),
        upstream_calls=calls_before_restart,
        upstream_calls_without_data_object=calls_before_restart - len(stored),
    )
    assert lost == set()
    assert duplicates == 0
    # A row no client saw is a response lost in the kill, never a request that was not made.
    assert journaled_unanswered <= set(cut)
    # Every audit row has its DataObject; each key was fetched (and stored) at most once.
    assert {str(r["data_object_id"]) for r in audit} <= set(stored)
    keys = Counter(r["key"] for r in stored.values())
    assert max(keys.values()) == 1
    cut_keys = {make_cache_key(sid, {"n": n}) for n in _params_of(cut, run_ids)}
    assert {stored[o]["key"] for o in orphans} <= cut_keys
    for row in audit:
        answer = answered.get(row["run_id"])  # type: ignore[call-overload]
        if answer is not None:
            assert str(row["data_object_id"]) == answer["data_object_id"]
            assert json.loads(stored[answer["data_object_id"]]["value"]) == answer["value"]  # type: ignore[arg-type]
    assert {str(r["data_source_id"]) for r in stored.values()} == {sid}
    assert upstream.hits("/load") == calls_before_restart  # the replay called nobody


def _params_of(cut: list[uuid.UUID], run_ids: list[uuid.UUID]) -> list[str]:
    """The ``n`` each cut request was sent with (request ``i`` carried ``n=i``)."""
    return [str(run_ids.index(run_id)) for run_id in cut]


async def _drained(node: Sidecar, outbox: Path) -> bool:
    """Nothing left on disk (the live segment is empty) and the writer agrees."""
    if outbox_bytes(outbox) != 0:
        return False
    _, ready = await node.readyz()
    return bool(ready["outbox_backlog_bytes"] == 0)


# --- PostgreSQL outage under load --------------------------------------------------------


# fast: sessions are ended cleanly; immediate: as a crash (recovery replays the WAL on start).
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_outage_under_load_then_everything_is_written(
    private_pg: PostgresInstance,
    private_pg_url: str,
    private_db: AsyncEngine,
    private_redis: RedisInstance,
    upstream: Upstream,
    tmp_path: Path,
    mode: str,
) -> None:
    env = sidecar_env(
        private_pg_url,
        private_redis.url,
        tmp_path / "outbox",
        outbox_flush_interval="0.05",
        dependency_check_interval="0.05",
    )
    url = slow_json(upstream, "/outage")
    warm, waves, per_wave = 20, 10, 40
    answered: list[tuple[uuid.UUID, httpx.Response]] = []
    async with sidecar(env, tmp_path, max_connections=per_wave) as node:
        await register(node.client, counted_spec("outage", url))
        answered += await fire(node, "outage", [{"n": str(i)} for i in range(warm)])
        assert all(a.status_code == 200 for _, a in answered)

        private_pg.stop(mode)
        down = time.monotonic()
        backlog: list[int] = []
        during: list[httpx.Response] = []
        fresh = iter(range(warm, warm + waves * per_wave))
        for _ in range(waves):
            # Half hits on warmed keys, half misses on new ones.
            params = [{"n": str(i % warm)} for i in range(per_wave // 2)]
            params += [{"n": str(next(fresh))} for _ in range(per_wave // 2)]
            wave = await fire(node, "outage", params)
            answered += wave
            during += [a for _, a in wave]
            # The backlog grows with every wave (a wait that times out fails the test), and
            # the pod stays ready: it serves, through the outbox (the database is only shown).
            grown = await async_wait_for(lambda: _backlog_above(node, max(backlog, default=0)))
            status, ready = grown
            assert status == 200 and ready["status"] == "ready", ready
            assert ready["database"] == "degraded" and ready["redis"] == "ok", ready
            backlog.append(ready["outbox_backlog_bytes"])
        outage_seconds = time.monotonic() - down

        ok = [a for a in during if a.status_code == 200]
        origins = Counter(a.json()["origin"] for a in ok)
        misses = warm + waves * per_wave // 2

        private_pg.start()
        up = time.monotonic()

        async def all_written() -> bool:
            per_run, objects = await audit_counts(private_db)
            return sum(per_run.values()) == len(answered) and len(objects) == misses

        await async_wait_for(all_written, timeout=30, interval=0.01)
        recovery_seconds = time.monotonic() - up
        await async_wait_for(lambda: _ready_and_drained(node), timeout=30)

    per_run, objects = await audit_counts(private_db)
    report(
        f"postgres_outage_{mode}",
        requests_during_outage=len(during),
        answered_200_during_outage=len(ok),
        hits_during_outage=origins["CACHE"],
        misses_during_outage=origins["REQUEST"],
        outage_seconds=round(outage_seconds, 2),
        outbox_backlog_bytes_at_end=backlog[-1],
        recovery_seconds=round(recovery_seconds, 3),
        rows=sum(per_run.values()),
        answered=len(answered),
    )
    assert len(ok) == len(during) == waves * per_wave
    assert origins == {"CACHE": waves * per_wave // 2, "REQUEST": waves * per_wave // 2}
    assert set(per_run) == {run_id for run_id, _ in answered} and max(per_run.values()) == 1
    assert objects == {
        uuid.UUID(a.json()["data_object_id"])
        for _, a in answered
        if a.json()["origin"] == "REQUEST"
    }
    assert upstream.hits("/outage") == misses


async def _backlog_above(node: Sidecar, floor: int) -> tuple[int, dict[str, Any]] | None:
    """The answer once the backlog passed ``floor`` and the database is seen down."""
    status, ready = await node.readyz()
    grown = ready["outbox_backlog_bytes"] > floor and ready["database"] == "degraded"
    return (status, ready) if grown else None


async def _ready_and_drained(node: Sidecar) -> bool:
    status, ready = await node.readyz()
    return status == 200 and ready["outbox_backlog_bytes"] == 0


# --- Redis outage ------------------------------------------------------------------------


def _redis_degraded(node: Sidecar) -> Callable[[], Awaitable[tuple[int, dict[str, Any]] | None]]:
    async def seen() -> tuple[int, dict[str, Any]] | None:
        status, ready = await node.readyz()
        return (status, ready) if ready["redis"] == "degraded" else None

    return seen


def redis_warnings(node: Sidecar) -> list[str]:
    return [
        line for line in node.log().splitlines() if "WARNING" in line and "redis" in line.lower()
    ]


async def test_redis_outage_answers_from_upstream_and_the_cache_comes_back(
    private_pg_url: str,
    private_db: AsyncEngine,
    private_redis: RedisInstance,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    env = sidecar_env(
        private_pg_url, private_redis.url, tmp_path / "outbox", dependency_check_interval="0.05"
    )
    url = slow_json(upstream, "/redis-outage")
    run_ids: list[uuid.UUID] = []

    async def origin(node: Sidecar, n: int) -> str:
        run_ids.append(uuid.uuid4())
        answer = await node.call("cached", {"n": str(n)}, run_ids[-1])
        assert answer.status_code == 200, answer.text
        assert answer.json()["value"] == {"n": str(n)}
        return str(answer.json()["origin"])

    async with sidecar(env, tmp_path) as node:
        await register(node.client, counted_spec("cached", url))
        assert [await origin(node, 0), await origin(node, 0)] == ["REQUEST", "CACHE"]
        assert redis_warnings(node) == []

        private_redis.stop()
        during = 30
        started = time.monotonic()
        origins = [await origin(node, n % 10) for n in range(during)]  # n=0 was cached
        seconds_per_request = (time.monotonic() - started) / during
        assert origins == ["REQUEST"] * during
        assert upstream.hits("/redis-outage") == 1 + during
        # Still ready (it answers, from the upstream); Redis is shown degraded.
        status, ready = await async_wait_for(_redis_degraded(node))
        assert status == 200 and ready["status"] == "ready", ready
        assert ready["database"] == "ok", ready
        warnings_during = redis_warnings(node)

        private_redis.start()  # same port, empty: the sidecar is not restarted
        back = time.monotonic()
        fresh = iter(range(1000, 2000))

        async def cache_works() -> bool:
            n = next(fresh)
            return [await origin(node, n), await origin(node, n)] == ["REQUEST", "CACHE"]

        await async_wait_for(cache_works, timeout=30)
        recovery_seconds = time.monotonic() - back
        warnings_after = redis_warnings(node)

        async def all_written() -> bool:
            per_run, _ = await audit_counts(private_db)
            return sum(per_run.values()) == len(run_ids)

        await async_wait_for(all_written, timeout=30)

    per_run, _ = await audit_counts(private_db)
    report(
        "redis_outage",
        requests_during_outage=during,
        answered_200_during_outage=len(origins),
        upstream_calls_during_outage=during,
        warnings_during_outage=len(warnings_during),
        mean_seconds_per_request_during_outage=round(seconds_per_request, 4),
        cache_recovery_seconds=round(recovery_seconds, 3),
    )
    # Once per outage for each part that uses Redis (the cache, the vendor state poller).
    cache_during = [w for w in warnings_during if '"logger":"databroker.broker"' in w]
    assert len(cache_during) == 1 and "Redis unavailable" in cache_during[0], warnings_during
    loggers = [json.loads(w)["logger"] for w in warnings_during]
    assert len(loggers) == len(set(loggers)), warnings_during
    cache_after = [w for w in warnings_after if '"logger":"databroker.broker"' in w]
    assert len(cache_after) == 2 and "Redis reachable again" in cache_after[1], warnings_after
    assert set(per_run) == set(run_ids) and max(per_run.values()) == 1


# --- hostile upstreams -------------------------------------------------------------------


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A raw TCP server in the test's loop that misbehaves below HTTP; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.finished = 0
        self.behaviour: Behaviour
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/raw"

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the broker gave up on us: that is the point
        finally:
            writer.close()
            self.finished += 1

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.close()


async def _hang(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
    await reader.read()  # answers nothing; returns when the broker hangs up


def _reset_after(sent: bytes) -> Behaviour:
    async def behaviour(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sent)
        await writer.drain()
        # SO_LINGER 0: close() sends a TCP RST, not a FIN.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return behaviour


async def _drip(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    while True:  # a byte every 50 ms: each read is quick, the whole never ends
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.05)


async def assert_failed_once(
    broker: Broker, db: AsyncEngine, redis_prefix: str, answer: httpx.Response, code: str
) -> dict[str, Any]:
    """The documented code, exactly one audit row carrying it, nothing cached."""
    body: dict[str, Any] = answer.json()
    assert body["error"]["code"] == code, body
    assert body["origin"] == "REQUEST" and body["value"] is None
    await async_wait_for(lambda: rows(db, "SELECT 1 FROM run_data_request"))

    async def drained() -> bool:
        return bool((await broker.client.get("/readyz")).json()["outbox_backlog_bytes"] == 0)

    await async_wait_for(drained)
    audit = await rows(db, "SELECT error, data_origin FROM run_data_request")
    assert len(audit) == 1, audit
    assert audit[0]["error"]["code"] == code and audit[0]["data_origin"] == "REQUEST"  # type: ignore[index]
    cached = sync_redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}cache:*")
    assert cached == []
    return body


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        pytest.param(_hang, "TIMEOUT", id="hangs"),
        pytest.param(
            _reset_after(b"HTTP/1.1 200 OK\r\nContent-Type: appli"),
            "CONNECTION_ERROR",
            id="resets-in-headers",
        ),
        pytest.param(
            _reset_after(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"partial": "'
            ),
            "CONNECTION_ERROR",
            id="resets-in-body",
        ),
        pytest.param(_drip, "TIMEOUT", id="drips-bytes"),
    ],
)
async def test_upstream_breaking_the_connection(
    broker: Broker,
    db: AsyncEngine,
    redis_prefix: str,
    raw_upstream: RawUpstream,
    behaviour: Behaviour,
    code: str,
) -> None:
    raw_upstream.behaviour = behaviour
    await broker.register(
        {
            "name": "hostile",
            "source": {"url": raw_upstream.url, "response_type": "JSON", "timeout": 0.5},
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    answer = await broker.call("hostile")
    assert answer.status_code == 502
    await assert_failed_once(broker, db, redis_prefix, answer, code)
    assert raw_upstream.connections == 1
    assert await rows(db, "SELECT 1 FROM data_object") == []


@pytest.mark.parametrize(("failures", "code"), [(4, "HTTP_ERROR"), (2, None)])
async def test_5xx_burst_with_retries(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    redis_prefix: str,
    failures: int,
    code: str | None,
) -> None:
    max_retries = 3
    statuses = iter([503] * failures)

    async def burst(_: Request) -> Response:
        return Response(b'{"ok": 1}', next(statuses, 200), media_type="application/json")

    url = upstream.on("/burst", burst)
    await broker.register(
        {
            "name": "bursty",
            "source": {
                "url": url,
                "response_type": "JSON",
                "retry": {"max_retries": max_retries, "backoff_factor": 0.01},
            },
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    answer = await broker.call("bursty")
    hits = upstream.hits("/burst")
    report(f"5xx_burst_of_{failures}", max_retries=max_retries, upstream_calls=hits)
    if code is None:  # the burst ends within the retries: answered, and cached
        assert answer.status_code == 200 and answer.json()["value"] == {"ok": 1}
        assert hits == failures + 1
        cached = sync_redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}cache:*")
        assert len(cached) == 1
        return
    assert answer.status_code == 502
    body = await assert_failed_once(broker, db, redis_prefix, answer, code)
    assert body["error"]["upstream_status"] == 503
    assert hits == max_retries + 1


def _gigabyte(declared: bool, sent: list[int]) -> Behaviour:
    """1 GiB, chunked or with its Content-Length, written only as fast as the broker reads."""
    chunk = b"x" * MiB  # one buffer, written a thousand times: 1 GiB never exists
    frame = chunk if declared else b"%x\r\n%s\r\n" % (MiB, chunk)
    framing = b"Content-Length: %d" % GiB if declared else b"Transfer-Encoding: chunked"

    async def behaviour(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s\r\n\r\n" % framing)
        while sent[0] < GiB:
            writer.write(frame)
            await writer.drain()  # TCP backpressure: raises once the broker hangs up
            sent[0] += MiB
        if not declared:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return behaviour


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
async def test_a_1_gb_answer_is_abandoned_while_streaming(
    broker: Broker, raw_upstream: RawUpstream, db: AsyncEngine, redis_prefix: str, declared: bool
) -> None:
    sent = [0]
    raw_upstream.behaviour = _gigabyte(declared, sent)
    await broker.register(
        {
            "name": "huge",
            "source": {"url": raw_upstream.url, "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    answer = await broker.call("huge")
    assert answer.status_code == 502
    body = await assert_failed_once(broker, db, redis_prefix, answer, "RESPONSE_TOO_LARGE")
    assert body["error"]["limit"] == broker.settings.max_response_bytes == 10 * MiB

    # The upstream stops writing when the broker hangs up, far from its gigabyte.
    async def upstream_done() -> bool:
        return raw_upstream.finished == 1

    await async_wait_for(upstream_done, timeout=30)
    report(
        f"1_gb_answer_{'content_length' if declared else 'chunked'}",
        upstream_bytes_accepted=sent[0],
        upstream_calls=raw_upstream.connections,
    )
    assert sent[0] < GiB
    assert raw_upstream.connections == 1
    assert await rows(db, "SELECT 1 FROM data_object") == []


@pytest.mark.parametrize(
    ("response_type", "content_type", "content"),
    [
        pytest.param("JSON", "application/json", b'{"half": ', id="json"),
        pytest.param("XML", "application/xml", b"<a><b>unclosed</a>", id="xml"),
        pytest.param(
            "CSV", "text/csv", b'id,blob\n1,"' + b"x" * 200_000 + b'"\n', id="csv-field-over-limit"
        ),
        pytest.param("PLAIN_TEXT", "text/plain", "Grüße".encode("latin-1"), id="text-not-utf8"),
        pytest.param(
            "JSON", "application/json", '{"name": "José"}'.encode("latin-1"), id="json-not-utf8"
        ),
    ],
)
async def test_unparseable_answers(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    redis_prefix: str,
    response_type: str,
    content_type: str,
    content: bytes,
) -> None:
    url = upstream.answer("/garbage", content, content_type=content_type)
    await broker.register(
        {
            "name": "garbage",
            "source": {"url": url, "response_type": response_type},
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    answer = await broker.call("garbage")
    assert answer.status_code == 500
    body = await assert_failed_once(broker, db, redis_prefix, answer, "PARSE_ERROR")
    assert upstream.hits("/garbage") == 1
    # The raw bytes are kept for audit, exactly as received.
    stored = await rows(db, "SELECT data_object_id, value FROM data_object")
    assert stored == [{"data_object_id": uuid.UUID(body["data_object_id"]), "value": content}]


# --- the infrastructure the distributed tests stand on -----------------------------------


async def test_private_redis_cluster_spreads_keys_and_a_node_rejoins(
    redis_cluster: RedisCluster,
) -> None:
    """Guards ``redis_cluster``: three masters really share the slots, and a restart rejoins."""
    client = sync_redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        for i in range(60):
            client.set(f"spread:{{{i}}}", i)
        sizes = [node.client().dbsize() for node in redis_cluster.nodes]
        assert sum(sizes) == 60 and all(size > 0 for size in sizes), sizes
        restarted = redis_cluster.nodes[1]
        restarted.kill()
        restarted.start()  # empty (no persistence), same port, same nodes.conf
        started = time.monotonic()
        wait_for(redis_cluster.healthy, timeout=30)
        report("redis_cluster_node_rejoin", seconds=round(time.monotonic() - started, 2))
    finally:
        client.close()


def test_the_private_instances_are_not_the_shared_ones(
    private_pg: PostgresInstance, private_redis: RedisInstance
) -> None:
    assert private_pg.port != 5432 and private_redis.port != 6379
    assert private_pg.running and private_redis.running
