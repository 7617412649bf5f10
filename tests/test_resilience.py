"""Single flight, stale-if-error and the outbox bound, through the running broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from proxy.app import create_app
from proxy.settings import Settings
from tests.conftest import Broker
from tests.harness import async_wait_for
from tests.servers import Upstream, serve_in_thread
from tests.test_flow import rows


async def test_concurrent_identical_misses_make_one_upstream_call(
    broker: Broker, upstream: Upstream
) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def slow(_: Request) -> Response:
        # The upstream runs in another thread: wait for the test's signal there.
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(release.wait(), loop))
        return Response(b'{"score": 1}', media_type="application/json")

    url = upstream.on("/slow-score", slow)
    await broker.register(
        {
            "name": "coalesced",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    calls = [asyncio.create_task(broker.call("coalesced")) for _ in range(50)]
    await async_wait_for(lambda: _at_least(upstream, "/slow-score", 1))
    release.set()
    answers = [a.json() for a in await asyncio.gather(*calls)]
    assert upstream.hits("/slow-score") == 1
    assert sorted(a["origin"] for a in answers).count("REQUEST") == 1
    assert {a["data_object_id"] for a in answers} == {answers[0]["data_object_id"]}
    assert all(a["value"] == {"score": 1} for a in answers)


async def _at_least(upstream: Upstream, path: str, count: int) -> bool:
    return upstream.hits(path) >= count


class Health:
    """An upstream that answers 200 or 503 as the test switches it."""

    ok = True

    async def answer(self, _: Request) -> Response:
        return Response(b'{"v": 1}', 200 if self.ok else 503, media_type="application/json")


async def test_stale_if_error_serves_an_expired_entry_when_the_upstream_fails(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    health = Health()
    url = upstream.on("/stale", health.answer)
    await broker.register(
        {
            "name": "stale",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 1, "stale_if_error": 60},
        }
    )
    first = (await broker.call("stale")).json()
    assert first["origin"] == "REQUEST"
    await async_wait_for(lambda: _later_than(first["end_time"] + 1), timeout=5)
    health.ok = False
    run_id = uuid.uuid4()
    answer = await broker.call("stale", run_id=run_id)
    assert answer.status_code == 200
    body = answer.json()
    assert (body["origin"], body["stale"], body["value"]) == ("CACHE", True, {"v": 1})
    assert body["data_object_id"] == first["data_object_id"]
    assert upstream.hits("/stale") == 2
    audit = await async_wait_for(
        lambda: rows(
            db, "SELECT data_origin, error FROM run_data_request WHERE run_id = :r", r=run_id
        )
    )
    assert audit[0]["data_origin"] == "CACHE"
    assert audit[0]["error"]["code"] == "HTTP_ERROR" and audit[0]["error"]["served_stale"] is True
    # While the entry is stale but healthy again, a request refreshes it.
    health.ok = True
    refreshed = (await broker.call("stale")).json()
    assert refreshed["origin"] == "REQUEST" and "stale" not in refreshed


async def _later_than(moment: float) -> bool:
    await asyncio.sleep(0.05)
    return time.time() > moment


async def test_without_stale_if_error_nothing_expired_is_served(
    broker: Broker, upstream: Upstream
) -> None:
    health = Health()
    url = upstream.on("/fresh-only", health.answer)
    await broker.register(
        {
            "name": "fresh",
            "source": {"url": url, "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 1},
        }
    )
    first = (await broker.call("fresh")).json()
    await async_wait_for(lambda: _later_than(first["end_time"] + 1), timeout=5)
    health.ok = False
    answer = await broker.call("fresh")
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "HTTP_ERROR"


@pytest.fixture
async def bounded(settings: Settings, db: AsyncEngine) -> AsyncIterator[Broker]:
    """A broker whose outbox holds 4 KiB and is never flushed during the test."""
    bounded = settings.model_copy(update={"outbox_max_bytes": 4096, "outbox_flush_interval": 60.0})
    with serve_in_thread(create_app(bounded)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Broker(url, bounded, client)


async def test_a_full_outbox_refuses_upstream_calls_then_hits(
    bounded: Broker, upstream: Upstream
) -> None:
    url = upstream.answer("/items/1", b'{"item": "' + b"x" * 600 + b'"}')
    await bounded.register(
        {
            "name": "items",
            "source": {"url": url.rsplit("/", 1)[0] + "/{{ n }}", "response_type": "JSON"},
            "caching": {"enabled": True},
        }
    )
    upstream.answer("/items/2", b'{"item": 2}')
    codes = []
    for n in range(20):
        upstream.answer(f"/items/{n}", b'{"item": "' + b"x" * 600 + b'"}')
        codes.append((await bounded.call("items", {"n": str(n)})).status_code)
    assert 200 in codes and 503 in codes
    first_refusal = codes.index(503)
    assert set(codes[first_refusal:]) == {503}  # once full, every miss is refused
    refused = await bounded.call("items", {"n": "19"})
    assert refused.json()["error"]["code"] == "AUDIT_BACKLOG_FULL"
    assert upstream.hits("/items/19") == 0
    # Hits are still answered up to twice the bound...
    hit = await bounded.call("items", {"n": "0"})
    assert (hit.status_code, hit.json()["origin"]) == (200, "CACHE")
    ready = await bounded.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["outbox"] == "full" and ready.json()["outbox_backlog_bytes"] >= 4096
    metrics = (await bounded.client.get("/metrics")).text
    assert (
        'databroker_requests_total{code="AUDIT_BACKLOG_FULL",origin="NONE",source="items"}'
        in metrics
    )


async def test_max_concurrency_bounds_calls_in_flight(broker: Broker, upstream: Upstream) -> None:
    in_flight = 0
    peak = 0

    async def counted(_: Request) -> Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)  # a slow upstream, so calls overlap if the broker lets them
        in_flight -= 1
        return Response(b"{}", media_type="application/json")

    url = upstream.on("/limited/x", counted)
    await broker.register(
        {
            "name": "limited",
            "source": {
                "url": url.rsplit("/", 1)[0] + "/x?n={{ n }}",
                "response_type": "JSON",
                "max_concurrency": 2,
            },
        }
    )
    answers = await asyncio.gather(*(broker.call("limited", {"n": str(n)}) for n in range(12)))
    assert [a.status_code for a in answers] == [200] * 12
    assert upstream.hits("/limited/x") == 12
    assert peak == 2
