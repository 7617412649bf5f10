"""``python -m bench.vendors``: what vendor protection adds to a miss.

Times the broker's hook around an upstream call (``VendorState.before_call`` then
``after_call``) against the real Redis, one call at a time: for a source with no
protection (the pause and hold checks in memory) and for ones with a budget, a rate
limit and a breaker (one admit script; a call that succeeds reports nothing). The
limits are set high enough that no call waits or is refused. A hit never reaches the
hook.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import click
from redis.asyncio import Redis

from proxy.keys import KeyLayout
from proxy.retry import Retrying
from proxy.secrets import Secrets
from proxy.source_registry import Source
from proxy.source_spec import CachingOptions, HTTPSource
from proxy.templates import compile_source
from proxy.vendor_state import VendorState
from tests.harness import REDIS_SERVER, drop_prefix

GUARDED: dict[str, Any] = {
    "cost": {"amount": "0.35", "currency": "USD"},
    "budget": {"amount": "999999999", "currency": "USD", "period": "day"},
    "rate_limit": {"requests": 1_000_000, "per_seconds": 1},
    "circuit_breaker": {
        "failure_ratio": 0.5,
        "min_requests": 1_000_000,
        "window_seconds": 60,
        "open_seconds": 1,
    },
}


def _source(name: str, **protection: Any) -> Source:
    http = HTTPSource(url="http://vendor.invalid/", **protection)
    return Source(
        data_source_id=uuid.uuid4(),
        name=name,
        project_id=None,
        status="PUBLISHED",
        http=http,
        caching=CachingOptions(),
        compiled=compile_source(http, (), ()),
        retrying=Retrying.from_policy(None),
        updated_at=0.0,
        values=Secrets({}),
        credentials=Secrets({}),
    )


async def _timed(call: Callable[[], Awaitable[object]], calls: int) -> tuple[list[float], float]:
    """Each call's wall time, and the CPU time per call (all calls)."""
    took = []
    cpu = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        took.append(time.perf_counter() - start)
    return took, (time.process_time() - cpu) / calls


def _guarded(state: VendorState, source: Source) -> Callable[[], Awaitable[None]]:
    """One miss's vendor protection: the check before the upstream call and the report after."""

    async def call() -> None:
        admission = await state.before_call(source, 10.0)
        await state.after_call(source, admission, None)

    return call


def _line(label: str, took: list[float], cpu: float) -> str:
    took = sorted(took)
    p50, p99 = statistics.median(took), took[int(len(took) * 0.99) - 1]
    return f"{label:34} p50 {p50 * 1e6:6.0f} µs  p99 {p99 * 1e6:6.0f} µs  CPU {cpu * 1e6:5.0f} µs"


async def _run(redis_url: str, calls: int) -> None:
    prefix = f"bench-vendors:{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(redis_url)
    try:
        state = VendorState(redis, KeyLayout(prefix))
        breaker_only = {"circuit_breaker": GUARDED["circuit_breaker"]}
        without_breaker = {k: v for k, v in GUARDED.items() if k != "circuit_breaker"}
        print(f"{calls} calls each, one at a time")
        # One Redis GET: the floor of any check that asks Redis.
        absent = functools.partial(redis.get, "bench-vendors:absent")
        await _timed(absent, min(calls, 200))  # warm: the pool open
        print(_line("one Redis GET (for scale)", *await _timed(absent, calls)))
        for label, source in (
            ("no protection", _source("plain")),
            ("budget + rate limit", _source("budgeted", **without_breaker)),
            ("breaker only", _source("breaker", **breaker_only)),
            ("budget + rate limit + breaker", _source("guarded", **GUARDED)),
        ):
            await _timed(_guarded(state, source), min(calls, 200))  # warm: scripts loaded
            print(_line(label, *await _timed(_guarded(state, source), calls)))
    finally:
        await redis.aclose()
        drop_prefix(redis_url, prefix)


@click.command()
@click.option("--calls", default=5000, show_default=True, type=click.IntRange(min=10))
@click.option(
    "--redis-url",
    default=lambda: os.environ.get("DATABROKER_REDIS_URL", REDIS_SERVER),
    show_default=f"DATABROKER_REDIS_URL or {REDIS_SERVER}",
)
def main(calls: int, redis_url: str) -> None:
    """Time vendor protection's hook on a miss."""
    asyncio.run(_run(redis_url, calls))


if __name__ == "__main__":
    main()
