"""``databroker bench``: the hot path measured against the least its stack can do.

One run starts four uvicorn processes with the broker's own settings (uvloop,
httptools, one worker, no access log): the broker on real Redis and Postgres,
a *ceiling* app (one Redis GET, answered with orjson), a local *upstream* and a
*direct* app (the upstream through one shared httpx client). wrk drives
ceiling, hits, direct and misses in turn, at each concurrency, for several
rounds, and the medians make the table. The outbox writer is timed on its own.

wrk, not a Python load generator: on two cores the generator would eat the CPU
it measures. Everything runs on 127.0.0.1, in a private Postgres database and
under a private Redis prefix, both removed at the end, and every process
started here is stopped in a ``finally``.

The top half of this module is pure (wrk output, medians, ratios, the table,
profiles) and tested in tests/test_bench.py; the bottom half does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import redis as sync_redis
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.bench_apps import UPSTREAM_BODY
from proxy.database import create_engine, migrate
from proxy.outbox import Outbox, RunDataRequestRecord
from proxy.writer import DatabaseSink, OutboxWriter

TARGETS = ("ceiling", "hits", "direct", "misses")
"""Run order within a round: each measured target sits next to its reference."""

CONCURRENCY = (1, 16, 64)
MARK = "@@bench "
STOPPED = "@@stopped"
PATH = "/internal/data-broker"
LOOPBACK = "127.0.0.1"

# The targets, so the table can say which ratios pass.
HIT_THROUGHPUT_TARGET = 0.85
HIT_P99_TARGET = 1.5
MISS_OVERHEAD_TARGET_MS = 1.0
WRITER_TARGET = 20_000
MEMORY_GROWTH_TARGET = 1.10


# ---------------------------------------------------------------- pure parts


@dataclass(frozen=True, slots=True)
class WrkRun:
    """One wrk run, from the line its ``done`` hook prints."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    """Socket errors (connect, read, write, timeout) and HTTP statuses above 399."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """The median of a target's runs at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: int


