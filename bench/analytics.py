"""``python -m bench.analytics``: the analytics routes over a large audit table.

In a private Postgres database (dropped at the end) and under a private Redis
prefix: ``databroker serve`` with ``--sources`` sources registered through its
admin API; ``--rows`` audit rows (default 10M) loaded with ``COPY`` (binary),
spread over the last ``--days`` days, requests falling on the sources by a Zipf
law (the first source takes the most); then the daily rollup made from them with
the migration's own statement (``proxy.rollup.rebuild``), timed. Each analytics
route is then asked ``--repeat`` times for the default window (the last 30 days)
— the per-source routes for the busiest source — and its p50, p95 and max, as
the client sees them, are judged against the 100 ms target. For comparison the
same summary is computed once from ``run_data_request`` itself (what a route
without the rollup would cost), and ``EXPLAIN ANALYZE`` shows the plan of the
slowest route's query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import httpx
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ClauseElement

from proxy import analytics, rollup, rollup_reads
from proxy.engine import create_engine
from tests.harness import (
    ADMIN_TOKEN,
    LOOPBACK,
    POSTGRES_SERVER,
    REDIS_SERVER,
    Child,
    admin_headers,
    free_port,
    private_database,
    private_prefix,
    register,
    serve_argv,
    server_arguments,
    sidecar_env,
)

TARGET_MS = 100.0
ROUTES = ("usage", "metrics", "cache-stats", "summary")
COLUMNS = (
    "run_data_request_id",
    "run_id",
    "data_object_id",
    "data_source_id",
    "data_origin",
    "start_time",
    "end_time",
    "error",
    "created_at",
    "cost_amount",
    "cost_currency",
    "replay",
)
CHUNK = 200_000
ERROR = json.dumps(
    {"code": "HTTP_ERROR", "message": "upstream answered 503", "upstream_status": 503}
)
COST = Decimal("0.35")
# What a route without the rollup would run: the seed's figures from the audit rows.
RAW_SUMMARY = """
SELECT data_source_id, count(*),
       count(*) FILTER (WHERE data_origin = 'CACHE' AND replay IS NULL),
       count(*) FILTER (WHERE data_origin = 'REQUEST'),
       avg((end_time - start_time) * 1000) FILTER (WHERE start_time IS NOT NULL),
       count(*) FILTER (WHERE start_time IS NOT NULL AND error IS NOT NULL),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY (end_time - start_time))
FROM run_data_request WHERE created_at >= $1 GROUP BY data_source_id
"""


@dataclass(frozen=True, slots=True)
class Options:
    rows: int = 10_000_000
    sources: int = 100
    days: int = 60
    repeat: int = 20
    postgres: str = POSTGRES_SERVER
    redis: str = REDIS_SERVER


@dataclass
class Results:
    options: dict[str, Any]
    load_average_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_average_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    copy_seconds: float = 0.0
    rollup_seconds: float = 0.0
    rollup_rows: int = 0
    rollup_requests: int = 0
    rows_in_window: int = 0
    busiest_rows_in_window: int = 0
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    raw_summary_ms: float = 0.0
    explain_route: str = ""
    explain: str = ""


def _rows(
    sources: Sequence[uuid.UUID], count: int, days: int, seed: int
) -> Iterator[tuple[Any, ...]]:
    """Audit rows as a sidecar writes them: 70 % hits, 28 % upstream calls (5 % of them
    failing, each costing 0.35 USD), 2 % refused before any call; 0.5 % of hits replays."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(sources))]
    runs = [uuid.uuid4() for _ in range(1000)]
    now, span = time.time(), days * 86400.0
    base = uuid.uuid4().int & ~((1 << 32) - 1)
    for i, source in enumerate(rng.choices(sources, weights, k=count)):
        created = now - rng.random() * span
        kind = rng.random()
        origin: str | None = "CACHE"
        start: float | None = None
        end: float | None = None
        error: str | None = None
        cost: Decimal | None = None
        currency: str | None = None
        replay: str | None = None
        if kind >= 0.70:
            if kind < 0.98:
                origin, start = "REQUEST", created - 1
                end = start + rng.lognormvariate(-2.3, 0.6)  # median 100 ms
                error = ERROR if rng.random() < 0.05 else None
                cost, currency = COST, "USD"
            else:
                origin, error = None, ERROR
        elif kind < 0.0035:
            replay = "as_of"
        yield (
            uuid.UUID(int=base | i),
            runs[i % len(runs)],
            None,
            source,
            origin,
            start,
            end,
            error,
            datetime.fromtimestamp(created, UTC),
            cost,
            currency,
            replay,
        )


