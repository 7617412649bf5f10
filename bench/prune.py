"""Pruning a month of rows: batched deletes (what ``proxy.pruner`` does) against monthly partitions.

``python -m bench.prune --rows N`` fills, in a private Postgres database
(removed at the end), ``data_object`` and ``run_data_request`` with N rows each
spread evenly over ``--months`` months (one source: the per-source delete's worst
case), then removes the oldest month in two layouts, one after the other:

- ``batched``: the tables as migrated; ``proxy.pruner.Pruner`` deletes the month
  ``--batch`` rows per transaction, no pause;
- ``partitioned``: the same columns and indexes on tables ``PARTITION BY RANGE
  (created_at)``, one partition a month (the primary key must then hold
  ``created_at``); the month goes by ``DETACH PARTITION`` and ``DROP TABLE``.

Meanwhile a writer inserts one row every 5 ms into ``data_object`` and times
each commit: the stall a prune inflicts on the outbox writer, against the same
writer's latencies just before. Reported: rows gone, seconds, rows/s, the
slowest batch, the writer's p50/p99/max before and during, and the table's
size.

With ``--hits``, one more case: ``databroker serve`` (as shipped, with its
background pruner every second) answers cache hits of one key to ``--clients``
sequential callers while its own pruner removes N rows of each table (the source's
``retention_days`` is set through the admin API, every row being older): the hits'
p50/p99/max before and during, until ``databroker_rows_pruned_total`` says
all went.

Counts are exact; times are this machine's (shared: run-to-run noise is large).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.database import Database
from proxy.engine import create_engine
from proxy.pruner import Pruner
from tests.harness import (
    BROKER_PATH,
    LOOPBACK,
    Child,
    admin_headers,
    async_wait_for,
    broker_request,
    counter,
    free_port,
    private_database,
    private_prefix,
    register,
    serve_argv,
    server_arguments,
    sidecar_env,
)
from tests.servers import Upstream, serve_in_thread, upstream_app

START = datetime(2025, 1, 1, tzinfo=UTC)
MONTH = timedelta(days=30)
WRITER_EVERY = 0.005
BASELINE_SECONDS = 10.0
HITS_SOURCE = "bench_prune_hits"
SOURCE = uuid.UUID("6f1c0b8e-2d4a-4c1e-9b7a-3e5d2f4a6b8c")


@dataclass(frozen=True, slots=True)
class Latencies:
    """A writer's commit times, in milliseconds."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latencies:
        if not seconds:
            return cls(0, 0.0, 0.0, 0.0)
        ms = sorted(s * 1000 for s in seconds)
        return cls(
            len(ms), statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))], ms[-1]
        )


@dataclass(frozen=True, slots=True)
class Result:
    layout: str
    rows: int
    months: int
    objects_gone: int
    requests_gone: int
    seconds: float
    slowest_step_ms: float
    writer_before: Latencies
    writer_during: Latencies
    table_mb: float

    @property
    def rows_per_second(self) -> float:
        return (self.objects_gone + self.requests_gone) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class HitsResult:
    rows_pruned: int
    prune_seconds: float
    clients: int
    before: Latencies
    during: Latencies
    after: Latencies


# --- the pure half ---------------------------------------------------------------------------


def report(results: list[Result]) -> str:
    """The README's table."""
    lines = [
        "layout        rows/table  gone (obj+audit)  seconds    rows/s  slowest step ms"
        "  writer p50/p99/max ms before -> during  data_object MB",
    ]
    for r in results:
        before, during = r.writer_before, r.writer_during
        lines.append(
            f"{r.layout:<12}  {r.rows:>10}  {r.objects_gone:>7}+{r.requests_gone:<8}"
            f"  {r.seconds:>7.2f}  {r.rows_per_second:>8.0f}  {r.slowest_step_ms:>15.1f}"
            f"  {before.p50:.1f}/{before.p99:.1f}/{before.max:.1f} ->"
            f" {during.p50:.1f}/{during.p99:.1f}/{during.max:.1f}"
            f"  {r.table_mb:>14.0f}"
        )
    return "\n".join(lines)


def hits_report(result: HitsResult) -> str:
    phases = (("before", result.before), ("during", result.during), ("after", result.after))
    return (
        f"hits while the broker prunes {result.rows_pruned} rows in {result.prune_seconds:.1f} s"
        f" ({result.clients} clients), p50/p99/max ms: "
        + ", ".join(
            f"{name} {hits.p50:.2f}/{hits.p99:.2f}/{hits.max:.2f} ({hits.count} hits)"
            for name, hits in phases
        )
    )


def month_bounds(months: int) -> list[tuple[datetime, datetime]]:
    return [(START + i * MONTH, START + (i + 1) * MONTH) for i in range(months)]


