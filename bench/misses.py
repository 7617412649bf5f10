"""Misses at scale: the broker's upstream calls against the client options, in one run.

``python -m bench.misses`` starts, as separate uvicorn processes (uvloop,
httptools, one worker, no access log, as the broker runs): two upstreams, one
answering after 200 ms (a paying vendor) and one at once; the broker
(``databroker serve`` on the local Postgres and Redis, a private database and
key prefix, removed afterwards) with an uncached and a cached source per upstream
(targets ``broker`` and ``broker_cached``);
and one *client app* per HTTP client option, each calling the same upstreams
the way a miss does (read the broker's request body, GET the upstream, answer
its body):

- ``direct``: ``proxy.upstream.create_client()``, the broker's own client (httpx
  over ``proxy.transport``): the least a miss can cost with it;
- ``httpx_default``: ``httpx.AsyncClient()`` as shipped (httpcore's pool, 100
  connections, 20 kept alive);
- ``httpx_tuned``: the same with the limits the broker had (512, 128 kept alive);
- ``httpx_aiohttp``: httpx over the ``httpx-aiohttp`` transport;
- ``aiohttp``: aiohttp's own client, the reference.

(The last two are skipped when not installed: the ``bench`` extra has them.)
wrk drives each target with unique keys (every request a new ``user_id``,
so every broker request is a miss). Case a: the 200 ms upstream at c=128;
throughput against 0.9 x 128 / 0.2 s and p99 against 260 ms. Case b: the fast
upstream at c=1, 16, 64; the broker's p50 against the direct call's + 1 ms.
Case c: CPU per request of each target's server process (``/proc/PID/stat``
before and after each run), and with ``--profile`` py-spy profiles of the
broker (fast upstream at c=16 on both sources, and case a). Medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import stats
from bench.apps import UPSTREAM_BODY
from bench.run import ROOT, Bench, Options, _uvicorn
from tests.harness import (
    ADMIN_TOKEN,
    LOOPBACK,
    Child,
    admin_headers,
    free_port,
    private_database,
    private_prefix,
    server_arguments,
)

SLOW_SECONDS = 0.2
SLOW_CONCURRENCY = 128
FAST_CONCURRENCY = (1, 16, 64)
# Case a's targets: 90% of what 128 callers of a 200 ms upstream can do, and a p99
# within 60 ms of the upstream's own 200.
THROUGHPUT_TARGET = 0.9 * SLOW_CONCURRENCY / SLOW_SECONDS
P99_TARGET_MS = 260.0
P50_OVER_DIRECT_TARGET_MS = 1.0
OPTIONS = ("direct", "httpx_default", "httpx_tuned", "httpx_aiohttp", "aiohttp")
BROKER = "broker"
BROKER_CACHED = "broker_cached"
"""The same broker on cached sources: each unique key a GET that misses, the lock, the
fetch, the store (a decision engine's usual miss); its CPU is the broker process's too."""
RUN_ID = "3f1c5a3e-8f2a-4b7e-9a55-0d1c2b3a4f5e"
SOURCES = {"slow": "bench_misses_slow", "fast": "bench_misses_fast"}
CACHED_SOURCES = {"slow": "bench_misses_slow_cached", "fast": "bench_misses_fast_cached"}


# --- the pure half ---------------------------------------------------------------------------


def unique_keys_script(source: str, prefix: str) -> str:
    """A wrk script POSTing broker bodies whose ``user_id`` is new on every request.

    The result line comes from ``bench.stats.lua_script``'s ``done`` hook; the
    ``request`` function defined after it replaces its fixed body.
    """
    template = orjson.dumps(
        {"data_source_name": source, "configured_params": {"user_id": "%s"}, "run_id": RUN_ID}
    ).decode()
    if "]==]" in template or "%" in template.replace('"%s"', ""):
        raise ValueError("the body template cannot be embedded")
    return stats.lua_script([template.replace("%s", prefix).encode()]) + "\n".join(
        [
            "local threads = 0",
            "setup = function(thread)",
            "  threads = threads + 1",
            '  thread:set("thread_id", threads)',
            "end",
            "local counter = 0",
            "request = function()",
            "  counter = counter + 1",
            f"  local key = string.format('{prefix}-%d-%d', thread_id, counter)",
            f"  return wrk.format(nil, nil, nil, string.format([==[{template}]==], key))",
            "end",
            "",
        ]
    )


def cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """User plus system time of a process, from the text of ``/proc/PID/stat``."""
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run against one target, with the CPU its server process spent."""

    target: str
    case: str
    concurrency: int
    wrk: stats.WrkRun
    cpu_seconds: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds * 1e6 / self.wrk.requests if self.wrk.requests else 0.0


@dataclass(frozen=True, slots=True)
class Row:
    """The median of a target's runs in one case and concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    errors: int


def summarize(runs: Sequence[Run]) -> dict[tuple[str, str, int], Row]:
    grouped: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        grouped.setdefault((run.case, run.target, run.concurrency), []).append(run)
    return {
        key: Row(
            rps=statistics.median(r.wrk.rps for r in group),
            p50_ms=statistics.median(r.wrk.p50_ms for r in group),
            p99_ms=statistics.median(r.wrk.p99_ms for r in group),
            cpu_us=statistics.median(r.cpu_us_per_request for r in group),
            errors=sum(r.wrk.errors for r in group),
        )
        for key, group in grouped.items()
    }


def report(table: dict[tuple[str, str, int], Row], targets: Sequence[str]) -> str:
    """Both cases as aligned text, each against its target, the broker beside the direct call."""
    lines = [
        f"{'case':<5} {'target':<14} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU µs/req':>10} {'errors':>6}"
    ]
    for (case, target, c), row in sorted(
        table.items(), key=lambda kv: (kv[0][0], kv[0][2], targets.index(kv[0][1]))
    ):
        lines.append(
            f"{case:<5} {target:<14} {c:>3} {row.rps:>8.0f} {row.p50_ms:>8.2f} {row.p99_ms:>8.2f} "
            f"{row.cpu_us:>10.0f} {row.errors:>6}"
        )
    lines.append("")
    slow = table.get(("a", BROKER, SLOW_CONCURRENCY))
    if slow is not None:
        lines.append(
            f"a: broker at c={SLOW_CONCURRENCY} against a {SLOW_SECONDS * 1000:.0f} ms upstream: "
            f"{slow.rps:.0f} req/s (target >= {THROUGHPUT_TARGET:.0f}: "
            f"{stats.verdict(slow.rps >= THROUGHPUT_TARGET)}), p99 {slow.p99_ms:.0f} ms "
            f"(target <= {P99_TARGET_MS:.0f}: {stats.verdict(slow.p99_ms <= P99_TARGET_MS)})"
        )
        direct = table.get(("a", "direct", SLOW_CONCURRENCY))
        if direct is not None and direct.rps:
            lines.append(
                f"a: broker / direct req/s {slow.rps / direct.rps:.2f}, "
                f"p99 {slow.p99_ms - direct.p99_ms:+.1f} ms"
            )
    # What a cached source adds to a miss: its Redis round trips (lookup, lock, store).
    cached = [
        f"c={c} {on_cache.cpu_us - plain.cpu_us:+.0f} µs"
        for c in FAST_CONCURRENCY
        if (on_cache := table.get(("b", BROKER_CACHED, c)))
        and (plain := table.get(("b", BROKER, c)))
    ]
    if cached:
        lines.append("b: broker_cached CPU/req - broker CPU/req: " + "  ".join(cached))
    # Against our client in a bare app (the broker's own cost), and against the bare httpx
    # client the hit bench calls "direct" (what the target was first measured on).
    for reference, label in (("direct", "direct"), ("httpx_tuned", "httpx_tuned (bare httpx)")):
        gaps = []
        for c in FAST_CONCURRENCY:
            broker, other = table.get(("b", BROKER, c)), table.get(("b", reference, c))
            if broker is not None and other is not None:
                gap = broker.p50_ms - other.p50_ms
                gaps.append(
                    f"c={c} {gap:+.2f} ms {stats.verdict(gap <= P50_OVER_DIRECT_TARGET_MS)}"
                )
        if gaps:
            lines.append(
                f"b: broker p50 - {label} p50 (target <= {P50_OVER_DIRECT_TARGET_MS:g} ms): "
                + "  ".join(gaps)
            )
    return "\n".join(lines)


def loop_thread(collapsed: str) -> str:
    """py-spy's raw stacks (root first) without those of threads ``threading`` started.

    py-spy counts the default executor's worker (the outbox writer's
    ``asyncio.to_thread``), blocked in its queue's ``get``, as busy: a fifth of the
    samples, though ``/proc`` gives that thread no CPU at all. The broker's requests all
    run on the event loop's thread, the main one. (``--gil`` is no cure: uvloop writes
    to its sockets without the GIL, and those samples would go too.)
    """
    lines = collapsed.splitlines(keepends=True)
    return "".join(line for line in lines if not _THREAD_ROOT.match(line))


_THREAD_ROOT = re.compile(r"(?:Thread\.)?_bootstrap \(threading\.py")


# --- the apps (each served by its own uvicorn process) -------------------------------------

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Get = Callable[[str], Awaitable[bytes]]


def _upstream(delay: float) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """A bare ASGI upstream answering the bench body after ``delay`` seconds."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if delay:
            await asyncio.sleep(delay)
        await _answer_json(send, UPSTREAM_BODY)

    return app


