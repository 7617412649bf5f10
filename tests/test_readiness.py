"""Readiness: the last background checks, answered at once; only this process's own
state (the outbox full) makes it unready, never a shared dependency.

The end-to-end test hangs Redis and PostgreSQL behind TCP proxies that stop passing
bytes: both probes still answer, 200, with each dependency shown "degraded" in the body
and in ``databroker_dependency_up``, and without waiting on either (the client's
deadline is shorter than one bounded check of each dependency in turn).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.readiness import CHECK_TIMEOUT, Check, Dependencies, report
from proxy.settings import Settings
from tests.harness import async_wait_for
from tests.servers import serve_in_thread
from tests.tcp import HangingProxy

# A deadline, not a measurement: a probe that checked Redis then PostgreSQL itself, each
# bounded to CHECK_TIMEOUT, would take twice that with both hanging and miss it; one
# answered from the last state has the whole of it, even on a loaded machine.
PROBE_DEADLINE = 1.5 * CHECK_TIMEOUT


async def _answers() -> None:
    return None


async def _fails() -> None:
    raise ConnectionError("refused")


async def _hangs() -> None:
    await asyncio.Event().wait()


async def _slow_to_cancel() -> None:
    """A hung query: cancelled, it first sends its cancel request, which hangs too."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(5 * CHECK_TIMEOUT)
        raise


@pytest.mark.parametrize(
    "broken", [_hangs, _fails, _slow_to_cancel], ids=["hangs", "fails", "slow to cancel"]
)
async def test_a_check_that_hangs_or_fails_is_degraded_and_the_other_stays_ok(
    broken: Check,
) -> None:
    deps = Dependencies({"redis": broken, "database": _answers}, 0.01)
    assert deps.states == {"redis": "ok", "database": "ok"}  # as start-up left them
    async with asyncio.timeout(CHECK_TIMEOUT + 0.5):
        await deps.check_all()
    assert deps.states == {"redis": "degraded", "database": "ok"}


async def test_the_loop_keeps_checking_and_recovers() -> None:
    failing = True

    async def flaky() -> None:
        if failing:
            raise ConnectionError("refused")

    deps = Dependencies({"redis": flaky}, 0.01)
    task = asyncio.create_task(deps.run())
    try:
        await async_wait_for(lambda: deps.states["redis"] == "degraded")
        failing = False
        await async_wait_for(lambda: deps.states["redis"] == "ok")
    finally:
        task.cancel()


async def test_checks_run_when_the_results_are_read_and_old_one_at_a_time() -> None:
    calls = 0
    failing = True

    async def counted() -> None:
        nonlocal calls
        calls += 1
        if failing:
            raise ConnectionError("refused")

    fresh = Dependencies({"redis": counted}, 3600)
    fresh.observe()  # start-up's results are under an interval old: nothing to do
    await fresh.close()
    assert calls == 0

    deps = Dependencies({"redis": counted}, 0.0)
    deps.observe()
    deps.observe()  # one runs already: not a second
    await async_wait_for(lambda: deps.states["redis"] == "degraded")
    assert calls == 1
    failing = False

    def read_ok() -> bool:
        deps.observe()
        return deps.states["redis"] == "ok"

    await async_wait_for(read_ok)
    await deps.close()


@pytest.mark.parametrize(
    ("full", "status", "outbox"), [(False, 200, "ok"), (True, 503, "full")], ids=["ok", "full"]
)
async def test_only_a_full_outbox_makes_the_process_unready(
    full: bool, status: int, outbox: str
) -> None:
    deps = Dependencies({"redis": _fails, "database": _fails}, 1.0)
    await deps.check_all()
    answered, body = report(deps, outbox_full=full, backlog_bytes=123)
    assert answered == status
    assert body["status"] == ("unready" if full else "ready")
    assert (body["redis"], body["database"], body["outbox"]) == ("degraded", "degraded", outbox)
    assert body["outbox_backlog_bytes"] == 123


def _dependency_up(metrics: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics):
        if family.name == "databroker_dependency_up":
            return {s.labels["dependency"]: s.value for s in family.samples}
    raise AssertionError("no databroker_dependency_up in /metrics")


async def test_probes_answer_at_once_while_redis_and_postgres_hang(
    settings: Settings, db: AsyncEngine
) -> None:
    database, redis = make_url(settings.database_url or ""), make_url(settings.redis_url or "")
    with (
        HangingProxy(database.host or "127.0.0.1", database.port or 5432) as pg_proxy,
        HangingProxy(redis.host or "127.0.0.1", redis.port or 6379) as redis_proxy,
    ):
        hanging = settings.model_copy(
            update={
                "database_url": database.set(port=pg_proxy.port).render_as_string(
                    hide_password=False
                ),
                "redis_url": redis.set(port=redis_proxy.port).render_as_string(hide_password=False),
                "dependency_check_interval": 0.05,
            }
        )
        with serve_in_thread(create_app(hanging)) as base:
            # Every call here must answer within the probe's deadline, or it fails the test.
            async with httpx.AsyncClient(base_url=base, timeout=PROBE_DEADLINE) as probe:

                async def ready() -> dict[str, Any]:
                    answer = await probe.get("/readyz")
                    assert answer.status_code == 200, answer.text
                    body: dict[str, Any] = answer.json()
                    return body

                assert (await ready())["redis"] == (await ready())["database"] == "ok"
                pg_proxy.hang()
                redis_proxy.hang()
                try:

                    async def both_degraded() -> bool:
                        assert (await probe.get("/healthz")).json() == {"status": "ok"}
                        body = await ready()
                        return body["redis"] == body["database"] == "degraded"

                    await async_wait_for(both_degraded, timeout=10)
                    body = await ready()
                    assert (body["status"], body["outbox"]) == ("ready", "ok")
                    metrics = (await probe.get("/metrics")).text
                    assert _dependency_up(metrics) == {"redis": 0.0, "database": 0.0}
                finally:
                    pg_proxy.resume()
                    redis_proxy.resume()

                async def both_ok() -> bool:
                    body = await ready()
                    return body["redis"] == body["database"] == "ok"

                await async_wait_for(both_ok, timeout=10)
                metrics = (await probe.get("/metrics")).text
                assert _dependency_up(metrics) == {"redis": 1.0, "database": 1.0}