# --- filling ---------------------------------------------------------------------------------

_FILL_OBJECTS = """
INSERT INTO {table} (data_object_id, data_source_id, key, value, created_at)
SELECT gen_random_uuid(), :source, md5(i::text), convert_to(repeat('x', CAST(:size AS int)), 'UTF8'),
       CAST(:start AS timestamptz)
       + (i::float8 * CAST(:span AS float8) / CAST(:rows AS int)) * interval '1 second'
FROM generate_series(0, CAST(:rows AS int) - 1) AS i
"""
_FILL_REQUESTS = """
INSERT INTO {table} (run_data_request_id, run_id, data_object_id, data_source_id, data_origin,
                     start_time, end_time, error, created_at)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), :source, 'REQUEST', 0, 0, NULL,
       CAST(:start AS timestamptz)
       + (i::float8 * CAST(:span AS float8) / CAST(:rows AS int)) * interval '1 second'
FROM generate_series(0, CAST(:rows AS int) - 1) AS i
"""
# Keys and indexes are built after the fill (a sorted build, much faster than 10M random
# inserts into a growing btree); the prune then meets the same indexes as in production.
_PARTITIONED = [
    """CREATE TABLE part_data_object (
        data_object_id uuid NOT NULL, data_source_id uuid NOT NULL, key varchar(32) NOT NULL,
        value bytea NOT NULL, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at)""",
    """CREATE TABLE part_run_data_request (
        run_data_request_id uuid NOT NULL, run_id uuid NOT NULL, data_object_id uuid,
        data_source_id uuid NOT NULL, data_origin varchar(16), start_time float8,
        end_time float8, error json, created_at timestamptz NOT NULL,
        cost_amount numeric(18, 6), cost_currency varchar(3), replay varchar(8),
        erased_at timestamptz) PARTITION BY RANGE (created_at)""",
]
_PARTITIONED_INDEXES = [
    "ALTER TABLE part_data_object ADD PRIMARY KEY (data_object_id, created_at)",
    "CREATE INDEX ON part_data_object (data_source_id, key, created_at)",
    "CREATE INDEX ON part_data_object (data_source_id, created_at)",
    "ALTER TABLE part_run_data_request ADD PRIMARY KEY (run_data_request_id, created_at)",
    "CREATE INDEX ON part_run_data_request (run_id)",
    "CREATE INDEX ON part_run_data_request (data_source_id)",
    "CREATE INDEX ON part_run_data_request (created_at)",
]


async def _execute(engine: AsyncEngine, *statements: str, **params: object) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement), params)