async def _answer_json(send: Send, body: bytes) -> None:
    start = {"status": 200, "headers": [(b"content-type", b"application/json")]}
    await send({"type": "http.response.start", **start})
    await send({"type": "http.response.body", "body": body})


def slow_upstream() -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    return _upstream(SLOW_SECONDS)


def fast_upstream() -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    return _upstream(0.0)


async def _lifespan(
    receive: Receive, send: Send, started: Callable[[], Awaitable[None]] | None = None
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if started is not None:
                await started()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@contextlib.asynccontextmanager
async def _client(option: str) -> AsyncIterator[Get]:
    """``option``'s client, as a function from URL to body, for the app's lifetime."""
    if option == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:

            async def get_aiohttp(url: str) -> bytes:
                async with session.get(url) as answer:
                    body: bytes = await answer.read()
                    return body

            yield get_aiohttp
        return
    client: httpx.AsyncClient
    if option == "direct":
        from proxy.upstream import create_client

        client = create_client()
    elif option == "httpx_default":
        client = httpx.AsyncClient(trust_env=False)
    elif option == "httpx_tuned":
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        client = httpx.AsyncClient(limits=limits, trust_env=False)
    elif option == "httpx_aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(
            client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        )
        client = httpx.AsyncClient(transport=transport, trust_env=False)
    else:
        raise ValueError(f"unknown client option {option!r}")
    async with client:

        async def get_httpx(url: str) -> bytes:
            return (await client.get(url)).content

        yield get_httpx