@contextlib.asynccontextmanager
async def _driver(database_url: str) -> AsyncIterator[Any]:
    """An asyncpg connection to the database (its COPY), statements without a time limit."""
    engine = create_engine(database_url, command_timeout=None)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            yield raw.driver_connection
    finally:
        await engine.dispose()


async def _load(
    database_url: str, sources: Sequence[uuid.UUID], options: Options, results: Results
) -> None:
    async with _driver(database_url) as conn:
        started = time.perf_counter()
        rows = _rows(sources, options.rows, options.days, seed=7)
        for done in range(0, options.rows, CHUNK):
            chunk = [next(rows) for _ in range(min(CHUNK, options.rows - done))]
            await conn.copy_records_to_table("run_data_request", records=chunk, columns=COLUMNS)
        results.copy_seconds = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute(rollup.rebuild("postgresql"))
        results.rollup_seconds = time.perf_counter() - started
        # What autovacuum does after a bulk load: statistics (the planner's choice of the
        # ranking index), and the visibility map that lets that query read the index alone.
        await conn.execute("VACUUM ANALYZE run_data_request_daily, data_source")
        await conn.execute("ANALYZE run_data_request")
        results.rollup_rows = await conn.fetchval("SELECT count(*) FROM run_data_request_daily")
        results.rollup_requests = int(
            await conn.fetchval(
                "SELECT sum(n) FROM run_data_request_daily WHERE metric = $1", analytics.REQUESTS
            )
        )
        since = datetime.now(UTC).date() - timedelta(days=29)
        moment = datetime.combine(since, datetime.min.time(), UTC)
        results.rows_in_window = await conn.fetchval(
            "SELECT count(*) FROM run_data_request WHERE created_at >= $1", moment
        )
        results.busiest_rows_in_window = await conn.fetchval(
            "SELECT count(*) FROM run_data_request WHERE created_at >= $1 AND data_source_id = $2",
            moment,
            sources[0],
        )
        started = time.perf_counter()
        await conn.fetch(RAW_SUMMARY, moment)
        results.raw_summary_ms = (time.perf_counter() - started) * 1000


async def _explain(database_url: str, route: str, busiest: uuid.UUID) -> str:
    """EXPLAIN ANALYZE of the rollup queries ``route`` runs, for the default window."""
    end = datetime.now(UTC).date()
    start = end - timedelta(days=29)
    queries: list[ClauseElement] = (
        [rollup_reads.project_query(None, start, end), rollup_reads.ranking_query(None, start, end)]
        if route == "summary"
        else [rollup_reads.source_query(busiest, start, end)]
    )
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    explained = []
    async with _driver(database_url) as conn:
        for query in queries:
            sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
            explained.append(sql + "\n\n" + "\n".join(r[0] for r in plan))
    return "\n\n".join(explained)


async def _sources(url: str, count: int) -> list[uuid.UUID]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [
            uuid.UUID(
                (
                    await register(
                        client,
                        {
                            "name": f"bench_source_{i}",
                            "source": {"url": f"http://{LOOPBACK}:9/{i}"},
                        },
                        publish=False,
                    )
                )["data_source_id"]
            )
            for i in range(count)
        ]


