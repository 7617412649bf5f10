"""Vendor protection across a fleet: three ``databroker serve`` processes sharing Redis and
Postgres, each its own outbox. What one sidecar spends, throttles, breaks or pauses binds
the other two."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from proxy.keys import KeyLayout
from proxy.vendor_state import SAFETY_INTERVAL
from tests.conftest import REDIS_URL
from tests.harness import (
    BROKER_PATH,
    LOOPBACK,
    admin_headers,
    async_wait_for,
    broker_request,
    free_port,
    private_prefix,
    register,
    sidecar_env,
)
from tests.instances import databroker
from tests.servers import Upstream

pytestmark = pytest.mark.slow

_keys = itertools.count()


@pytest.fixture(scope="module")
def fleet_prefix() -> Iterator[str]:
    with private_prefix(REDIS_URL) as prefix:
        yield prefix


@pytest.fixture(scope="module")
def fleet_ports(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, fleet_prefix: str
) -> Iterator[list[int]]:
    """Three sidecars for the whole module (each start is seconds); tests name sources uniquely."""
    root = tmp_path_factory.mktemp("fleet")
    prefix = fleet_prefix
    with ExitStack() as stack:
        env = sidecar_env(pg_url, REDIS_URL, root / "o0", redis_prefix=prefix)
        ports = [free_port() for _ in range(3)]
        processes = [
            stack.enter_context(
                databroker(
                    ["serve", "--port", str(port)],
                    {**env, "DATABROKER_OUTBOX_DIR": str(root / f"o{i}")},
                    root,
                    f"sidecar-{i}.log",
                )
            )
            for i, port in enumerate(ports)
        ]
        for process, port in zip(processes, ports, strict=True):
            process.wait_listening(port)
        yield ports


@pytest.fixture
async def fleet(fleet_ports: list[int]) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with ExitStackAsync() as clients:
        yield clients.open(fleet_ports)


class ExitStackAsync:
    """One client per sidecar, closed together."""

    def __init__(self) -> None:
        self.clients: list[httpx.AsyncClient] = []

    def open(self, ports: list[int]) -> list[httpx.AsyncClient]:
        self.clients = [
            httpx.AsyncClient(
                base_url=f"http://{LOOPBACK}:{port}",
                timeout=30,
                limits=httpx.Limits(max_connections=100),
            )
            for port in ports
        ]
        return self.clients

    async def __aenter__(self) -> ExitStackAsync:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.aclose()


async def _call(client: httpx.AsyncClient, name: str) -> httpx.Response:
    """A miss: every call asks for a key never asked before."""
    return await client.post(BROKER_PATH, json=broker_request(name, {"n": str(next(_keys))}))


async def _publish(fleet: list[httpx.AsyncClient], spec: dict[str, Any]) -> dict[str, Any]:
    """Register and publish through one sidecar; return once every sidecar serves it (a
    request without its parameter answers MISSING_PARAMS there, and calls nothing)."""
    source = await register(fleet[0], spec)

    async def known() -> bool:
        answers = [
            await client.post(BROKER_PATH, json=broker_request(spec["name"], {}))
            for client in fleet
        ]
        return all(_code(a) == "MISSING_PARAMS" for a in answers)

    await async_wait_for(known, timeout=10)
    return source


def _code(answer: httpx.Response) -> str:
    error = answer.json()["error"]
    return "OK" if error is None else str(error["code"])


def _spec(name: str, url: str, **source: Any) -> dict[str, Any]:
    return {
        "name": name,
        "source": {"url": url, "response_type": "JSON", "params": {"n": "{{ n }}"}, **source},
        "caching": {"enabled": True, "ttl": 600},
    }


async def _counted_source(
    fleet: list[httpx.AsyncClient], upstream: Upstream, label: str, **source: Any
) -> tuple[str, list[float], dict[str, Any]]:
    """A new source on an upstream path that notes when each call arrives: its name, the
    arrival times (monotonic) and the source as registered."""
    arrivals: list[float] = []

    async def handler(_: Request) -> Response:
        arrivals.append(time.monotonic())
        return Response(b'{"ok": true}', media_type="application/json")

    url = upstream.on(f"/{label}", handler)
    name = f"{label}-{uuid.uuid4().hex[:6]}"
    return name, arrivals, await _publish(fleet, _spec(name, url, **source))


async def test_a_budget_is_shared_by_the_fleet(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    budget = {"amount": "10", "currency": "EUR", "period": "month"}
    cost = {"amount": "1", "currency": "EUR"}
    name, arrivals, _ = await _counted_source(fleet, upstream, "budget", cost=cost, budget=budget)
    answers = await asyncio.gather(*(_call(fleet[i % 3], name) for i in range(40)))
    codes = sorted(_code(a) for a in answers)
    assert codes == ["BUDGET_EXHAUSTED"] * 30 + ["OK"] * 10
    assert len(arrivals) == 10
    assert {a.status_code for a in answers if _code(a) != "OK"} == {429}
    # Every sidecar refuses now, whichever spent the budget.
    for client in fleet:
        assert _code(await _call(client, name)) == "BUDGET_EXHAUSTED"


async def test_a_rate_limit_holds_across_the_fleet(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    rate = {"requests": 4, "per_seconds": 1}
    name, arrivals, _ = await _counted_source(fleet, upstream, "rate", rate_limit=rate, timeout=20)
    started = time.monotonic()
    answers = await asyncio.gather(*(_call(fleet[i % 3], name) for i in range(24)))
    assert [_code(a) for a in answers] == ["OK"] * 24  # each waited its turn
    arrivals.sort()
    # A burst of 4, then one every 0.25 s, whichever sidecar sent it: the k-th arrival past
    # the burst comes no sooner than k x 0.25 s after the calls began (a busy machine only
    # makes arrivals later), so no second holds more than 4 + 4 of them.
    for k, at in enumerate(arrivals[4:], start=1):
        assert at - started >= k * 0.25 - 0.02, (k, at - started)
    per_second = [
        sum(1 for at in arrivals if second <= at - started < second + 1)
        for second in range(int(arrivals[-1] - started) + 1)
    ]
    assert sum(per_second) == 24 and per_second[0] <= 4 + 4, per_second


async def test_a_rate_limit_refuses_what_cannot_wait(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    rate = {"requests": 2, "per_seconds": 60}
    name, arrivals, _ = await _counted_source(
        fleet, upstream, "refused", rate_limit=rate, timeout=1
    )
    answers = await asyncio.gather(*(_call(fleet[i % 3], name) for i in range(9)))
    assert sorted(_code(a) for a in answers) == ["OK"] * 2 + ["RATE_LIMITED"] * 7
    refused = next(a for a in answers if _code(a) == "RATE_LIMITED")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 1
    assert len(arrivals) == 2


async def test_a_breaker_opened_by_one_sidecar_binds_all_and_probes_are_bounded(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    arrivals: list[float] = []
    state = {"healthy": False}
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def vendor(_: Request) -> Response:
        arrivals.append(time.monotonic())
        if not state["healthy"]:
            return Response(b"down", 500)
        # The upstream runs in another thread: wait for this test's loop to release it.
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(release.wait(), loop))
        return Response(b'{"ok": true}', media_type="application/json")

    url = upstream.on("/fleet-breaker", vendor)
    name = f"fleet-breaker-{uuid.uuid4().hex[:6]}"
    breaker = {
        "failure_ratio": 1.0,
        "min_requests": 3,
        "window_seconds": 60,
        "open_seconds": 1,
        "half_open_requests": 2,
    }
    await _publish(fleet, _spec(name, url, circuit_breaker=breaker, timeout=20))
    one, two, three = fleet
    assert [_code(await _call(one, name)) for _ in range(3)] == ["HTTP_ERROR"] * 3
    for client in (two, three, one):
        refused = await _call(client, name)
        assert refused.status_code == 503 and _code(refused) == "CIRCUIT_OPEN"
        assert refused.headers["retry-after"] == "1"
    assert len(arrivals) == 3

    state["healthy"] = True

    async def burst() -> list[asyncio.Task[httpx.Response]] | None:
        """30 calls across the fleet; once the breaker half-opens, the two probes
        among them wait at the upstream and the rest come back refused."""
        before = len(arrivals)
        tasks = [asyncio.create_task(_call(fleet[i % 3], name)) for i in range(30)]

        def settled() -> bool:
            return sum(t.done() for t in tasks) + len(arrivals) - before >= 30

        await async_wait_for(settled, timeout=20)
        if len(arrivals) == before:
            return None
        return tasks

    tasks = await async_wait_for(burst, timeout=20)
    assert len(arrivals) == 3 + 2  # two probes fleet-wide, not two per sidecar
    release.set()
    codes = sorted([_code(await task) for task in tasks])
    assert codes == ["CIRCUIT_OPEN"] * 28 + ["OK"] * 2
    # The probes succeeded: closed for everyone.
    assert [_code(await _call(client, name)) for client in fleet] == ["OK"] * 3


async def test_a_pause_reaches_every_sidecar_within_a_second(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    name, _, source = await _counted_source(fleet, upstream, "pause")
    cached = broker_request(name, {"n": "cached"})
    assert _code(await fleet[1].post(BROKER_PATH, json=cached)) == "OK"
    path = f"/data-sources/{source['data_source_id']}"
    paused = await fleet[2].post(f"{path}/pause", headers=admin_headers())
    assert paused.status_code == 200

    async def paused_everywhere() -> bool:
        codes = [_code(await _call(client, name)) for client in fleet]
        return codes == ["SOURCE_PAUSED"] * 3

    await async_wait_for(paused_everywhere, timeout=1.0)
    # Hits are still served.
    hit = await fleet[0].post(BROKER_PATH, json=cached)
    assert hit.status_code == 200 and hit.json()["origin"] == "CACHE"
    resumed = await fleet[1].post(f"{path}/resume", headers=admin_headers())
    assert resumed.status_code == 200

    async def resumed_everywhere() -> bool:
        return [_code(await _call(client, name)) for client in fleet] == ["OK"] * 3

    await async_wait_for(resumed_everywhere, timeout=1.0)


async def test_a_pause_whose_announcement_was_lost_reaches_every_sidecar_in_the_safety_interval(
    fleet: list[httpx.AsyncClient], upstream: Upstream, fleet_prefix: str
) -> None:
    """The pause written as a sidecar writes it, never announced (the publisher lost Redis in
    between): the sidecars' slow reread brings it, within its interval."""
    name, _, source = await _counted_source(fleet, upstream, "lost")
    layout, sid = KeyLayout(fleet_prefix), source["data_source_id"]
    redis = Redis.from_url(REDIS_URL)
    try:
        await redis.hset(layout.paused, sid, repr(time.time()))

        async def paused_everywhere() -> bool:
            return [_code(await _call(client, name)) for client in fleet] == ["SOURCE_PAUSED"] * 3

        await async_wait_for(paused_everywhere, timeout=SAFETY_INTERVAL + 1.0)
        await redis.hdel(layout.paused, sid)

        async def resumed_everywhere() -> bool:
            return [_code(await _call(client, name)) for client in fleet] == ["OK"] * 3

        await async_wait_for(resumed_everywhere, timeout=SAFETY_INTERVAL + 1.0)
    finally:
        await redis.aclose()


