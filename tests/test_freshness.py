"""max_age: a cache entry too old for this request is not used, and one call refreshes it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.app import create_app
from proxy.cache import CacheEntry
from proxy.settings import Settings
from tests.conftest import Broker
from tests.harness import async_wait_for, counter
from tests.servers import Upstream, serve_in_thread


class Arrivals:
    """Counts the requests whose body the broker has read: from there to its arrival
    time the broker does not yield, so a counted request has arrived."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.count += 1
            return message

        await self.app(scope, counted, send)


@dataclass
class Counted:
    """An upstream that numbers its answers; calls after the first wait for ``release``."""

    loop: asyncio.AbstractEventLoop
    release: asyncio.Event
    calls: int = 0
    ok: bool = True

    async def answer(self, _: Request) -> Response:
        self.calls += 1
        n = self.calls
        if n > 1:
            # The upstream runs in another thread: wait for the test's signal there.
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.release.wait(), self.loop)
            )
        status = 200 if self.ok else 503
        return Response(b'{"n": %d}' % n, status, media_type="application/json")


@pytest.fixture
async def counted_broker(
    settings: Settings, db: AsyncEngine
) -> AsyncIterator[tuple[Broker, Arrivals]]:
    arrivals = Arrivals(create_app(settings))
    with serve_in_thread(arrivals) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Broker(url, settings, client), arrivals


async def source(broker: Broker, upstream: Upstream, name: str, **caching: object) -> Counted:
    counted = Counted(asyncio.get_running_loop(), asyncio.Event())
    url = upstream.on(f"/{name}", counted.answer)
    await broker.register(
        {
            "name": name,
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 3600, **caching},
        }
    )
    return counted


def test_an_entry_is_within_max_age_up_to_its_bound() -> None:
    entry = CacheEntry("id", 100.0, b"1")
    assert entry.within(None, 10_000.0)
    assert entry.within(5, 105.0) and not entry.within(5, 105.5)
    assert not entry.within(0, 100.5)
    # Stored after the request arrived (a fetch in flight then): young enough for any bound.
    assert entry.within(0, 99.0)


async def test_max_age_zero_makes_one_call_among_concurrent_requests(
    counted_broker: tuple[Broker, Arrivals], upstream: Upstream
) -> None:
    broker, arrivals = counted_broker
    counted = await source(broker, upstream, "fresh_pull")
    first = (await broker.call("fresh_pull")).json()
    hit = (await broker.call("fresh_pull")).json()
    assert (first["origin"], hit["origin"]) == ("REQUEST", "CACHE")
    hot_hits = counter((await broker.client.get("/metrics")).text, "databroker_hot_hits")
    assert (await broker.call("fresh_pull")).json()["origin"] == "CACHE"
    after = counter((await broker.client.get("/metrics")).text, "databroker_hot_hits")
    assert after == hot_hits + 1  # the entry is held hot: max_age must look past that copy too

    count = 20
    before = arrivals.count
    calls = [asyncio.create_task(broker.call("fresh_pull", max_age=0)) for _ in range(count)]
    # Every request has arrived, and one waits on the upstream: only then may it answer.
    await async_wait_for(lambda: arrivals.count == before + count and counted.calls == 2)
    counted.release.set()
    answers = [a.json() for a in await asyncio.gather(*calls)]

    assert counted.calls == 2
    assert [a["origin"] for a in answers].count("REQUEST") == 1
    assert {a["data_object_id"] for a in answers} == {answers[0]["data_object_id"]}
    assert answers[0]["data_object_id"] != first["data_object_id"]
    assert all(a["value"] == {"n": 2} for a in answers)
    # The new entry is stored: requests without max_age, or with a loose one, hit it.
    for extra in ({}, {"max_age": 3600}):
        again = (await broker.call("fresh_pull", **extra)).json()
        assert (again["origin"], again["value"]) == ("CACHE", {"n": 2})
    assert counted.calls == 2


async def test_an_entry_older_than_max_age_is_refreshed_and_a_younger_one_used(
    counted_broker: tuple[Broker, Arrivals], upstream: Upstream
) -> None:
    broker, _ = counted_broker
    counted = await source(broker, upstream, "aged")
    counted.release.set()
    first = (await broker.call("aged")).json()
    await async_wait_for(lambda: time.time() > first["end_time"] + 1, timeout=5)
    young_enough = (await broker.call("aged", max_age=3600)).json()
    assert (young_enough["origin"], young_enough["value"]) == ("CACHE", {"n": 1})
    too_old = (await broker.call("aged", max_age=1)).json()
    assert (too_old["origin"], too_old["value"]) == ("REQUEST", {"n": 2})
    assert counted.calls == 2


async def test_max_age_refuses_a_stale_entry_when_the_upstream_fails(
    counted_broker: tuple[Broker, Arrivals], upstream: Upstream
) -> None:
    broker, _ = counted_broker
    counted = await source(broker, upstream, "strict_fresh", ttl=1, stale_if_error=600)
    counted.release.set()
    first = (await broker.call("strict_fresh")).json()
    await async_wait_for(lambda: time.time() > first["end_time"] + 1, timeout=5)
    counted.ok = False
    # Without max_age the source's stale_if_error answers the old entry ...
    stale = (await broker.call("strict_fresh")).json()
    assert (stale["origin"], stale.get("stale")) == ("CACHE", True)
    # ... but a caller who asked for at most 1 s gets the failure, not an older value.
    refused = await broker.call("strict_fresh", max_age=1)
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "HTTP_ERROR"
    assert counted.calls == 3


@pytest.mark.parametrize("value", [-1, "10", True, None, [], {}])
async def test_max_age_must_be_a_non_negative_number(
    counted_broker: tuple[Broker, Arrivals], value: object
) -> None:
    broker, _ = counted_broker
    answer = await broker.call("anything", max_age=value)
    if value is None:  # null is "not given"
        assert answer.json()["error"]["code"] == "DATA_SOURCE_NOT_FOUND"
        return
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "code": "INVALID_REQUEST",
        "message": "max_age must be a number of seconds, 0 or more",
        "field": "max_age",
    }