def _time_routes(url: str, busiest: uuid.UUID, repeat: int) -> dict[str, dict[str, float]]:
    timings: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, headers=admin_headers(ADMIN_TOKEN), timeout=60) as client:
        for route in ROUTES:
            path = (
                "/analytics/summary" if route == "summary" else f"/data-sources/{busiest}/{route}"
            )
            client.get(path).raise_for_status()  # warm: the connection, the pool, the pages
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                samples.append((time.perf_counter() - started) * 1000)
            samples.sort()
            timings[route] = {
                "p50_ms": statistics.median(samples),
                "p95_ms": samples[min(len(samples) - 1, round(0.95 * len(samples)) - 1)],
                "max_ms": samples[-1],
            }
    return timings


def run(options: Options, out: TextIO = sys.stdout) -> Results:
    """The case; every process and database it makes is gone when it returns."""
    results = Results(options=asdict(options), load_average_start=os.getloadavg())
    with (
        tempfile.TemporaryDirectory(prefix="databroker-bench-analytics-") as tmp,
        private_database(options.postgres, "databroker_bench_analytics") as database_url,
        private_prefix(options.redis, "dbbench") as prefix,
    ):
        port = free_port()
        env = sidecar_env(database_url, options.redis, Path(tmp) / "outbox", redis_prefix=prefix)
        broker = Child(serve_argv(port), env, Path(tmp) / "broker.log")
        try:
            broker.wait_listening(port)
            url = f"http://{LOOPBACK}:{port}"
            sources = asyncio.run(_sources(url, options.sources))
            print(f"analytics: loading {options.rows} audit rows with COPY…", file=out, flush=True)
            asyncio.run(_load(database_url, sources, options, results))
            results.routes = _time_routes(url, sources[0], options.repeat)
        finally:
            broker.stop()
        slowest = max(results.routes, key=lambda r: results.routes[r]["p50_ms"])
        results.explain_route = slowest
        results.explain = asyncio.run(_explain(database_url, slowest, sources[0]))
    results.load_average_end = os.getloadavg()
    print(report(results), file=out, flush=True)
    return results


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: Results) -> str:
    o = results.options
    lines = [
        f"analytics: {o['rows']} audit rows over {o['days']} days, {o['sources']} sources"
        f" (the busiest: {results.busiest_rows_in_window} rows in the window,"
        f" all: {results.rows_in_window}); load average"
        f" {results.load_average_start[0]:.1f} at start, {results.load_average_end[0]:.1f} at end",
        f"  COPY {results.copy_seconds:.1f} s; rollup made from them in"
        f" {results.rollup_seconds:.1f} s ({results.rollup_rows} rows)",
        f"  route (30-day window, {o['repeat']} requests)      p50      p95      max"
        f"  (target p95 <= {TARGET_MS:.0f} ms)",
    ]
    for route, t in results.routes.items():
        lines.append(
            f"  {route:<38}{t['p50_ms']:>6.1f}ms {t['p95_ms']:>6.1f}ms {t['max_ms']:>6.1f}ms"
            f"  {verdict(t['p95_ms'] <= TARGET_MS)}"
        )
    lines.append(
        f"  the same summary from run_data_request itself: {results.raw_summary_ms:.0f} ms"
    )
    lines.append(f"  EXPLAIN ANALYZE of the slowest route ({results.explain_route}):")
    lines.extend(f"    {line}" for line in results.explain.splitlines())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analytics", description=__doc__)
    defaults = Options()
    parser.add_argument("--rows", type=int, default=defaults.rows)
    parser.add_argument("--sources", type=int, default=defaults.sources)
    parser.add_argument("--days", type=int, default=defaults.days)
    parser.add_argument("--repeat", type=int, default=defaults.repeat)
    server_arguments(parser)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)
    options = Options(args.rows, args.sources, args.days, args.repeat, args.postgres, args.redis)
    results = run(options)
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
    missed = [r for r, t in results.routes.items() if t["p95_ms"] > TARGET_MS]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