def client_app() -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """A miss without the broker: ``POST /slow`` or ``/fast`` with a broker body → the
    upstream's ``/users/{user_id}`` through the client named by ``BENCH_MISSES_CLIENT``."""
    option = os.environ["BENCH_MISSES_CLIENT"]
    upstreams = {
        b"/slow": os.environ["BENCH_MISSES_SLOW"].encode(),
        b"/fast": os.environ["BENCH_MISSES_FAST"].encode(),
    }
    state: dict[str, Get] = {}
    stack = contextlib.AsyncExitStack()

    async def started() -> None:
        state["get"] = await stack.enter_async_context(_client(option))
        gc.freeze()  # as the broker does: no full collection over start-up's objects

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await _lifespan(receive, send, started)
            finally:
                await stack.aclose()
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        user_id = orjson.loads(body)["configured_params"]["user_id"]
        base = upstreams[scope["raw_path"]]
        await _answer_json(send, await state["get"](f"{base.decode()}/users/{user_id}"))

    return app


# --- the run ---------------------------------------------------------------------------------


def _installed(option: str) -> bool:
    needs = {"aiohttp": ("aiohttp",), "httpx_aiohttp": ("aiohttp", "httpx_aiohttp")}
    return all(importlib.util.find_spec(name) is not None for name in needs.get(option, ()))


