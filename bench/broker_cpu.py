"""The broker's own CPU per miss, measured in-process: its ASGI app driven directly.

``python -m bench.broker_cpu`` starts bench.misses' fast upstream (its own uvicorn
process), makes the broker's app (``create_app``: a private database on the local
Postgres, a private Redis prefix, hot entries on, as shipped) in this process and
registers two sources on that upstream, one uncached and one cached. It then sends
``--misses`` requests with a new key each, ``--concurrency`` at once, to each
source through the app (no HTTP server, no wrk) and prints this process's CPU time
per miss, beside what ``bench.fetches`` measures for the upstream call alone with
the same client: the difference is the broker's own work (parsing, the key,
rendering, the journal, the answer, and on the cached source its Redis round trips;
the outbox writer and the invalidation link run in this process too, and count).

Other work on the machine slows each instruction; for a figure that load does not
move, count instructions::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.broker_cpu --misses 500 --rounds 1 --sources cached
    # and again with --misses 1000: the difference / 500 is instructions per miss
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop
from cryptography.fernet import Fernet
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bench.fetches import WARM_UP, cpu_per_call, fast_upstream
from proxy.app import create_app
from proxy.routes.internal import PATH
from proxy.settings import Settings
from tests.harness import (
    ADMIN_TOKEN,
    private_database,
    private_prefix,
    register,
    server_arguments,
)

SOURCES = {"uncached": False, "cached": True}
"""Each source's name and whether it caches (a day's TTL)."""
RUN_ID = "3f1c5a3e-8f2a-4b7e-9a55-0d1c2b3a4f5e"


class Broker:
    """The broker's app, started (its lifespan run here), and misses sent to it."""

    def __init__(self, settings: Settings) -> None:
        self.app: ASGIApp = create_app(settings)
        self.state: dict[str, Any] = {}
        self._lifespan: asyncio.Queue[Message] = asyncio.Queue()
        self._started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._keys = 0
        self._tag = uuid.uuid4().hex[:8]

    async def start(self) -> None:
        async def send(message: Message) -> None:
            if message["type"].startswith("lifespan.startup"):
                self._started.set_result(message)

        await self._lifespan.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "state": self.state, "asgi": {"version": "3.0"}}

        async def lifespan() -> None:
            await self.app(scope, self._lifespan.get, send)

        self._task = asyncio.create_task(lifespan())
        started = await self._started
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the broker did not start: {started.get('message')}")

    async def stop(self) -> None:
        await self._lifespan.put({"type": "lifespan.shutdown"})
        if self._task is not None:
            await self._task

    async def _scoped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app as uvicorn calls it: each request's scope with the lifespan's state."""
        await self.app({**scope, "state": dict(self.state)}, receive, send)

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(self._scoped), base_url="http://b")

    async def miss(self, source: str) -> None:
        """One request with a new key; raises unless it is answered 200 from the upstream."""
        self._keys += 1
        body = orjson.dumps(
            {
                "data_source_name": source,
                "configured_params": {"user_id": f"{self._tag}-{self._keys}"},
                "run_id": RUN_ID,
            }
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "state": dict(self.state),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[Message] = []

        async def receive() -> Message:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        answer = orjson.loads(sent[-1]["body"])
        if sent[0]["status"] != 200 or answer["origin"] != "REQUEST":
            raise RuntimeError(f"not a miss: {sent[0]['status']} {answer}")

    async def cpu_per_miss(self, source: str, misses: int, concurrency: int) -> float:
        """CPU µs per miss of ``misses`` new keys of ``source``, ``concurrency`` at once."""
        left = 0

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.miss(source)

        left = WARM_UP
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        gc.collect()
        left = misses
        cpu = time.process_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return (time.process_time() - cpu) * 1e6 / misses


async def measure(args: argparse.Namespace, base: str, database: str, prefix: str) -> None:
    work = Path(args.work)
    settings = Settings(
        database_url=database,
        redis_url=args.redis,
        redis_prefix=prefix,
        admin_token=ADMIN_TOKEN,
        secret_key=Fernet.generate_key().decode(),
        data_dir=work / "data",
        outbox_dir=work / "outbox",
    )
    broker = Broker(settings)
    await broker.start()
    try:
        async with broker.admin() as client:
            for name, cached in SOURCES.items():
                spec = {
                    "name": name,
                    "source": {"url": base + "/users/{{ user_id }}", "response_type": "JSON"},
                    "caching": {"enabled": cached, "ttl": 86_400 if cached else None},
                }
                await register(client, spec)
        for c in args.concurrency:
            runs: dict[str, list[float]] = {name: [] for name in args.sources}
            calls: list[float] = []
            for _ in range(args.rounds):
                for name in args.sources:
                    runs[name].append(await broker.cpu_per_miss(name, args.misses, c))
                calls.append((await cpu_per_call(base, args.misses, c))[0])
            print(
                f"c={c:<3} {args.misses} misses: CPU µs/miss "
                + ", ".join(f"{name} {statistics.median(cpus):.0f}" for name, cpus in runs.items())
                + f"; the upstream call alone (bench.fetches) {statistics.median(calls):.0f}"
                + f"; median of {args.rounds}",
                flush=True,
            )
    finally:
        await broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_cpu", description=__doc__)
    parser.add_argument("--misses", type=int, default=5_000, help="measured misses per run")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[16],
        help="requests at once, comma-separated (default: 16)",
    )
    parser.add_argument(
        "--sources",
        type=lambda text: text.split(","),
        default=list(SOURCES),
        help=f"which sources, comma-separated (default: {','.join(SOURCES)})",
    )
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    server_arguments(parser)
    args = parser.parse_args(argv)
    if unknown := set(args.sources) - set(SOURCES):
        parser.error(f"unknown sources: {', '.join(sorted(unknown))}")
    with (
        tempfile.TemporaryDirectory(prefix="databroker-broker-cpu-") as tmp,
        fast_upstream(Path(tmp)) as base,
        private_database(args.postgres, "databroker_broker_cpu") as database,
        private_prefix(args.redis, "bench") as prefix,
    ):
        args.work = tmp
        uvloop.run(measure(args, base, database, prefix))
    print("load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
