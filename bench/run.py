"""``python -m bench``: the hot path measured against the least its stack can do.

One run starts five uvicorn processes with the broker's own settings (uvloop,
httptools, one worker, no access log): the broker on real Redis and Postgres
(twice: as shipped, and with hot entries off so that every hit is a Redis GET),
a *ceiling* app (one Redis GET, answered with orjson), a local *upstream* and a
*direct* app (the upstream through one shared httpx client). wrk drives
ceiling, hits, hits_redis, direct and misses in turn, at each concurrency, for
several rounds, and the medians make the table. The outbox writer is timed on
its own, and so is invalidation: a write made elsewhere, until the broker's next
read sees it.

wrk, not a Python load generator: on two cores the generator would eat the CPU
it measures. Everything runs on 127.0.0.1, in a private Postgres database and
under a private Redis prefix, both removed at the end, and every process
started here is stopped in a ``finally``.

The pure half (wrk scripts and output, medians, ratios, the table, profiles)
is ``bench.stats``; this module does the I/O, with the helpers the tests use
(``tests/harness.py``: ports, private database and prefix, processes, sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import orjson
import redis as sync_redis

from bench import analytics as bench_analytics
from bench import stats
from bench.apps import UPSTREAM_BODY
from proxy.database import Database
from proxy.outbox import Outbox, RunDataRequestRecord
from proxy.writer import OutboxWriter, PostgresSink
from tests.harness import (
    BROKER_PATH,
    DATABROKER,
    LOOPBACK,
    POSTGRES_SERVER,
    REDIS_SERVER,
    Child,
    broker_request,
    counter,
    free_port,
    private_database,
    private_prefix,
    register,
    sidecar_env,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "3f1c5a3e-8f2a-4b7e-9a55-0d1c2b3a4f5e"
# The process each target is measured on; the others are their own.
SERVERS = {"hits": "broker", "misses": "broker", "hits_redis": "broker_redis"}


@dataclass(frozen=True, slots=True)
class Options:
    duration: int = 10
    rounds: int = 2
    threads: int = 1
    out: Path = Path("bench-results")
    postgres: str = POSTGRES_SERVER
    redis: str = REDIS_SERVER
    writer_records: int = 200_000
    memory: bool = False
    memory_requests: int = 1_000_000
    profile: bool = False
    skip_load: bool = False
    invalidation_rounds: int = 20
    analytics_rows: int = 10_000_000


@dataclass
class Results:
    date: str
    machine: dict[str, Any]
    options: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, dict[int, float]] = field(default_factory=dict)
    table: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    outbox_backlog: dict[str, Any] = field(default_factory=dict)
    invalidation: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    profile: dict[str, dict[str, Any]] | None = None
    analytics: dict[str, Any] | None = None


def _local(url: str) -> str:
    """``url`` unchanged, if it points at 127.0.0.1: the bench talks to nothing else."""
    if urlsplit(url).hostname != LOOPBACK:
        raise SystemExit(f"bench: {url!r} is not on {LOOPBACK}; the bench only talks to it")
    return url


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "system": platform.platform(),
        # Others' work on the same cores shows in the numbers: recorded, not hidden.
        "load_average": os.getloadavg(),
    }


def _uvicorn(factory: str, port: int) -> list[str]:
    """The broker's own uvicorn settings (proxy.cli serve), for a reference app."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "on",
        "--no-access-log",
        "--workers",
        "1",
        "--app-dir",
        str(ROOT),
    ]