class Misses:
    """The processes of one run and the wrk runs against them."""

    def __init__(self, args: argparse.Namespace, work: Path, database_url: str, prefix: str):
        self.args = args
        self.work = work
        chosen = [o for o in OPTIONS if o in args.targets]
        self.options = [o for o in chosen if _installed(o)]
        self.skipped = [o for o in chosen if o not in self.options]
        self.targets = [BROKER, BROKER_CACHED, *self.options]
        # The broker's own start-up (settings, processes, registration) is bench.run's.
        self.bench = Bench(
            Options(postgres=args.postgres, redis=args.redis), work, database_url, prefix
        )
        self.children: dict[str, Child] = {}
        self.ports = {name: free_port() for name in ("slow", "fast", *self.options)}
        self.pids: dict[str, int] = {}
        self.key_prefix = uuid.uuid4().hex[:8]

    def url(self, name: str, path: str = "") -> str:
        return f"http://{LOOPBACK}:{self.ports[name]}{path}"

    def _start(self, name: str, argv: list[str], env: dict[str, str], port: int) -> int:
        """``argv`` as ``name``, logged to ``work/name.log``, listening on ``port``; its pid."""
        child = self.children[name] = Child(argv, env, self.work / f"{name}.log", ROOT)
        child.wait_listening(port, timeout=60)
        return child.pid

    def stop_all(self) -> None:
        for child in self.children.values():
            child.stop(timeout=30)
        self.children.clear()
        self.bench.stop_all()

    def tails(self) -> dict[str, str]:
        """The end of every process's log, the broker's included."""
        children = {**self.children, **self.bench.children}
        return {name: child.tail() for name, child in children.items()}

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
        for name in ("slow", "fast"):
            argv = _uvicorn(f"bench.misses:{name}_upstream", self.ports[name])
            self.pids[name] = self._start(name, argv, env, self.ports[name])
        for option in self.options:
            app_env = {
                **env,
                "BENCH_MISSES_CLIENT": option,
                "BENCH_MISSES_SLOW": self.url("slow"),
                "BENCH_MISSES_FAST": self.url("fast"),
            }
            argv = _uvicorn("bench.misses:client_app", self.ports[option])
            self.pids[option] = self._start(option, argv, app_env, self.ports[option])
        if self.args.databroker:
            # Another build's broker (say main's, to measure before and after in one run).
            argv = [self.args.databroker, "serve", "--host", LOOPBACK, "--port"]
            port = self.bench.ports["broker"]
            self.pids[BROKER] = self._start(
                BROKER, [*argv, str(port)], dict(self.bench.broker_env), port
            )
        else:
            self.pids[BROKER] = self.bench.start_broker().pid
        self.pids[BROKER_CACHED] = self.pids[BROKER]
        self._register()

    def _register(self) -> None:
        headers = admin_headers(ADMIN_TOKEN)
        base = self.bench.url("broker", "")
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
            for (upstream, name), cached in [
                *((item, False) for item in SOURCES.items()),
                *((item, True) for item in CACHED_SOURCES.items()),
            ]:
                spec = {
                    "name": name,
                    "source": {
                        "url": self.url(upstream, "/users/{{ user_id }}"),
                        "response_type": "JSON",
                        "timeout": 10,
                    },
                    "caching": {"enabled": cached, "ttl": 3600 if cached else None},
                }
                created = client.post("/data-sources", json=spec, headers=headers)
                created.raise_for_status()
                sid = created.json()["data_source_id"]
                client.post(f"/data-sources/{sid}/publish", headers=headers).raise_for_status()
                self.bench._check("broker", self.bench.body(name, "check"), "REQUEST")

    def target_url(self, target: str, upstream: str) -> str:
        if target in (BROKER, BROKER_CACHED):
            return self.bench.url("broker")
        return self.url(target, f"/{upstream}")

    def script(self, target: str, upstream: str, run: int) -> Path:
        path = self.work / f"{target}-{upstream}-{run}.lua"
        prefix = f"{self.key_prefix}{run}"
        sources = CACHED_SOURCES if target == BROKER_CACHED else SOURCES
        path.write_text(unique_keys_script(sources[upstream], prefix))
        return path

    def wrk(self, target: str, upstream: str, concurrency: int, duration: int, run: int) -> Run:
        pid = self.pids[target]
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{pid}/stat")
        before = cpu_seconds(stat.read_text(), ticks)
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s"]
        argv += ["-s", str(self.script(target, upstream, run)), self.target_url(target, upstream)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}")
        spent = cpu_seconds(stat.read_text(), ticks) - before
        case = "a" if upstream == "slow" else "b"
        return Run(target, case, concurrency, stats.parse_wrk(done.stdout), spent)

    def load(self) -> list[Run]:
        args, runs, counter = self.args, [], 0
        for target in self.targets:  # warm-up: connections open, code paths hot
            counter += 1
            self.wrk(target, "fast", 16, 2, counter)
        for round_ in range(1, args.rounds + 1):
            plan = [("slow", SLOW_CONCURRENCY)] + [("fast", c) for c in FAST_CONCURRENCY]
            for upstream, c in plan:
                for target in self.targets:
                    counter += 1
                    run = self.wrk(target, upstream, c, args.duration, counter)
                    runs.append(run)
                    print(
                        f"round {round_} {run.case} c={c:<3} {target:<14} {run.wrk.rps:>7.0f} "
                        f"req/s p50 {run.wrk.p50_ms:7.2f} ms p99 {run.wrk.p99_ms:7.2f} ms "
                        f"CPU {run.cpu_us_per_request:5.0f} µs/req"
                        + (f" errors {run.wrk.errors}" if run.wrk.errors else ""),
                        flush=True,
                    )
        return runs

    def profile(self, target: str, upstream: str, concurrency: int) -> str:
        """py-spy on ``target``'s server while wrk drives it."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        duration, rate = self.args.duration, 200
        raw = self.work / f"profile-{target}-{upstream}.txt"
        script = self.script(target, upstream, 10_000 + concurrency)
        wrk = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration + 2}s", "-s", str(script)]
        with subprocess.Popen(
            [*wrk, self.target_url(target, upstream)], stdout=subprocess.PIPE, text=True
        ) as load:
            try:
                time.sleep(1)
                spy_argv = [spy, "record", "-p", str(self.pids[target]), "-d", str(duration)]
                spy_argv += ["-r", str(rate), "-f", "raw", "-o", str(raw)]
                subprocess.run(spy_argv, check=True, capture_output=True, timeout=duration + 60)
                stdout, _ = load.communicate(timeout=duration + 60)
            finally:
                if load.poll() is None:
                    load.kill()
        run = stats.parse_wrk(stdout)
        folded = stats.fold_profile(loop_thread(raw.read_text()))
        # Each sample stands for 1/rate s of one busy thread; py-spy saw ``duration`` s of load.
        cpu_us = folded.samples * 1e6 / rate / (run.rps * duration) if run.rps else None
        return (
            f"profile: {target} at c={concurrency}, {upstream} upstream, "
            f"{run.rps:.0f} req/s under py-spy\n" + stats.format_profile(folded, cpu_us)
        )


@contextlib.contextmanager
def _stopping(misses: Misses) -> Iterator[Misses]:
    try:
        yield misses
    except BaseException:
        for name, tail in misses.tails().items():
            print(f"--- {name} log (tail)\n{tail}", file=sys.stderr)
        raise
    finally:
        misses.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.misses", description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="medians over this many rounds")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on the broker in case b at c=16 (both sources) and in case a",
    )
    parser.add_argument(
        "--targets",
        type=lambda text: text.split(","),
        default=list(OPTIONS),
        help=f"client options beside the broker, comma-separated (default: {','.join(OPTIONS)})",
    )
    parser.add_argument(
        "--databroker", help="the databroker executable to measure (default: this one's)"
    )
    server_arguments(parser)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.misses: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="databroker-misses-") as tmp,
        private_database(args.postgres, "databroker_misses") as database_url,
        private_prefix(args.redis, "bench") as prefix,
        _stopping(Misses(args, Path(tmp), database_url, prefix)) as misses,
    ):
        if misses.skipped:
            print(f"skipped (not installed): {', '.join(misses.skipped)}", flush=True)
        misses.start()
        table = summarize(misses.load())
        profiles = (
            [
                misses.profile(BROKER, "fast", 16),
                misses.profile(BROKER_CACHED, "fast", 16),
                misses.profile(BROKER, "slow", SLOW_CONCURRENCY),
            ]
            if args.profile
            else []
        )
    print(
        f"\nbench.misses: {os.cpu_count()} cores, load average {load[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; medians of {args.rounds} rounds of {args.duration} s"
    )
    print(report(table, misses.targets))
    for profile in profiles:
        print("\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
