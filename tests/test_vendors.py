"""Spend and vendor protection through one real broker: cost in audit rows and metrics,
budgets, pauses, upstream 429 holds and breakers as the worker sees them."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import Broker
from tests.harness import admin_headers, async_wait_for
from tests.servers import Upstream

COST = {"amount": "0.35", "currency": "USD"}


def _spec(name: str, url: str, **source: Any) -> dict[str, Any]:
    return {
        "name": name,
        "source": {"url": url + "/{{ n }}", "response_type": "JSON", **source},
        "caching": {"enabled": True, "ttl": 60},
    }


async def _audit(db: AsyncEngine, run_id: uuid.UUID, count: int) -> list[dict[str, Any]] | None:
    async with db.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT data_origin, error, cost_amount, cost_currency FROM run_data_request "
                "WHERE run_id = :r ORDER BY created_at"
            ),
            {"r": run_id},
        )
        found = [dict(r._mapping) for r in result]
    return found if len(found) >= count else None


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_every_upstream_call_carries_its_cost(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    upstream.answer("/priced/1", b'{"score": 1}')
    upstream.answer("/priced/2", b'{"score": 2}')
    upstream.answer("/priced/3", b"down", status=503)
    await broker.register(_spec("priced", f"{upstream.url}/priced", cost=COST))
    spent_before = _metric("databroker_spend_total", source="priced", currency="USD")
    run_id = uuid.uuid4()
    codes = [
        (await broker.call("priced", {"n": n}, run_id=run_id)).status_code
        for n in ("1", "1", "2", "3")
    ]
    assert codes == [200, 200, 200, 502]
    rows = await async_wait_for(lambda: _audit(db, run_id, 4))
    # Three upstream calls (a failed one is paid too), one hit.
    costs = sorted((r["data_origin"], r["cost_amount"], r["cost_currency"]) for r in rows)
    assert costs == [
        ("CACHE", None, None),
        ("REQUEST", Decimal("0.35"), "USD"),
        ("REQUEST", Decimal("0.35"), "USD"),
        ("REQUEST", Decimal("0.35"), "USD"),
    ]
    spent = _metric("databroker_spend_total", source="priced", currency="USD") - spent_before
    assert spent == pytest.approx(float(sum(r["cost_amount"] or 0 for r in rows)))


async def test_a_spent_budget_refuses_calls_but_serves_hits(
    broker: Broker, upstream: Upstream, db: AsyncEngine
) -> None:
    for n in range(1, 5):
        upstream.answer(f"/budgeted/{n}", f'{{"n": {n}}}')
    budget = {"amount": "0.70", "currency": "USD", "period": "day"}
    source = await broker.register(
        _spec("budgeted", f"{upstream.url}/budgeted", cost=COST, budget=budget)
    )
    run_id = uuid.uuid4()
    for n in ("1", "2"):
        assert (await broker.call("budgeted", {"n": n}, run_id=run_id)).status_code == 200
    refused = await broker.call("budgeted", {"n": "3"}, run_id=run_id)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "BUDGET_EXHAUSTED"
    assert "0.70 USD per day" in error["message"]
    assert int(refused.headers["retry-after"]) == error["retry_after"] > 0
    assert upstream.hits("/budgeted/3") == 0
    hit = await broker.call("budgeted", {"n": "1"}, run_id=run_id)
    assert hit.status_code == 200 and hit.json()["origin"] == "CACHE"
    rows = await async_wait_for(lambda: _audit(db, run_id, 4))
    refusal = next(r for r in rows if r["error"] is not None)
    assert refusal["error"]["code"] == "BUDGET_EXHAUSTED" and refusal["cost_amount"] is None
    assert _metric("databroker_budget_remaining", source="budgeted", currency="USD") == 0
    sid = source["data_source_id"]
    seen = (await broker.admin("GET", f"/data-sources/{sid}/protection")).json()
    assert seen["budget"] == {**budget, "spent": "0.7", "remaining": "0", **_ends(seen)}
    assert seen["paused"] is False and seen["circuit_breaker"] is None
    assert (
        _metric("databroker_vendor_refusals_total", source="budgeted", code="BUDGET_EXHAUSTED") >= 1
    )


def _ends(seen: dict[str, Any]) -> dict[str, Any]:
    return {"period_ends_in_seconds": seen["budget"]["period_ends_in_seconds"]}


async def test_pause_and_resume(broker: Broker, upstream: Upstream) -> None:
    upstream.answer("/pausable/1", b'{"n": 1}')
    upstream.answer("/pausable/2", b'{"n": 2}')
    source = await broker.register(_spec("pausable", f"{upstream.url}/pausable"))
    path = f"/data-sources/{source['data_source_id']}"
    assert (await broker.call("pausable", {"n": "1"})).status_code == 200
    paused = await broker.admin("POST", f"{path}/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    seen = await broker.admin("GET", f"{path}/protection")
    assert seen.status_code == 200 and seen.json()["paused"] is True
    refused = await broker.call("pausable", {"n": "2"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "SOURCE_PAUSED"
    assert refused.headers["retry-after"] == "5"
    assert upstream.hits("/pausable/2") == 0
    hit = await broker.call("pausable", {"n": "1"})
    assert hit.status_code == 200 and hit.json()["origin"] == "CACHE"
    resumed = await broker.admin("POST", f"{path}/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert (await broker.call("pausable", {"n": "2"})).status_code == 200


async def test_pause_needs_the_admin_token_and_a_source_of_the_project(broker: Broker) -> None:
    unknown = await broker.admin("POST", f"/data-sources/{uuid.uuid4()}/pause")
    assert unknown.status_code == 404
    anonymous = await broker.client.post(f"/data-sources/{uuid.uuid4()}/pause")
    assert anonymous.status_code == 401
    other = await broker.client.post(
        f"/data-sources/{uuid.uuid4()}/resume",
        headers=admin_headers("wrong"),
    )
    assert other.status_code == 401


async def test_an_upstream_429_holds_the_source(broker: Broker, upstream: Upstream) -> None:
    async def throttled(_: Request) -> Response:
        return Response(b"slow down", 429, headers={"Retry-After": "30"})

    upstream.on("/throttled/1", throttled)
    upstream.answer("/throttled/2", b'{"n": 2}')
    await broker.register(_spec("throttled", f"{upstream.url}/throttled"))
    first = await broker.call("throttled", {"n": "1"})
    assert first.status_code == 502
    assert first.json()["error"]["upstream_status"] == 429
    assert first.headers["retry-after"] == "30"
    held = await broker.call("throttled", {"n": "2"})
    assert held.status_code == 429 and held.json()["error"]["code"] == "RATE_LIMITED"
    assert 29 <= int(held.headers["retry-after"]) <= 30
    assert upstream.hits("/throttled/2") == 0


async def test_an_open_breaker_answers_stale_where_allowed(
    broker: Broker, upstream: Upstream
) -> None:
    healthy = {"up": True}

    async def vendor(request: Request) -> Response:
        if healthy["up"]:
            return Response(b'{"ok": true}', media_type="application/json")
        return Response(b"down", 500)

    for n in range(1, 6):
        upstream.on(f"/breaker/{n}", vendor)
    breaker = {
        "failure_ratio": 0.6,  # 2 failures of 3 calls
        "min_requests": 2,
        "window_seconds": 60,
        "open_seconds": 60,
        "half_open_requests": 1,
    }
    spec = _spec("breaker", f"{upstream.url}/breaker", circuit_breaker=breaker)
    spec["caching"] = {"enabled": True, "ttl": 1, "stale_if_error": 600}
    sid = (await broker.register(spec))["data_source_id"]
    assert (await broker.call("breaker", {"n": "1"})).status_code == 200
    healthy["up"] = False
    assert [(await broker.call("breaker", {"n": n})).status_code for n in ("2", "3")] == [502, 502]
    assert _metric("databroker_circuit_state", source="breaker") == 1
    seen = (await broker.admin("GET", f"/data-sources/{sid}/protection")).json()
    assert seen["circuit_breaker"]["state"] == "open"
    assert 0 < seen["circuit_breaker"]["open_for_seconds"] <= 60
    calls = len(upstream.received)
    refused = await broker.call("breaker", {"n": "4"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "CIRCUIT_OPEN"
    assert 59 <= int(refused.headers["retry-after"]) <= 60
    assert len(upstream.received) == calls  # not called

    async def stale() -> httpx.Response | None:
        answer = await broker.call("breaker", {"n": "1"})
        return answer if answer.json().get("stale") else None

    # Once the entry of n=1 is past its TTL, the open breaker serves it stale.
    answer = await async_wait_for(stale, timeout=10)
    assert answer.status_code == 200 and answer.json()["value"] == {"ok": True}
    assert len(upstream.received) == calls


async def test_a_429_holds_the_source_while_its_own_retry_waits(
    broker: Broker, upstream: Upstream
) -> None:
    answers = iter([Response(b"later", 429, headers={"Retry-After": "1"})])

    async def once_throttled(_: Request) -> Response:
        return next(answers, Response(b'{"n": 1}', media_type="application/json"))

    upstream.on("/retried/1", once_throttled)
    upstream.answer("/retried/2", b'{"n": 2}')
    retry = {"max_retries": 1, "backoff_factor": 0}
    await broker.register(_spec("retried", f"{upstream.url}/retried", retry=retry, timeout=5))
    first = asyncio.create_task(broker.call("retried", {"n": "1"}))
    # Counted as it came back, then the hold is set with no wait in between.
    await async_wait_for(
        lambda: _metric("databroker_upstream_responses_total", source="retried", status="429")
    )
    # The first call waits out the Retry-After before its retry; the fleet holds meanwhile.
    held = await broker.call("retried", {"n": "2"})
    assert held.status_code == 429 and held.json()["error"]["code"] == "RATE_LIMITED"
    assert upstream.hits("/retried/2") == 0
    answer = await first
    assert answer.status_code == 200 and answer.json()["value"] == {"n": 1}