async def _writer_throughput(database_url: str, records: int, directory: Path) -> dict[str, Any]:
    """Append ``records`` audit rows to an outbox, then time one ``OutboxWriter.flush``."""
    outbox = Outbox(directory)
    outbox.open()
    run_id, source_id, now = uuid.uuid4(), uuid.uuid4(), time.time()
    chunk = 1000
    for start in range(0, records, chunk):
        outbox.append(
            *(
                RunDataRequestRecord(
                    uuid.uuid4(), run_id, uuid.uuid4(), source_id, "CACHE", None, None, None, now
                )
                for _ in range(min(chunk, records - start))
            )
        )
    journal_bytes = outbox.pending_bytes()
    database = Database(database_url)
    writer = OutboxWriter(outbox, PostgresSink(database), interval=1.0)
    try:
        started = time.perf_counter()
        shipped = await writer.flush()
        seconds = time.perf_counter() - started
        async with database.connection() as conn:
            written = await conn.fetchval(
                "SELECT count(*) FROM run_data_request WHERE run_id = $1", run_id
            )
    finally:
        outbox.close()
        await database.close()
    if not shipped or written != records:
        raise RuntimeError(f"writer shipped {written} of {records} records")
    return {
        "records": records,
        "journal_bytes": journal_bytes,
        "seconds": seconds,
        "records_per_s": records / seconds,
    }


