"""bench.prune: its pure half, and a smoke run at a tiny size on the test Postgres (counts
asserted, times only reported)."""

from __future__ import annotations

import asyncio
import itertools

from bench.prune import (
    MONTH,
    START,
    Latencies,
    hits_report,
    hits_while_pruning,
    month_bounds,
    report,
    run,
)
from tests.conftest import REDIS_URL, pg_server


def test_latencies_take_median_p99_and_max_in_ms() -> None:
    assert Latencies.of([0.001 * i for i in range(1, 101)]) == Latencies(100, 50.5, 100.0, 100.0)
    assert Latencies.of([]) == Latencies(0, 0.0, 0.0, 0.0)


def test_months_are_contiguous() -> None:
    bounds = month_bounds(3)
    assert bounds[0] == (START, START + MONTH)
    assert all(high == low for (_, high), (low, _) in itertools.pairwise(bounds))


def test_both_layouts_remove_exactly_the_oldest_month() -> None:
    results = run(asyncio.run(pg_server()), rows=2000, months=4, size=10, batch=100)
    assert [(r.layout, r.objects_gone, r.requests_gone) for r in results] == [
        ("batched", 500, 500),
        ("partitioned", 500, 500),
    ]
    assert all(r.writer_during.count > 0 and r.writer_before.count > 0 for r in results)
    table = report(results)
    assert "batched" in table and "partitioned" in table


def test_a_serving_broker_prunes_in_the_background_while_answering_hits() -> None:
    """``databroker serve`` itself: its pruner takes every row once the source has a
    retention, and hits are answered before and meanwhile."""
    result = hits_while_pruning(
        asyncio.run(pg_server()), REDIS_URL, rows=500, size=10, clients=1, timeout=60
    )
    assert result.rows_pruned == 1000
    assert result.before.count > 0 and result.during.count > 0
    assert "hits while the broker prunes 1000 rows" in hits_report(result)
