"""The fleet-wide scripts against the real Redis: several ``VendorState``s on one prefix
stand for several sidecars (the subprocess fleet is ``test_vendors_fleet.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from proxy.announcements import Follower, listen
from proxy.errors import BudgetExhausted, CircuitOpen, RateLimited, SourcePaused, VendorRefusal
from proxy.keys import KeyLayout
from proxy.source_spec import HTTPSource
from proxy.vendor_guard import Admission, Plan, period_of
from proxy.vendor_state import VendorState
from tests.conftest import REDIS_URL
from tests.harness import async_wait_for
from tests.instances import RedisCluster

COST = {"amount": "0.35", "currency": "USD"}
BREAKER = {
    "failure_ratio": 0.5,
    "min_requests": 4,
    "window_seconds": 60,
    "open_seconds": 0.3,
    "half_open_requests": 2,
}


@pytest.fixture
async def sidecars(redis_prefix: str) -> AsyncIterator[list[tuple[Redis, VendorState]]]:
    """Three sidecars' views of one Redis prefix, each with its own connection pool."""
    clients = [Redis.from_url(REDIS_URL) for _ in range(3)]
    try:
        yield [(client, VendorState(client, KeyLayout(redis_prefix))) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
def fleet(sidecars: list[tuple[Redis, VendorState]]) -> list[VendorState]:
    return [state for _, state in sidecars]


def _plan(**source: Any) -> Plan:
    return Plan.of(HTTPSource(url="http://vendor.test/", **source))


async def _admit(
    state: VendorState, sid: uuid.UUID, plan: Plan, max_wait: float = 0.0, lease: float = 5.0
) -> Admission | VendorRefusal:
    try:
        return await state.admit(sid, "vendor", plan, max_wait, lease)
    except VendorRefusal as refusal:
        return refusal


async def test_concurrent_calls_never_overshoot_the_budget(
    fleet: list[VendorState], redis_prefix: str
) -> None:
    plan = _plan(cost=COST, budget={"amount": "3.50", "currency": "USD", "period": "month"})
    sid = uuid.uuid4()
    outcomes = await asyncio.gather(*(_admit(fleet[i % 3], sid, plan) for i in range(60)))
    admitted = [o for o in outcomes if isinstance(o, Admission)]
    refused = [o for o in outcomes if isinstance(o, VendorRefusal)]
    assert len(admitted) == 10  # 10 x 0.35 = 3.50: exactly the budget, never past it
    assert {type(r) for r in refused} == {BudgetExhausted}
    assert sorted(a.spent_micros for a in admitted) == [350_000 * n for n in range(1, 11)]  # type: ignore[misc]
    period, _ = period_of("month", time.time())
    async with Redis.from_url(REDIS_URL) as direct:
        spent = await direct.get(KeyLayout(redis_prefix).spend(sid, period))
        assert int(spent) == 3_500_000
        assert 0 < await direct.ttl(KeyLayout(redis_prefix).spend(sid, period)) <= 32 * 86_400


async def test_a_raised_budget_takes_effect_at_once(fleet: list[VendorState]) -> None:
    sid = uuid.uuid4()
    small = _plan(cost=COST, budget={"amount": "0.70", "currency": "USD", "period": "day"})
    assert [isinstance(await _admit(fleet[0], sid, small), Admission) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    larger = _plan(cost=COST, budget={"amount": "1.05", "currency": "USD", "period": "day"})
    assert isinstance(await _admit(fleet[1], sid, larger), Admission)
    assert isinstance(await _admit(fleet[2], sid, larger), BudgetExhausted)


async def test_gcra_gives_a_burst_then_turns_fleet_wide(fleet: list[VendorState]) -> None:
    plan = _plan(rate_limit={"requests": 5, "per_seconds": 1})
    sid = uuid.uuid4()
    burst = await asyncio.gather(*(_admit(fleet[i % 3], sid, plan) for i in range(5)))
    assert all(isinstance(a, Admission) and a.wait == 0 for a in burst)
    # Over the burst: with no time to wait, refused, and nothing taken.
    refused = await _admit(fleet[0], sid, plan)
    assert isinstance(refused, RateLimited) and refused.retry_after == 1
    # Willing to wait: each gets its own turn, 0.2 s apart, whichever sidecar asks.
    turns = [await _admit(fleet[i % 3], sid, plan, max_wait=5) for i in range(4)]
    waits = [t.wait for t in turns if isinstance(t, Admission)]
    assert len(waits) == 4
    assert all(0.1 < b - a < 0.3 for a, b in itertools.pairwise(waits))
    assert waits[-1] == pytest.approx(0.8, abs=0.1)


async def test_the_breaker_opens_for_the_fleet_then_probes_are_bounded(
    fleet: list[VendorState],
) -> None:
    plan = _plan(circuit_breaker=BREAKER)
    sid = uuid.uuid4()
    one, two, three = fleet
    # Four calls, two of them fail: 50% of 4, the breaker opens. Successes are not
    # reported (the admission counted them); failures are, by whichever sidecar saw them.
    admitted = [await _admit(state, sid, plan) for state in (one, two, one, three)]
    assert all(isinstance(a, Admission) and not a.probe for a in admitted)
    await two.settle(sid, "vendor", plan, admitted[1], True)  # type: ignore[arg-type]
    assert isinstance(await _admit(one, sid, plan), Admission)  # 1 of 5 failed: closed
    await three.settle(sid, "vendor", plan, admitted[3], True)  # type: ignore[arg-type]
    await one.settle(sid, "vendor", plan, admitted[2], True)  # type: ignore[arg-type]
    for state in fleet:
        assert isinstance(await _admit(state, sid, plan), CircuitOpen)

    async def half_open() -> list[Admission | VendorRefusal] | None:
        outcomes = await asyncio.gather(*(_admit(fleet[i % 3], sid, plan) for i in range(30)))
        return outcomes if any(isinstance(o, Admission) for o in outcomes) else None

    # Once open_seconds pass, 30 calls across the fleet: 2 probes, the rest refused.
    outcomes = await async_wait_for(half_open, timeout=5)
    probes = [o for o in outcomes if isinstance(o, Admission)]
    assert len(probes) == 2 and all(p.probe for p in probes)
    assert all(isinstance(o, CircuitOpen) for o in outcomes if not isinstance(o, Admission))
    # A failed probe opens it again; a successful one closes it.
    await two.settle(sid, "vendor", plan, probes[0], True)
    assert isinstance(await _admit(three, sid, plan), CircuitOpen)
    probe = await async_wait_for(lambda: _probe(one, sid, plan), timeout=5)
    await one.settle(sid, "vendor", plan, probe, False)
    after = [await _admit(fleet[i % 3], sid, plan) for i in range(6)]
    assert all(isinstance(a, Admission) and not a.probe for a in after)


async def _probe(
    state: VendorState, sid: uuid.UUID, plan: Plan, lease: float = 5.0
) -> Admission | None:
    outcome = await _admit(state, sid, plan, lease=lease)
    return outcome if isinstance(outcome, Admission) and outcome.probe else None


async def test_a_probe_that_never_reports_frees_its_slot_after_its_lease(
    fleet: list[VendorState],
) -> None:
    plan = _plan(circuit_breaker={**BREAKER, "min_requests": 1, "half_open_requests": 1})
    sid = uuid.uuid4()
    admission = await _admit(fleet[0], sid, plan)
    assert isinstance(admission, Admission)
    await fleet[0].settle(sid, "vendor", plan, admission, True)
    lost = await async_wait_for(lambda: _probe(fleet[1], sid, plan, lease=0.3), timeout=5)
    assert lost.probe  # its sidecar "dies": no outcome is ever reported
    assert isinstance(await _admit(fleet[2], sid, plan), CircuitOpen)
    assert await async_wait_for(lambda: _probe(fleet[2], sid, plan), timeout=5)


async def test_pauses_and_holds_reach_every_sidecar(fleet: list[VendorState]) -> None:
    sid = uuid.uuid4()
    one, two, three = fleet
    await one.set_paused(sid, True)
    with pytest.raises(SourcePaused):
        one.check_local(sid, "vendor", time.time())  # at once where it was set
    for state in (two, three):
        await state.refresh()
        with pytest.raises(SourcePaused) as paused:
            state.check_local(sid, "vendor", time.time())
        assert paused.value.status == 503 and paused.value.retry_after == 5
    await two.set_paused(sid, False)
    await three.refresh()
    three.check_local(sid, "vendor", time.time())

    await one.hold(sid, 30)
    await two.refresh()
    with pytest.raises(RateLimited) as held:
        two.check_local(sid, "vendor", time.time())
    assert 29 <= held.value.retry_after <= 30


async def test_the_scripts_run_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """A source's hash and spend counter share a hash slot: one script reaches both."""
    host, port = redis_cluster.startup_nodes[0]
    client = AsyncRedisCluster(host=host, port=port)
    try:
        state = VendorState(client, KeyLayout("vendors:", cluster=True))
        sid = uuid.uuid4()
        plan = _plan(
            cost=COST,
            budget={"amount": "0.70", "currency": "USD", "period": "day"},
            rate_limit={"requests": 5, "per_seconds": 1},
            circuit_breaker=BREAKER,
        )
        outcomes = [await _admit(state, sid, plan) for _ in range(3)]
        assert [type(o) for o in outcomes] == [Admission, Admission, BudgetExhausted]
        await state.set_paused(sid, True)
        await state.hold(sid, 30)
        await state.refresh()
        assert sid in state.paused and sid in state.holds
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _listening(
    sidecars: list[tuple[Redis, VendorState]], layout: KeyLayout, safety_interval: float
) -> AsyncIterator[list[VendorState]]:
    """Each sidecar following the vendor channel as ``serve`` does; entered once every one
    has subscribed and read the state (a pause nobody announced, which only that first
    read can bring), so that from then on only announcements and timers bring news."""
    fleet = [state for _, state in sidecars]
    marker = uuid.uuid4()
    await sidecars[0][0].hset(layout.paused, str(marker), "0")
    tasks = [
        asyncio.create_task(
            listen(
                client,
                [Follower("vendor", layout.vendor_channel, state.resync, safety_interval)],
                retry_interval=0.05,
            )
        )
        for client, state in sidecars
    ]
    try:
        await async_wait_for(_sees(fleet, marker, True), timeout=5)
        yield fleet
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sees(states: list[VendorState], sid: uuid.UUID, paused: bool) -> Callable[[], bool]:
    return lambda: all((sid in state.paused) == paused for state in states)


async def test_a_pause_is_announced_and_heard_at_once(
    sidecars: list[tuple[Redis, VendorState]], redis_prefix: str
) -> None:
    """No polling: the safety timer is an hour, so only the announcement can bring it."""
    sid = uuid.uuid4()
    async with _listening(sidecars, KeyLayout(redis_prefix), safety_interval=3600) as fleet:
        one, *others = fleet
        await one.set_paused(sid, True)
        await async_wait_for(_sees(others, sid, True), timeout=1.0)
        await others[0].set_paused(sid, False)
        await async_wait_for(_sees(fleet, sid, False), timeout=1.0)
        await one.hold(sid, 30)
        await async_wait_for(lambda: all(sid in state.holds for state in others), timeout=1.0)


async def test_a_lost_announcement_is_read_within_the_safety_interval(
    sidecars: list[tuple[Redis, VendorState]], redis_prefix: str
) -> None:
    """A pause written without its announcement (the publisher lost Redis in between)."""
    sid = uuid.uuid4()
    async with _listening(sidecars, KeyLayout(redis_prefix), safety_interval=0.5) as fleet:
        await sidecars[0][0].hset(KeyLayout(redis_prefix).paused, str(sid), "0")
        await async_wait_for(_sees(fleet, sid, True), timeout=0.5 + 1.0)


async def test_a_sidecar_that_lost_its_subscription_reads_what_it_missed(
    redis_prefix: str,
) -> None:
    """The pause is written while nobody hears (no announcement), then the subscriptions
    drop: redis-py subscribes again by itself, and that alone brings the pause."""
    names = [f"vendor-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    clients = [Redis.from_url(REDIS_URL, client_name=name) for name in names]
    sid = uuid.uuid4()
    try:
        sidecars = [(client, VendorState(client, KeyLayout(redis_prefix))) for client in clients]
        async with _listening(sidecars, KeyLayout(redis_prefix), safety_interval=3600) as fleet:
            await clients[0].hset(KeyLayout(redis_prefix).paused, str(sid), "0")
            assert not any(sid in state.paused for state in fleet)
            admin = Redis.from_url(REDIS_URL)
            for entry in await admin.client_list(_type="pubsub"):
                if entry["name"] in names:
                    await admin.client_kill_filter(_id=entry["id"])
            await admin.aclose()
            await async_wait_for(_sees(fleet, sid, True), timeout=5)
    finally:
        for client in clients:
            await client.aclose()