async def drop_indexes(engine: AsyncEngine, table: str) -> list[str]:
    """Drop a (plain) table's indexes and primary key; the statements that build them again."""
    query = text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t")
    async with engine.connect() as conn:
        found = (await conn.execute(query, {"t": table})).all()
    drops, builds = [], []
    for name, definition in found:
        builds.append(definition)
        if name.endswith("_pkey"):
            drops.append(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
            builds.append(
                f"ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY USING INDEX {name}"
            )
        else:
            drops.append(f"DROP INDEX {name}")
    await _execute(engine, *drops)
    return builds


async def fill(
    engine: AsyncEngine,
    prefix: str,
    rows: int,
    months: int,
    size: int,
    source: uuid.UUID = SOURCE,
    indexes: list[str] | None = None,
) -> None:
    """N rows in each table; ``indexes`` built afterwards (None: the tables' own, dropped first)."""
    tables = (f"{prefix}data_object", f"{prefix}run_data_request")
    if indexes is None:
        indexes = [build for table in tables for build in await drop_indexes(engine, table)]
    span = (months * MONTH).total_seconds()
    params = {"source": source, "size": size, "start": START, "span": span, "rows": rows}
    await _execute(engine, _FILL_OBJECTS.format(table=tables[0]), **params)
    await _execute(engine, _FILL_REQUESTS.format(table=tables[1]), **params)
    await _execute(engine, *indexes)
    await _execute(engine, *(f"ANALYZE {table}" for table in tables))


async def create_partitioned(engine: AsyncEngine, months: int) -> None:
    statements = list(_PARTITIONED)
    for i, (low, high) in enumerate(month_bounds(months)):
        for table in ("part_data_object", "part_run_data_request"):
            statements.append(
                f"CREATE TABLE {table}_m{i} PARTITION OF {table} "
                f"FOR VALUES FROM ('{low.isoformat()}') TO ('{high.isoformat()}')"
            )
    await _execute(engine, *statements)


# --- measuring -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def writer(engine: AsyncEngine, table: str, at: datetime) -> AsyncIterator[list[float]]:
    """Insert one row created ``at`` every WRITER_EVERY seconds until the block ends; yields
    commit times."""
    times: list[float] = []
    statement = text(
        f"INSERT INTO {table} (data_object_id, data_source_id, key, value, created_at) "
        "VALUES (:id, :source, 'k', :value, :at)"
    )

    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            async with engine.begin() as conn:
                await conn.execute(
                    statement, {"id": uuid.uuid4(), "source": SOURCE, "value": b"x", "at": at}
                )
            times.append(time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WRITER_EVERY)

    task = asyncio.create_task(run())
    try:
        yield times
    finally:
        # The insert in flight is finished and timed, not cancelled: the one a short prune
        # (a partition dropped in milliseconds) stalls is the sample that matters.
        stop.set()
        await task


async def measure(
    engine: AsyncEngine,
    table: str,
    months: int,
    prune: Callable[[list[float]], Awaitable[tuple[int, int]]],
) -> tuple[int, int, float, float, Latencies, Latencies]:
    """The writer alone for a second, then during ``prune`` (given a list for its step times).
    The writer's rows are in the newest month: never rows the prune removes."""
    at = START + (months - 1) * MONTH
    async with writer(engine, table, at) as before:
        await asyncio.sleep(1.0)
    steps: list[float] = []
    async with writer(engine, table, at) as during:
        started = time.perf_counter()
        objects, requests = await prune(steps)
        seconds = time.perf_counter() - started
    slowest = max(steps, default=seconds) * 1000
    return objects, requests, seconds, slowest, Latencies.of(before), Latencies.of(during)


async def table_mb(engine: AsyncEngine, table: str) -> float:
    async with engine.connect() as conn:
        size = await conn.scalar(text(f"SELECT pg_total_relation_size('{table}')"))
        return float(size or 0) / 2**20


async def batched(url: str, rows: int, months: int, size: int, batch: int) -> Result:
    database = Database(url, command_timeout=None)
    engine = database.engine
    try:
        await _execute(
            engine,
            "INSERT INTO data_source (data_source_id, name, source, caching_enabled, "
            "runtime_params, variables, status, retention_days, created_at, last_updated_at) "
            "VALUES (:s, 'bench', '{}', false, '[]', '[]', 'PUBLISHED', :days, :t, :t)",
            s=SOURCE,
            days=30,
            t=START,
        )
        await fill(engine, "", rows, months, size)
        mb = await table_mb(engine, "data_object")
        # The clock one retention (30 days) after the first month's end: that month goes.
        pruner = Pruner(database, None, batch, pause=0, clock=lambda: START + 2 * MONTH)

        async def prune(steps: list[float]) -> tuple[int, int]:
            last = time.perf_counter()

            async def step() -> None:
                nonlocal last
                now = time.perf_counter()
                steps.append(now - last)
                last = now

            [done] = await pruner.run(after_batch=step)
            return done.objects, done.requests

        objects, requests, seconds, slowest, before, during = await measure(
            engine, "data_object", months, prune
        )
        await _execute(engine, "DROP TABLE data_object", "DROP TABLE run_data_request")
    finally:
        await database.close()
    return Result("batched", rows, months, objects, requests, seconds, slowest, before, during, mb)


async def partitioned(url: str, rows: int, months: int, size: int) -> Result:
    engine = create_engine(url, command_timeout=None)
    try:
        await create_partitioned(engine, months)
        await fill(engine, "part_", rows, months, size, indexes=_PARTITIONED_INDEXES)
        mb = await table_mb(engine, "part_data_object_m0") * months

        async def prune(steps: list[float]) -> tuple[int, int]:
            gone = []
            for table in ("part_data_object", "part_run_data_request"):
                async with engine.connect() as conn:
                    gone.append(int(await conn.scalar(text(f"SELECT count(*) FROM {table}_m0"))))
                started = time.perf_counter()
                await _execute(
                    engine,
                    f"ALTER TABLE {table} DETACH PARTITION {table}_m0",
                    f"DROP TABLE {table}_m0",
                )
                steps.append(time.perf_counter() - started)
            return gone[0], gone[1]

        objects, requests, seconds, slowest, before, during = await measure(
            engine, "part_data_object", months, prune
        )
    finally:
        await engine.dispose()
    return Result(
        "partitioned", rows, months, objects, requests, seconds, slowest, before, during, mb
    )


async def _hit_load(
    client: httpx.AsyncClient,
    clients: int,
    until: Callable[[], Awaitable[bool]],
    timeout: float,
) -> list[float]:
    """``clients`` callers asking for the warmed key back to back until ``until()``."""
    times: list[float] = []
    stop = asyncio.Event()
    body = broker_request(HITS_SOURCE, {"id": "1"})

    async def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            answer = await client.post(BROKER_PATH, json=body)
            times.append(time.perf_counter() - started)
            if answer.json().get("origin") != "CACHE":
                raise RuntimeError(f"not a hit: {answer.text[:200]}")

    tasks = [asyncio.create_task(caller()) for _ in range(clients)]
    try:
        await async_wait_for(until, timeout=timeout, interval=0.2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return times


async def _hits_while_pruning(
    base: str, url: str, upstream: str, rows: int, size: int, clients: int, timeout: float
) -> HitsResult:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        source = await register(
            client,
            {
                "name": HITS_SOURCE,
                "source": {"url": f"{upstream}/person?id={{{{ id }}}}", "response_type": "JSON"},
                "caching": {"enabled": True, "ttl": None},
            },
        )
        sid = uuid.UUID(source["data_source_id"])
        engine = create_engine(url, command_timeout=None)
        try:
            await fill(engine, "", rows, 12, size, sid)
        finally:
            await engine.dispose()
        warm = await client.post(BROKER_PATH, json=broker_request(HITS_SOURCE, {"id": "1"}))
        warm.raise_for_status()  # the miss that caches the key (created now: never pruned)
        deadline = 0.0

        async def baseline_done() -> bool:
            return time.perf_counter() >= deadline

        gone = 0.0

        async def all_pruned() -> bool:
            nonlocal gone
            gone = counter((await client.get("/metrics")).text, "databroker_rows_pruned")
            return gone >= 2 * rows

        deadline = time.perf_counter() + BASELINE_SECONDS
        before = await _hit_load(client, clients, baseline_done, BASELINE_SECONDS + timeout)
        started = time.perf_counter()
        # Every filled row is older than 30 days: the broker's next prune round takes them all.
        kept = ("name", "source", "caching", "runtime_params", "variables")
        answer = await client.put(
            f"/data-sources/{sid}",
            json={**{k: source[k] for k in kept}, "retention_days": 30},
            headers=admin_headers(),
        )
        answer.raise_for_status()
        during = await _hit_load(client, clients, all_pruned, timeout)
        seconds = time.perf_counter() - started
        # And after, as a second reference: the machine's noise, not the prune's.
        deadline = time.perf_counter() + BASELINE_SECONDS
        after = await _hit_load(client, clients, baseline_done, BASELINE_SECONDS + timeout)
    return HitsResult(
        int(gone), seconds, clients, *(Latencies.of(t) for t in (before, during, after))
    )


def hits_while_pruning(
    postgres: str, redis_url: str, rows: int, size: int, clients: int, timeout: float = 3600
) -> HitsResult:
    """The ``--hits`` case (see the module's docstring), in its own database and Redis prefix;
    AssertionError if the broker has not pruned every row within ``timeout`` seconds."""
    state = Upstream()
    with (
        serve_in_thread(upstream_app(state)) as upstream,
        private_database(postgres, "databroker_bench_prune") as url,
        private_prefix(redis_url, "bench_prune") as prefix,
        tempfile.TemporaryDirectory() as tmp,
    ):
        state.answer("/person", b'{"name": "Ada"}')
        port = free_port()
        env = sidecar_env(
            url, redis_url, Path(tmp) / "outbox", redis_prefix=prefix, prune_interval="1"
        )
        broker = Child(serve_argv(port), env, Path(tmp) / "broker.log")
        try:
            broker.wait_listening(port)
            return asyncio.run(
                _hits_while_pruning(
                    f"http://{LOOPBACK}:{port}", url, upstream, rows, size, clients, timeout
                )
            )
        finally:
            broker.stop()


def run(postgres: str, rows: int, months: int, size: int, batch: int) -> list[Result]:
    """Both layouts in one private (migrated) database, one after the other: the first's
    tables are dropped before the second is filled, so the disk holds one at a time."""
    with private_database(postgres, "databroker_bench_prune") as url:
        return [
            asyncio.run(batched(url, rows, months, size, batch)),
            asyncio.run(partitioned(url, rows, months, size)),
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prune", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--value-bytes", type=int, default=200, help="bytes of each DataObject")
    parser.add_argument("--batch", type=int, default=1000, help="rows per batched delete")
    server_arguments(parser)
    parser.add_argument("--hits", action="store_true", help="also: hits while the broker prunes")
    parser.add_argument("--hits-only", action="store_true", help="only the --hits case")
    parser.add_argument("--clients", type=int, default=4, help="callers of the --hits case")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    found: dict[str, object] = {}
    if not args.hits_only:
        results = run(args.postgres, args.rows, args.months, args.value_bytes, args.batch)
        print(report(results))
        found["layouts"] = [asdict(r) | {"rows_per_second": r.rows_per_second} for r in results]
    if args.hits or args.hits_only:
        hits = hits_while_pruning(
            args.postgres, args.redis, args.rows, args.value_bytes, args.clients
        )
        print(hits_report(hits))
        found["hits"] = asdict(hits)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune.json").write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
