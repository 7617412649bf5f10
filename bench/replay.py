"""Replay and export at scale: ``python -m bench.replay [--objects 10000000]``.

On the local Postgres, in a private database (removed afterwards): one data
source registered through a running ``databroker serve`` (private Redis
prefix), then ``--objects`` DataObjects of that source loaded in SQL
(``generate_series``, batches of 1M), spread evenly over a year across
``--keys`` keys whose cache keys are the broker's own (``make_cache_key``,
checked). Then:

- replay lookup: wrk POSTs strict ``as_of`` replays (2000 bodies: random keys,
  random instants after each key's first object, so every one is found) at
  each ``--concurrency`` (1, 4 and 16) for ``--duration`` s; p99 against 5 ms, and the lookup's
  ``EXPLAIN ANALYZE`` must use ``ix_data_object_source_key_created``;
- export: ``databroker export --output`` over the first ``--export-days`` days;
  objects per second of the command's wall time against 50k.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import stats
from bench.misses import cpu_seconds
from proxy.keys import make_cache_key
from proxy.replays import AS_OF_SQL
from tests.harness import (
    BROKER_PATH,
    DATABROKER,
    LOOPBACK,
    Child,
    broker_request,
    clean_env,
    free_port,
    private_database,
    private_prefix,
    register,
    serve_argv,
    server_arguments,
    sidecar_env,
)

SOURCE = "bench_replay"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
P99_TARGET_MS = 5.0
EXPORT_TARGET = 50_000
INDEX = "ix_data_object_source_key_created"
LOAD_BATCH = 1_000_000
# The broker's cache key in SQL, byte for byte: json.dumps(..., sort_keys=True) of the source
# id and params {"n": "<k>"} (checked against make_cache_key before loading).
KEY_SQL = (
    'md5(\'{"data_source_id": "\' || CAST(:sid AS text) || \'", '
    '"variables": {"n": "\' || (j % :keys) || \'"}}\')'
)
LOAD_SQL = f"""
INSERT INTO data_object (data_object_id, data_source_id, key, value, created_at)
SELECT gen_random_uuid(), CAST(:sid AS uuid), {KEY_SQL},
       convert_to('{{"score": ' || j || ', "band": "B"}}', 'UTF8'),
       CAST(:t0 AS timestamptz) + j * CAST(:step AS float8) * interval '1 second'
FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint) - 1) AS j
"""


def created_at(j: int, objects: int) -> datetime:
    return T0 + YEAR * (j / objects)


def replay_bodies(count: int, objects: int, keys: int, seed: int = 7) -> list[bytes]:
    """Strict as_of replays that each find an object: an instant after the key's first one."""
    chooser = random.Random(seed)
    bodies = []
    for _ in range(count):
        k = chooser.randrange(keys)
        first = created_at(k, objects)
        instant = first + (T0 + YEAR - first) * chooser.random()
        replay = {"as_of": instant.isoformat()}
        bodies.append(
            orjson.dumps(broker_request(SOURCE, {"n": str(k)}, uuid.UUID(int=k), replay=replay))
        )
    return bodies


async def _register(url: str) -> uuid.UUID:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        source = await register(
            client,
            {
                "name": SOURCE,
                # Strict replays never call it: nothing listens there.
                "source": {"url": f"http://{LOOPBACK}:9/score", "response_type": "JSON"},
                "caching": {"enabled": True, "ttl": 3600},
                "runtime_params": ["n"],
            },
        )
    return uuid.UUID(source["data_source_id"])


async def _load(engine: AsyncEngine, sid: uuid.UUID, objects: int, keys: int) -> None:
    async with engine.connect() as conn:
        probe = await conn.scalar(
            text(f"SELECT {KEY_SQL} FROM (SELECT 5 AS j) AS one"), {"sid": str(sid), "keys": keys}
        )
    if probe != make_cache_key(sid, {"n": str(5 % keys)}):
        raise RuntimeError("the SQL cache key differs from make_cache_key")
    step = YEAR.total_seconds() / objects
    for start in range(0, objects, LOAD_BATCH):
        stop = min(start + LOAD_BATCH, objects)
        async with engine.begin() as conn:
            await conn.execute(
                text(LOAD_SQL),
                {
                    "sid": str(sid),
                    "keys": keys,
                    "t0": T0,
                    "step": step,
                    "start": start,
                    "stop": stop,
                },
            )
        print(f"  loaded {stop:,} objects", file=sys.stderr, flush=True)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE data_object"))


async def _explain(engine: AsyncEngine, sid: uuid.UUID, keys: int) -> list[str]:
    """The plan of the very statement the broker's replay pool runs."""
    key = make_cache_key(sid, {"n": str(keys // 2)})
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        plan = await driver.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS) {AS_OF_SQL}", sid, key, T0 + YEAR / 2
        )
        return [row[0] for row in plan]


def _wrk(url: str, script: Path, concurrency: int, duration: int) -> stats.WrkRun:
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "5s"]
    done = subprocess.run(
        [*argv, "-s", str(script), url], capture_output=True, text=True, timeout=duration + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}")
    return stats.parse_wrk(done.stdout)