def lua_script(bodies: Sequence[bytes], *, limit: int | None = None) -> str:
    """A wrk script POSTing ``bodies`` (in turn when several) and printing one result line.

    With ``limit``, each wrk thread stops after that many responses and says so
    on stdout: wrk's own clock only knows durations, so the caller interrupts it
    once every thread has stopped.
    """
    if not bodies:
        raise ValueError("a wrk script needs at least one body")
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    if len(bodies) == 1:
        lines.append(f"wrk.body = {_lua_string(bodies[0])}")
    else:
        lines += [
            "local bodies = {" + ", ".join(_lua_string(b) for b in bodies) + "}",
            "local prepared = {}",
            "local next_request = 0",
            "init = function(args)",
            "  for i, body in ipairs(bodies) do prepared[i] = wrk.format(nil, nil, nil, body) end",
            "end",
            "request = function()",
            "  next_request = next_request % #prepared + 1",
            "  return prepared[next_request]",
            "end",
        ]
    if limit is not None:
        lines += [
            "local answered = 0",
            "response = function(status, headers, body)",
            "  answered = answered + 1",
            f"  if answered == {int(limit)} then",
            f'    io.write("{STOPPED}\\n"); io.flush(); wrk.thread:stop()',
            "  end",
            "end",
        ]
    result = (
        '{"requests":%d,"duration_us":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,'
        '"max_us":%.0f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}'
    )
    lines += [
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        f"  io.write(string.format('{MARK}{result}\\n',",
        "    summary.requests, summary.duration,",
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,",
        "    e.connect, e.read, e.write, e.status, e.timeout))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def _lua_string(data: bytes) -> str:
    """A Lua long string holding ``data`` verbatim (JSON bodies never contain its closing)."""
    text = data.decode()
    if "]==]" in text or "\n" in text:
        raise ValueError("body cannot be embedded in a Lua long string")
    return f"[==[{text}]==]"


def parse_wrk(output: str) -> WrkRun:
    """The result line our ``done`` hook printed; wrk's own report is for humans."""
    for line in output.splitlines():
        if line.startswith(MARK):
            f = orjson.loads(line[len(MARK) :])
            return WrkRun(
                requests=f["requests"],
                seconds=f["duration_us"] / 1e6,
                p50_ms=f["p50_us"] / 1000,
                p90_ms=f["p90_us"] / 1000,
                p99_ms=f["p99_us"] / 1000,
                max_ms=f["max_us"] / 1000,
                errors=sum(f[k] for k in ("connect", "read", "write", "status", "timeout")),
            )
    raise ValueError(f"no {MARK.strip()} line in wrk's output:\n{output}")


def summarize(runs: Sequence[WrkRun]) -> Summary:
    if not runs:
        raise ValueError("no runs to summarize")
    return Summary(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        runs=len(runs),
    )


Table = Mapping[tuple[str, int], Summary]


def ratios(table: Table) -> dict[str, dict[int, float]]:
    """The issue's ratios at every concurrency both sides were measured at."""
    out: dict[str, dict[int, float]] = {
        "hits_rps_over_ceiling": {},
        "hits_p99_over_ceiling": {},
        "misses_p50_minus_direct_ms": {},
    }
    for c in sorted({c for _, c in table}):
        hits, ceiling = table.get(("hits", c)), table.get(("ceiling", c))
        if hits and ceiling:
            if ceiling.rps:
                out["hits_rps_over_ceiling"][c] = hits.rps / ceiling.rps
            if ceiling.p99_ms:
                out["hits_p99_over_ceiling"][c] = hits.p99_ms / ceiling.p99_ms
        misses, direct = table.get(("misses", c)), table.get(("direct", c))
        if misses and direct:
            out["misses_p50_minus_direct_ms"][c] = misses.p50_ms - direct.p50_ms
    return out


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def format_table(table: Table, ratio: Mapping[str, Mapping[int, float]]) -> str:
    """The results as aligned text, then each ratio against its target."""
    rows = [f"{'target':<8} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for c in sorted({c for _, c in table}):
        for target in TARGETS:
            s = table.get((target, c))
            if s is not None:
                rows.append(
                    f"{target:<8} {c:>3} {s.rps:>9.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} {s.errors:>6}"
                )
    rps, p99, gap = (
        ratio.get("hits_rps_over_ceiling", {}),
        ratio.get("hits_p99_over_ceiling", {}),
        ratio.get("misses_p50_minus_direct_ms", {}),
    )
    rows.append("")
    if rps:
        rows.append(
            f"hits / ceiling req/s (target >= {HIT_THROUGHPUT_TARGET}): "
            + "  ".join(
                f"c={c} {v:.2f} {_verdict(v >= HIT_THROUGHPUT_TARGET)}" for c, v in rps.items()
            )
        )
    if 16 in p99:
        rows.append(
            f"hits p99 / ceiling p99 at c=16 (target <= {HIT_P99_TARGET}): "
            f"{p99[16]:.2f} {_verdict(p99[16] <= HIT_P99_TARGET)}"
        )
    if gap:
        rows.append(
            f"misses p50 - direct p50 (target <= {MISS_OVERHEAD_TARGET_MS:g} ms): "
            + "  ".join(
                f"c={c} {v:+.2f} ms {_verdict(v <= MISS_OVERHEAD_TARGET_MS)}"
                for c, v in gap.items()
            )
        )
    return "\n".join(rows)


def rss_kib(status: str) -> int:
    """VmRSS from the text of ``/proc/<pid>/status``, in KiB."""
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB$", status, re.MULTILINE)
    if match is None:
        raise ValueError("no VmRSS line")
    return int(match.group(1))


_LINE_NUMBER = re.compile(r":\d+\)$")
_FILE = re.compile(r"\((.*)\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    """py-spy samples folded by function, as shares (%) of the CPU samples.

    ``inclusive`` covers our own code only (``proxy/``): everything else is either
    the process's root chain (in every stack) or shown by its self time.
    """

    samples: int
    self_time: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]
    modules: list[tuple[str, float]]


def fold_profile(collapsed: str, top: int = 15) -> Profile:
    """Fold py-spy's ``--format raw`` output: ``frame;frame;… count`` per line, root first."""
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    module: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NUMBER.sub(")", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        found = _FILE.search(frames[-1])
        module[found.group(1) if found else frames[-1]] += count
        for frame in set(frames):
            if "(proxy/" in frame:
                ours[frame] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * c / total) for name, c in counter.most_common(top)]

    return Profile(total, shares(own), shares(ours), shares(module))


def format_profile(profile: Profile, cpu_us_per_request: float | None = None) -> str:
    """The three lists; with the CPU time a request cost, each share in µs per request too."""
    head = f"{profile.samples} samples (CPU only, idle excluded)"
    if cpu_us_per_request is not None:
        head += f", {cpu_us_per_request:.0f} µs of CPU per request"
    out = [head]
    for title, rows in (
        ("self time by function", profile.self_time),
        ("inclusive time, our code", profile.inclusive),
        ("self time by module", profile.modules),
    ):
        out.append(f"-- {title}")
        for name, share in rows:
            cost = (
                "" if cpu_us_per_request is None else f" {share * cpu_us_per_request / 100:6.1f} µs"
            )
            out.append(f"{share:6.1f}%{cost}  {name}")
    return "\n".join(out)


# ---------------------------------------------------------------- I/O


@dataclass(frozen=True, slots=True)
class Options:
    duration: int = 10
    rounds: int = 2
    threads: int = 1
    out: Path = Path("bench-results")
    postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis: str = "redis://127.0.0.1:6379/0"
    writer_records: int = 200_000
    memory: bool = False
    memory_requests: int = 1_000_000
    profile: bool = False
    skip_load: bool = False


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
    memory: dict[str, Any] | None = None
    profile: dict[str, dict[str, Any]] | None = None


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """Child servers, each logged to a file; ``stop_all`` ends each by its own pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: Mapping[str, str], port: int) -> int:
        with (self.logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(
                argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.children[name] = child
        self._wait_listening(name, child, port)
        return child.pid

    def _wait_listening(self, name: str, child: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with {child.returncode}:\n{self.tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {port} within 60s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)


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
    ]


def _databroker() -> list[str]:
    script = Path(sys.executable).with_name("databroker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from proxy.cli import main; main()"]


@contextlib.contextmanager
def _private_database(admin_url: str) -> Iterator[str]:
    """A fresh database, migrated, dropped at the end; yields its SQLAlchemy URL."""
    name = f"databroker_bench_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(_local(admin_url))
    admin_engine_url = urlunsplit(("postgresql+asyncpg", *parts[1:]))

    async def admin(sql: str) -> None:
        engine = create_async_engine(admin_engine_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))
    try:

        async def upgrade() -> None:
            engine = create_engine(url)
            try:
                await migrate(engine)
            finally:
                await engine.dispose()

        asyncio.run(upgrade())
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def _private_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix of our own; every key under it is unlinked at the end."""
    prefix = f"dbbench:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = sync_redis.Redis.from_url(_local(redis_url), socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
        finally:
            client.close()


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
    engine = create_engine(database_url)
    sink = DatabaseSink(engine, batch_size=2000)
    writer = OutboxWriter(outbox, sink, interval=1.0)
    try:
        started = time.perf_counter()
        shipped = await writer.flush()
        seconds = time.perf_counter() - started
        async with engine.connect() as conn:
            written = (
                await conn.execute(
                    text("SELECT count(*) FROM run_data_request WHERE run_id = :r"), {"r": run_id}
                )
            ).scalar_one()
    finally:
        outbox.close()
        await engine.dispose()
    if not shipped or written != records:
        raise RuntimeError(f"writer shipped {written} of {records} records")
    return {
        "records": records,
        "journal_bytes": journal_bytes,
        "seconds": seconds,
        "records_per_s": records / seconds,
        "batch_size": sink.batch_size,
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
        self.processes = Processes(work)
        self.ports = {name: _free_port() for name in ("upstream", "ceiling", "direct", "broker")}
        self.admin_token = uuid.uuid4().hex
        self.broker_env = self._broker_env()
        self.scripts: dict[str, Path] = {}
        self.pids: dict[str, int] = {}

    def url(self, name: str, path: str = PATH) -> str:
        return f"http://{LOOPBACK}:{self.ports[name]}{path}"

    def _broker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
        env.update(
            DATABROKER_DATABASE_URL=self.database_url,
            DATABROKER_REDIS_URL=self.options.redis,
            DATABROKER_REDIS_PREFIX=self.prefix,
            DATABROKER_ADMIN_TOKEN=self.admin_token,
            DATABROKER_SECRET_KEY=Fernet.generate_key().decode(),
            DATABROKER_DATA_DIR=str(self.work / "data"),
            DATABROKER_OUTBOX_DIR=str(self.work / "outbox"),
            DATABROKER_SHUTDOWN_GRACE="10",
        )
        return env

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
        env.update(
            DATABROKER_BENCH_REDIS_URL=self.options.redis,
            DATABROKER_BENCH_KEY=f"{self.prefix}bench:ceiling",
            DATABROKER_BENCH_UPSTREAM_URL=self.url("upstream", "/users/42"),
        )
        client = sync_redis.Redis.from_url(self.options.redis, socket_timeout=5)
        try:
            client.set(env["DATABROKER_BENCH_KEY"], UPSTREAM_BODY)
        finally:
            client.close()
        for name in ("upstream", "ceiling", "direct"):
            self.pids[name] = self.processes.start(
                name, _uvicorn(f"proxy.bench_apps:{name}", self.ports[name]), env, self.ports[name]
            )
        self.start_broker()
        self._register()

    def start_broker(self) -> int:
        argv = [*_databroker(), "serve", "--host", LOOPBACK, "--port", str(self.ports["broker"])]
        pid = self.processes.start("broker", argv, self.broker_env, self.ports["broker"])
        self.pids["broker"] = pid
        return pid

    def _register(self) -> None:
        """The cached and uncached sources, checked to answer CACHE and REQUEST."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        upstream = self.url("upstream", "/users/{{ user_id }}")
        with httpx.Client(base_url=self.url("broker", ""), timeout=10, trust_env=False) as client:
            for name, caching in (("bench_cached", True), ("bench_uncached", False)):
                spec = {
                    "name": name,
                    "source": {"url": upstream, "response_type": "JSON", "timeout": 5},
                    "caching": {"enabled": caching, "ttl": 3600 if caching else None},
                }
                created = client.post("/data-sources", json=spec, headers=headers)
                created.raise_for_status()
                sid = created.json()["data_source_id"]
                client.post(f"/data-sources/{sid}/publish", headers=headers).raise_for_status()
            for body, origin in (
                (self.body("bench_cached"), "REQUEST"),
                (self.body("bench_cached"), "CACHE"),
                (self.body("bench_uncached"), "REQUEST"),
            ):
                answer = client.post(
                    PATH, content=body, headers={"content-type": "application/json"}
                )
                got = answer.json()
                if answer.status_code != 200 or got["origin"] != origin:
                    raise RuntimeError(f"broker answered {answer.status_code} {got}, not {origin}")
        self.scripts = {
            "hits": self._script("hits", [self.body("bench_cached")]),
            "misses": self._script("misses", [self.body("bench_uncached")]),
        }
        # The references get the hits' body: the same bytes to read.
        self.scripts["ceiling"] = self.scripts["direct"] = self.scripts["hits"]

    def body(self, source: str, user_id: str = "42") -> bytes:
        return orjson.dumps(
            {
                "data_source_name": source,
                "configured_params": {"user_id": user_id},
                "run_id": "3f1c5a3e-8f2a-4b7e-9a55-0d1c2b3a4f5e",
            }
        )

    def _script(self, name: str, bodies: Sequence[bytes], limit: int | None = None) -> Path:
        path = self.work / f"{name}.lua"
        path.write_text(lua_script(bodies, limit=limit))
        return path

    def target_url(self, target: str) -> str:
        return self.url("broker" if target in ("hits", "misses") else target)

    def wrk(self, target: str, concurrency: int, duration: int) -> WrkRun:
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
        return parse_wrk(done.stdout)

    def load(self, results: Results, out: TextIO) -> None:
        """Warm up, then the rounds; the medians, ratios and backlog go into ``results``."""
        options = self.options
        for target in TARGETS:
            self.wrk(target, 16, min(3, options.duration))
        runs: dict[tuple[str, int], list[WrkRun]] = {}
        backlog: list[dict[str, Any]] = []
        for round_ in range(1, options.rounds + 1):
            for c in CONCURRENCY:
                for target in TARGETS:
                    if target == "hits":
                        with _BacklogSampler(self.url("broker", "/readyz")) as sampler:
                            run = self.wrk(target, c, options.duration)
                        if sampler.samples:
                            backlog.append(
                                {
                                    "round": round_,
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
        table = {key: summarize(value) for key, value in runs.items()}
        results.summary = [
            {"target": t, "concurrency": c, **asdict(s)} for (t, c), s in sorted(table.items())
        ]
        results.ratios = ratios(table)
        results.table = format_table(table, results.ratios)
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
        server = "broker" if target in ("hits", "misses") else target
        raw = self.work / f"profile-{target}.txt"
        wrk = ["wrk", "-t1", "-c16", f"-d{duration + 2}s", "-s", str(self.scripts[target])]
        spy_argv = [spy, "record", "-p", str(self.pids[server]), "-d", str(duration)]
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
        run = parse_wrk(stdout)
        collapsed = raw.read_text()
        profile = fold_profile(collapsed)
        # Each sample stands for 1/rate s of one busy thread; py-spy saw ``duration`` s of load.
        cpu_us = profile.samples * 1e6 / rate / (run.rps * duration) if run.rps else None
        text = format_profile(profile, cpu_us)
        print(f"profile: {target} at c=16, {run.rps:.0f} req/s under py-spy", file=out, flush=True)
        return {
            "target": target,
            "rps_under_profiler": run.rps,
            "cpu_us_per_request": cpu_us,
            "text": text,
            "collapsed": collapsed,
            **asdict(profile),
        }

    def memory(self, out: TextIO) -> dict[str, Any]:
        """A fresh broker's RSS after the first 10% of ``memory_requests`` mixed requests and after all."""
        self.processes.stop("broker")
        pid = self.start_broker()
        # Three hits to one miss: 1000 users on the cached source (each a miss the first
        # time), and the uncached source every fourth request.
        bodies = [
            self.body("bench_uncached" if i % 4 == 3 else "bench_cached", str(i))
            for i in range(1000)
        ]
        total = self.options.memory_requests
        first = total // 10
        threads = 2
        marks: dict[str, Any] = {"requests": total, "pid": pid}
        started = time.perf_counter()
        for label, count in (("after_first", first), ("after_all", total - first)):
            script = self._script(f"memory-{label}", bodies, limit=-(-count // threads))
            run = self._wrk_until_stopped(script, count, threads, 16)
            time.sleep(1)
            marks[f"rss_kib_{label}"] = rss_kib(Path(f"/proc/{pid}/status").read_text())
            marks[f"run_{label}"] = asdict(run)
            print(
                f"memory: {label} {run.requests} requests ({run.rps:.0f} req/s, "
                f"{run.errors} errors), RSS {marks[f'rss_kib_{label}'] / 1024:.1f} MiB",
                file=out,
                flush=True,
            )
        marks["seconds"] = time.perf_counter() - started
        marks["growth"] = marks["rss_kib_after_all"] / marks["rss_kib_after_first"]
        return marks

    def _wrk_until_stopped(
        self, script: Path, requests: int, threads: int, concurrency: int
    ) -> WrkRun:
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
                    if line.strip() == STOPPED:
                        stopped += 1
                        if stopped == threads:
                            load.send_signal(signal.SIGINT)
                load.wait(timeout=60)
            finally:
                if load.poll() is None:
                    load.kill()
        return parse_wrk("".join(lines))


def _plot(results: Results, path: Path) -> bool:
    """Throughput and latency against concurrency; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target in TARGETS:
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
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend()
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
    _local(options.postgres)
    _local(options.redis)
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
        _private_database(options.postgres) as database_url,
        _private_prefix(options.redis) as prefix,
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
            if options.profile:
                results.profile = {t: bench.profile(t, out) for t in ("hits", "ceiling")}
            if options.memory:
                results.memory = bench.memory(out)
        except BaseException:
            for name in list(bench.processes.children):
                print(f"--- {name} log (tail)\n{bench.processes.tail(name)}", file=sys.stderr)
            raise
        finally:
            bench.processes.stop_all()
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
        f"({writer['records']} audit rows in {writer['seconds']:.2f}s; target >= {WRITER_TARGET}: "
        f"{_verdict(writer['records_per_s'] >= WRITER_TARGET)})"
    )
    backlog = results.outbox_backlog
    if backlog.get("max_bytes") is not None:
        lines.append(
            f"outbox backlog under hit load: max {backlog['max_bytes']} bytes, "
            f"final {backlog['final_bytes']} bytes"
        )
    if results.memory:
        m = results.memory
        lines.append(
            f"memory: RSS {m['rss_kib_after_first'] / 1024:.1f} MiB after {m['requests'] // 10} "
            f"mixed requests, {m['rss_kib_after_all'] / 1024:.1f} MiB after {m['requests']}: "
            f"x{m['growth']:.3f} "
            f"(target <= {MEMORY_GROWTH_TARGET}: {_verdict(m['growth'] <= MEMORY_GROWTH_TARGET)})"
        )
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
