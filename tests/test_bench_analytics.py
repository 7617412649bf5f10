"""The analytics bench case, smoke-run at a tiny size: it loads, rolls up, times every route
and explains the slowest (the figures at 10M rows are the README's, not asserted)."""

from __future__ import annotations

import asyncio
import io

import pytest

from bench import analytics
from tests.conftest import REDIS_URL, pg_server

# Starts `databroker serve`.
pytestmark = pytest.mark.slow


async def test_the_case_loads_rolls_up_and_times_every_route() -> None:
    options = analytics.Options(
        rows=3000, sources=3, days=40, repeat=2, postgres=await pg_server(), redis=REDIS_URL
    )
    out = io.StringIO()
    results = await asyncio.to_thread(analytics.run, options, out)
    assert results.rollup_requests == options.rows  # every row loaded is in the rollup
    assert 0 < results.busiest_rows_in_window <= results.rows_in_window < options.rows
    assert set(results.routes) == set(analytics.ROUTES)
    assert all(t["p50_ms"] > 0 for t in results.routes.values())
    assert "Execution Time" in results.explain
    for route in analytics.ROUTES:
        assert route in out.getvalue()