def _replays(
    pid: int, url: str, script: Path, concurrency: int, duration: int
) -> tuple[stats.WrkRun, float]:
    """The wrk run, and the broker process's CPU per request meanwhile (µs)."""
    stat, ticks = Path(f"/proc/{pid}/stat"), os.sysconf("SC_CLK_TCK")
    before = cpu_seconds(stat.read_text(), ticks)
    replayed = _wrk(url, script, concurrency, duration)
    spent = cpu_seconds(stat.read_text(), ticks) - before
    return replayed, spent * 1e6 / replayed.requests if replayed.requests else 0.0


def _export(database_url: str, work: Path, days: int) -> tuple[int, float, float]:
    """Objects written by ``databroker export`` over ``days`` days, the command's wall time,
    and the rate its progress bar reported (the streaming alone, past start-up and count)."""
    target = work / "export.jsonl"
    last = (T0 + timedelta(days=days - 1)).date().isoformat()
    argv = [str(DATABROKER), "export", "--source", SOURCE, "--from", T0.date().isoformat()]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, "--to", last, "--output", str(target)],
        env=clean_env(database_url=database_url, data_dir=str(work)),
        check=True,
        capture_output=True,
        timeout=3600,
        text=True,
    )
    elapsed = time.perf_counter() - started
    with target.open("rb") as lines:
        written = sum(1 for _ in lines)
    target.unlink()
    return written, elapsed, progress_rate(done.stderr)


def progress_rate(stderr: str) -> float:
    """Objects per second from the last line of ``export``'s progress (``…, 12,345/s``)."""
    last = stderr.strip().splitlines()[-1]
    return float(last.rsplit(", ", 1)[1].removesuffix("/s").replace(",", ""))


@dataclass(frozen=True, slots=True)
class Measured:
    keys: int
    load_seconds: float
    plan: list[str]
    replayed: dict[int, tuple[stats.WrkRun, float]]
    """By concurrency: the wrk run and the broker process's CPU per replay (µs, user +
    system), whatever else loads the machine."""
    exported: int
    export_seconds: float
    streamed_per_second: float


async def _measure(
    args: argparse.Namespace, database_url: str, prefix: str, work: Path
) -> Measured:
    keys = args.keys or max(1, args.objects // 10)
    engine = create_async_engine(database_url)
    port = free_port()
    env = sidecar_env(database_url, args.redis, work / "outbox", redis_prefix=prefix)
    broker = Child(serve_argv(port), env, work / "broker.log")
    try:
        await asyncio.to_thread(broker.wait_listening, port)
        base = f"http://{LOOPBACK}:{port}"
        sid = await _register(base)
        print(f"loading {args.objects:,} objects over {keys:,} keys", file=sys.stderr)
        loaded = time.perf_counter()
        await _load(engine, sid, args.objects, keys)
        load_seconds = time.perf_counter() - loaded
        plan = await _explain(engine, sid, keys)
        script = work / "replay.lua"
        script.write_text(stats.lua_script(replay_bodies(2000, args.objects, keys)))
        url = base + BROKER_PATH
        await asyncio.to_thread(_wrk, url, script, max(args.concurrency), 2)  # warm-up
        replayed = {
            c: await asyncio.to_thread(_replays, broker.pid, url, script, c, args.duration)
            for c in args.concurrency
        }
        written, export_seconds, streamed = await asyncio.to_thread(
            _export, database_url, work, args.export_days
        )
    finally:
        await asyncio.to_thread(broker.stop)
        await engine.dispose()
    return Measured(keys, load_seconds, plan, replayed, written, export_seconds, streamed)


def run(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp,
        private_database(args.postgres, "bench_replay") as database_url,
        private_prefix(args.redis, "bench-replay") as prefix,
    ):
        m = asyncio.run(_measure(args, database_url, prefix, Path(tmp)))
    rate = m.streamed_per_second
    uses_index = any(INDEX in line for line in m.plan)
    print(f"objects {args.objects:,}, keys {m.keys:,}, loaded in {m.load_seconds:.0f} s")
    print("EXPLAIN ANALYZE of the as_of lookup:\n  " + "\n  ".join(m.plan))
    print(f"index {INDEX}: {stats.verdict(uses_index)}")
    for c, (run, cpu_us) in m.replayed.items():
        print(
            f"replay over HTTP, c={c}, {args.duration} s: {run.rps:.0f} req/s, "
            f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms "
            f"(target <= {P99_TARGET_MS:g}: {stats.verdict(run.p99_ms <= P99_TARGET_MS)}), "
            f"errors {run.errors}; broker CPU {cpu_us:.0f} µs/replay"
        )
    print(
        f"export of {args.export_days} days: {m.exported:,} objects, streamed at {rate:,.0f}/s "
        f"(target >= {EXPORT_TARGET:,}: {stats.verdict(rate >= EXPORT_TARGET)}); the command "
        f"took {m.export_seconds:.1f} s with its start-up"
    )
    found = all(run.errors == 0 and run.requests > 0 for run, _ in m.replayed.values())
    return 0 if uses_index and found else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--objects", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=0, help="Default: objects / 10.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--export-days", type=int, default=30)
    server_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