async def test_an_upstream_retry_after_is_honoured_by_every_sidecar(
    fleet: list[httpx.AsyncClient], upstream: Upstream
) -> None:
    arrivals: list[float] = []

    async def throttling(_: Request) -> Response:
        arrivals.append(time.monotonic())
        return Response(b"slow down", 429, headers={"Retry-After": "3"})

    url = upstream.on("/fleet-429", throttling)
    name = f"fleet-429-{uuid.uuid4().hex[:6]}"
    await _publish(fleet, _spec(name, url))
    first = await _call(fleet[0], name)
    assert _code(first) == "HTTP_ERROR" and first.json()["error"]["upstream_status"] == 429
    held_at = arrivals[0]

    async def held_everywhere() -> bool:
        return [_code(await _call(client, name)) for client in fleet] == ["RATE_LIMITED"] * 3

    await async_wait_for(held_everywhere, timeout=1.0)
    seen = len(arrivals)
    for _ in range(3):
        answers = [await _call(client, name) for client in fleet]
        assert [_code(a) for a in answers] == ["RATE_LIMITED"] * 3
        assert all(1 <= int(a.headers["retry-after"]) <= 3 for a in answers)
    assert len(arrivals) == seen

    # Once the hold ends, calls reach the upstream again (and get held again).
    async def called_again() -> bool:
        await _call(fleet[1], name)
        return len(arrivals) > seen

    await async_wait_for(called_again, timeout=10)
    assert arrivals[-1] - held_at >= 3 - 0.3