class _BacklogSampler:
    """Polls ``/readyz`` for ``outbox_backlog_bytes`` while a load runs."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not self._stop.wait(self.interval):
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    self.samples.append(int(client.get(self.url).json()["outbox_backlog_bytes"]))

    def __enter__(self) -> _BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Bench:
    """One run: the servers, the broker's sources, and the wrk runs against them."""

    def __init__(self, options: Options, work: Path, database_url: str, prefix: str) -> None:
        self.options = options
        self.work = work
        self.database_url = database_url
        self.prefix = prefix
        self.children: dict[str, Child] = {}
        self.ports = {
            name: free_port()
            for name in ("upstream", "ceiling", "direct", "broker", "broker_redis")
        }
        self.broker_env = sidecar_env(
            database_url,
            options.redis,
            work / "outbox",
            redis_prefix=prefix,
            data_dir=str(work / "data"),
            shutdown_grace="10",
        )
        self.scripts: dict[str, Path] = {}

    def url(self, name: str, path: str = BROKER_PATH) -> str:
        return f"http://{LOOPBACK}:{self.ports[name]}{path}"

    def _start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        """``argv`` as ``name``, logged to ``work/name.log``, listening on its port."""
        child = self.children[name] = Child(argv, env, self.work / f"{name}.log", ROOT)
        child.wait_listening(self.ports[name], timeout=60)
        return child

    def stop(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            child.stop(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
        env.update(
            DATABROKER_BENCH_REDIS_URL=self.options.redis,
            DATABROKER_BENCH_KEY=f"{self.prefix}bench:ceiling",
            DATABROKER_BENCH_UPSTREAM_URL=self.url("upstream", "/users/42"),
        )
        with sync_redis.Redis.from_url(self.options.redis, socket_timeout=5) as client:
            client.set(env["DATABROKER_BENCH_KEY"], UPSTREAM_BODY)
        for name in ("upstream", "ceiling", "direct"):
            self._start(name, _uvicorn(f"bench.apps:{name}", self.ports[name]), env)
        self.start_broker()
        self._register()
        # Started after the sources exist; its own outbox, the same database and Redis.
        self.start_broker(
            "broker_redis",
            DATABROKER_HOT_CACHE_MAX_BYTES="0",
            DATABROKER_OUTBOX_DIR=str(self.work / "outbox-redis"),
        )
        self._check("broker_redis", self.body("bench_cached"), "CACHE")

    def start_broker(self, name: str = "broker", **env: str) -> Child:
        argv = [str(DATABROKER), "serve", "--host", LOOPBACK, "--port", str(self.ports[name])]
        return self._start(name, argv, {**self.broker_env, **env})

    def _check(self, server: str, body: bytes, origin: str) -> None:
        """The broker answers ``body`` with 200 from ``origin``, or the bench stops here."""
        answer = httpx.post(
            self.url(server),
            content=body,
            headers={"content-type": "application/json"},
            timeout=10,
            trust_env=False,
        )
        got = answer.json()
        if answer.status_code != 200 or got["origin"] != origin:
            raise RuntimeError(f"{server} answered {answer.status_code} {got}, not {origin}")

    def _register(self) -> None:
        """The cached and uncached sources, checked to answer CACHE and REQUEST."""
        upstream = self.url("upstream", "/users/{{ user_id }}")

        async def register_sources() -> None:
            async with httpx.AsyncClient(
                base_url=self.url("broker", ""), timeout=10, trust_env=False
            ) as client:
                for name, caching in (("bench_cached", True), ("bench_uncached", False)):
                    spec = {
                        "name": name,
                        "source": {"url": upstream, "response_type": "JSON", "timeout": 5},
                        "caching": {"enabled": caching, "ttl": 3600 if caching else None},
                    }
                    await register(client, spec)

        asyncio.run(register_sources())
        for body, origin in (
            (self.body("bench_cached"), "REQUEST"),
            (self.body("bench_cached"), "CACHE"),
            (self.body("bench_uncached"), "REQUEST"),
        ):
            self._check("broker", body, origin)
        self.scripts = {
            "hits": self._script("hits", [self.body("bench_cached")]),
            "misses": self._script("misses", [self.body("bench_uncached")]),
        }
        # The references get the hits' body: the same bytes to read.
        for target in ("ceiling", "direct", "hits_redis"):
            self.scripts[target] = self.scripts["hits"]

    def body(self, source: str, user_id: str = "42") -> bytes:
        return orjson.dumps(broker_request(source, {"user_id": user_id}, RUN_ID))

    def _script(self, name: str, bodies: Sequence[bytes], limit: int | None = None) -> Path:
        path = self.work / f"{name}.lua"
        path.write_text(stats.lua_script(bodies, limit=limit))
        return path

    def target_url(self, target: str) -> str:
        return self.url(SERVERS.get(target, target))

    def wrk(self, target: str, concurrency: int, duration: int) -> stats.WrkRun:
        threads = min(self.options.threads, concurrency)
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "-s",
            str(self.scripts[target]),
            self.target_url(target),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}")
        return stats.parse_wrk(done.stdout)

    def load(self, results: Results, out: TextIO) -> None:
        """Warm up, then the rounds; the medians, ratios and backlog go into ``results``."""
        options = self.options
        for target in stats.TARGETS:
            self.wrk(target, 16, min(3, options.duration))
        runs: dict[tuple[str, int], list[stats.WrkRun]] = {}
        backlog: list[dict[str, Any]] = []
        for round_ in range(1, options.rounds + 1):
            for c in stats.CONCURRENCY:
                for target in stats.TARGETS:
                    if target in stats.HIT_TARGETS:
                        with _BacklogSampler(self.url(SERVERS[target], "/readyz")) as sampler:
                            run = self.wrk(target, c, options.duration)
                        if sampler.samples:
                            backlog.append(
                                {
                                    "round": round_,
                                    "target": target,
                                    "concurrency": c,
                                    "max_bytes": max(sampler.samples),
                                    "final_bytes": sampler.samples[-1],
                                    "samples": len(sampler.samples),
                                }
                            )
                    else:
                        run = self.wrk(target, c, options.duration)
                    runs.setdefault((target, c), []).append(run)
                    results.runs.append(
                        {"round": round_, "target": target, "concurrency": c, **asdict(run)}
                    )
                    print(
                        f"round {round_} c={c:<3} {target:<8} {run.rps:>8.0f} req/s "
                        f"p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms"
                        + (f" errors {run.errors}" if run.errors else ""),
                        file=out,
                        flush=True,
                    )
        table = {key: stats.summarize(value) for key, value in runs.items()}
        results.summary = [
            {"target": t, "concurrency": c, **asdict(s)} for (t, c), s in sorted(table.items())
        ]
        results.ratios = stats.ratios(table)
        results.table = stats.format_table(table, results.ratios)
        results.outbox_backlog = {
            "max_bytes": max((b["max_bytes"] for b in backlog), default=None),
            "final_bytes": backlog[-1]["final_bytes"] if backlog else None,
            "runs": backlog,
        }

    def profile(self, target: str, out: TextIO) -> dict[str, Any]:
        """py-spy on ``target``'s server while wrk drives it at c=16."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise SystemExit("bench: --profile needs py-spy (pip install -e '.[bench]')")
        duration, rate = self.options.duration, 200
        server = SERVERS.get(target, target)
        raw = self.work / f"profile-{target}.txt"
        wrk = ["wrk", "-t1", "-c16", f"-d{duration + 2}s", "-s", str(self.scripts[target])]
        spy_argv = [spy, "record", "-p", str(self.children[server].pid), "-d", str(duration)]
        spy_argv += ["-r", str(rate), "-f", "raw", "-o", str(raw)]
        with subprocess.Popen(
            [*wrk, self.target_url(target)], stdout=subprocess.PIPE, text=True
        ) as load:
            try:
                time.sleep(1)
                subprocess.run(spy_argv, check=True, capture_output=True, timeout=duration + 60)
                stdout, _ = load.communicate(timeout=duration + 60)
            finally:
                if load.poll() is None:
                    load.kill()
        run = stats.parse_wrk(stdout)
        collapsed = raw.read_text()
        profile = stats.fold_profile(collapsed)
        # Each sample stands for 1/rate s of one busy thread; py-spy saw ``duration`` s of load.
        cpu_us = profile.samples * 1e6 / rate / (run.rps * duration) if run.rps else None
        text = stats.format_profile(profile, cpu_us)
        print(f"profile: {target} at c=16, {run.rps:.0f} req/s under py-spy", file=out, flush=True)
        return {
            "target": target,
            "rps_under_profiler": run.rps,
            "cpu_us_per_request": cpu_us,
            "text": text,
            "collapsed": collapsed,
            **asdict(profile),
        }

    def invalidation(self, out: TextIO) -> dict[str, Any]:
        """How soon a write made elsewhere reaches the broker's answers, hot entries on.

        Each round, a user of its own: a miss, then hits until one is served hot (the
        broker's ``databroker_hot_hits_total`` moves); then another Redis client unlinks
        the entry, and the clock runs from that UNLINK's reply to the first answer with a
        new ``data_object_id`` (a miss again: its upstream call on 127.0.0.1 is counted).
        """
        metrics = self.url("broker", "/metrics")
        seconds: list[float] = []
        stale = 0
        with (
            httpx.Client(timeout=10, trust_env=False) as client,
            sync_redis.Redis.from_url(self.options.redis, socket_timeout=5) as redis,
        ):

            def ask(body: bytes) -> dict[str, Any]:
                answer = client.post(
                    self.url("broker"), content=body, headers={"content-type": "application/json"}
                )
                answer.raise_for_status()
                got: dict[str, Any] = answer.json()
                return got

            def hot_hits() -> float:
                return counter(client.get(metrics).text, "databroker_hot_hits")

            for round_ in range(self.options.invalidation_rounds):
                body = self.body("bench_cached", f"invalidation-{round_}")
                first = ask(body)

                def served_hot(body: bytes = body) -> bool:
                    before = hot_hits()
                    ask(body)
                    return hot_hits() > before

                wait_for(served_hot, timeout=10)
                (name,) = redis.scan_iter(match=f"{self.prefix}cache:*{first['key']}")
                redis.unlink(name)
                written = time.perf_counter()
                while ask(body)["data_object_id"] == first["data_object_id"]:
                    stale += 1
                seconds.append(time.perf_counter() - written)
        summary = stats.summarize_latencies(seconds, stale)
        print(stats.format_latencies(summary), file=out, flush=True)
        return {"summary": asdict(summary), "seconds": seconds}

    def memory(self, out: TextIO) -> dict[str, Any]:
        """A fresh broker's start to ready, its RSS idle, after the first 10% of
        ``memory_requests`` mixed requests and after all."""
        self.stop("broker")
        launched = time.perf_counter()
        pid = self.start_broker().pid  # returns once it listens: start-up is complete
        start_to_ready = time.perf_counter() - launched
        time.sleep(1)  # idle: what start-up set going has settled
        idle = stats.rss_kib(Path(f"/proc/{pid}/status").read_text())
        print(
            f"memory: ready {start_to_ready:.2f} s after launch, idle RSS {idle / 1024:.1f} MiB",
            file=out,
            flush=True,
        )
        # Three hits to one miss: 1000 users on the cached source (each a miss the first
        # time), and the uncached source every fourth request.
        bodies = [
            self.body("bench_uncached" if i % 4 == 3 else "bench_cached", str(i))
            for i in range(1000)
        ]
        total = self.options.memory_requests
        first = total // 10
        threads = 2
        marks: dict[str, Any] = {
            "requests": total,
            "pid": pid,
            "start_to_ready_seconds": start_to_ready,
            "rss_kib_idle": idle,
        }
        started = time.perf_counter()
        for label, count, sent in (
            ("after_first", first, first),
            ("after_all", total - first, total),
        ):
            script = self._script(f"memory-{label}", bodies, limit=-(-count // threads))
            run = self._wrk_until_stopped(script, count, threads, 16)
            time.sleep(1)
            marks[f"rss_kib_{label}"] = stats.rss_kib(Path(f"/proc/{pid}/status").read_text())
            marks[f"run_{label}"] = asdict(run)
            print(
                f"memory: RSS {marks[f'rss_kib_{label}'] / 1024:.1f} MiB after {sent} requests "
                f"({run.requests} in this run, {run.rps:.0f} req/s, {run.errors} errors)",
                file=out,
                flush=True,
            )
        marks["seconds"] = time.perf_counter() - started
        return marks

    def _wrk_until_stopped(
        self, script: Path, requests: int, threads: int, concurrency: int
    ) -> stats.WrkRun:
        """wrk with a per-thread response limit; interrupted once every thread has stopped.

        Its duration is only a bound (200 req/s at worst) should the broker stall.
        """
        bound = max(120, requests // 200)
        argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{bound}s", "--timeout", "5s"]
        with subprocess.Popen(
            [*argv, "-s", str(script), self.url("broker")], stdout=subprocess.PIPE, text=True
        ) as load:
            assert load.stdout is not None
            lines: list[str] = []
            try:
                stopped = 0
                for line in load.stdout:
                    lines.append(line)
                    if line.strip() == stats.STOPPED:
                        stopped += 1
                        if stopped == threads:
                            load.send_signal(signal.SIGINT)
                load.wait(timeout=60)
            finally:
                if load.poll() is None:
                    load.kill()
        return stats.parse_wrk("".join(lines))


def _plot(results: Results, path: Path) -> bool:
    """Throughput and latency against concurrency; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target in stats.TARGETS:
        rows = [s for s in results.summary if s["target"] == target]
        cs = [s["concurrency"] for s in rows]
        (line,) = left.plot(cs, [s["rps"] for s in rows], marker="o", label=target)
        right.plot(
            cs,
            [s["p50_ms"] for s in rows],
            marker="o",
            color=line.get_color(),
            label=f"{target} p50",
        )
        right.plot(
            cs,
            [s["p99_ms"] for s in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{target} p99",
        )
    for ax, label in ((left, "requests/s"), (right, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(stats.CONCURRENCY), [str(c) for c in stats.CONCURRENCY])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for ax in (left, right):
        ax.set_yscale("log")
    left.legend(loc="lower left")
    right.legend(fontsize="small", ncol=2)
    fig.suptitle(f"databroker bench {results.date} ({results.machine['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(options: Options, out: TextIO = sys.stdout) -> int:
    """The whole benchmark; returns the process exit status."""
    if shutil.which("wrk") is None:
        print(
            "bench: wrk not found; `make bench` installs it (apt-get install wrk)", file=sys.stderr
        )
        return 2
    # One line per /readyz sample would bury the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stamp = datetime.now(UTC)
    results = Results(
        date=stamp.strftime("%Y-%m-%d %H:%M UTC"),
        machine=_machine(),
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
    )
    options.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="databroker-bench-") as tmp,
        private_database(_local(options.postgres), "databroker_bench") as database_url,
        private_prefix(_local(options.redis), "dbbench") as prefix,
    ):
        work = Path(tmp)
        results.writer = asyncio.run(
            _writer_throughput(database_url, options.writer_records, work / "writer-outbox")
        )
        print(
            f"outbox writer: {results.writer['records']} audit rows in "
            f"{results.writer['seconds']:.2f}s = {results.writer['records_per_s']:.0f} records/s",
            file=out,
            flush=True,
        )
        bench = Bench(options, work, database_url, prefix)
        try:
            bench.start()
            if not options.skip_load:
                bench.load(results, out)
            results.invalidation = bench.invalidation(out)
            if options.profile:
                results.profile = {t: bench.profile(t, out) for t in stats.TARGETS}
            if options.memory:
                results.memory = bench.memory(out)
        except BaseException:
            for name, child in bench.children.items():
                print(f"--- {name} log (tail)\n{child.tail()}", file=sys.stderr)
            raise
        finally:
            bench.stop_all()
        if options.analytics_rows:
            # After the load: ten million rows of COPY would weigh on its figures.
            case = bench_analytics.Options(
                rows=options.analytics_rows, postgres=options.postgres, redis=options.redis
            )
            results.analytics = asdict(bench_analytics.run(case, out))
        results.machine["load_average_end"] = os.getloadavg()
    _report(results, options.out, stamp, out)
    return 0


def _report(results: Results, directory: Path, stamp: datetime, out: TextIO) -> None:
    name = f"bench-{stamp.strftime('%Y%m%d-%H%M%S')}"
    machine = results.machine
    lines = [
        f"databroker bench, {results.date}, {machine['cores']} cores ({machine['cpu']}), "
        f"load average {machine['load_average'][0]:.1f} at start, "
        f"{machine['load_average_end'][0]:.1f} at end"
    ]
    if results.table:
        lines += [results.table]
    writer = results.writer
    lines.append(
        f"outbox writer: {writer['records_per_s']:.0f} records/s "
        f"({writer['records']} audit rows in {writer['seconds']:.2f}s; target >= {stats.WRITER_TARGET}: "
        f"{stats.verdict(writer['records_per_s'] >= stats.WRITER_TARGET)})"
    )
    if results.invalidation:
        lines.append(stats.format_latencies(stats.Latencies(**results.invalidation["summary"])))
    backlog = results.outbox_backlog
    if backlog.get("max_bytes") is not None:
        lines.append(
            f"outbox backlog under hit load: max {backlog['max_bytes']} bytes, "
            f"final {backlog['final_bytes']} bytes"
        )
    if results.memory:
        lines += stats.format_footprint(results.memory)
    if results.analytics:
        lines.append(bench_analytics.report(bench_analytics.Results(**results.analytics)))
    for profile in (results.profile or {}).values():
        lines.append(
            f"\nprofile: {profile['target']} at c=16 "
            f"({profile['rps_under_profiler']:.0f} req/s under py-spy)\n{profile['text']}"
        )
    report = "\n".join(lines)
    print("\n" + report, file=out)
    (directory / f"{name}.txt").write_text(report + "\n")
    (directory / f"{name}.json").write_text(json.dumps(asdict(results), indent=2) + "\n")
    written = [f"{name}.txt", f"{name}.json"]
    if results.summary and _plot(results, directory / f"{name}.png"):
        written.append(f"{name}.png")
    print(f"written: {', '.join(str(directory / w) for w in written)}", file=out)
