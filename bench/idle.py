"""``python -m bench.idle``: what one idle ``databroker serve`` costs — CPU and Redis commands.

A sidecar runs beside every worker, hundreds of them, and most of the time it waits:
whatever it does while nobody asks anything is multiplied by the fleet. This starts one
``serve`` on the local Postgres (a private database) and Redis (a private prefix), with
a few published sources, sends no request at all (no probe, no scrape), and measures
over ``--seconds``:

- CPU: utime + stime of the process and its children from ``/proc/PID/stat``;
- Redis commands: the sidecar talks to Redis through a relay here that counts every
  command it sends (Redis 7.0 keeps no per-client count, and ``INFO commandstats`` is
  the whole server's, shared with whoever else uses it).

A measurement, printed, asserting nothing. Bench and sidecar share the machine: say the
load average beside the figures (printed).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import click
import httpx

from tests.harness import (
    LOOPBACK,
    POSTGRES_SERVER,
    REDIS_SERVER,
    Child,
    free_port,
    private_database,
    private_prefix,
    register,
    serve_argv,
    sidecar_env,
)

SETTLE_SECONDS = 5.0
"""Left alone after start-up and registration before the measurement starts."""


class CommandCounter:
    """Counts the commands in a client's RESP stream (arrays of bulk strings, as every
    client library sends them), fed in whatever chunks the socket gives."""

    def __init__(self) -> None:
        self.commands = 0
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._command_end()) is not None:
            self.commands += 1
            self._buffer = self._buffer[end:]

    def _command_end(self) -> int | None:
        """Where the first whole command in the buffer ends; None if it is not all here."""
        line = self._buffer.find(b"\r\n")
        if line < 0:
            return None
        if not self._buffer.startswith(b"*"):
            return line + 2  # an inline command: one line
        position = line + 2
        for _ in range(int(self._buffer[1:line])):
            header = self._buffer.find(b"\r\n", position)
            if header < 0:
                return None
            position = header + 2 + int(self._buffer[position + 1 : header]) + 2
            if position > len(self._buffer):
                return None
        return position


def cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """utime + stime from a ``/proc/PID/stat`` line (the name in parentheses may hold spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process below it (``serve --workers N``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        proc = Path(f"/proc/{current}")
        try:
            total += cpu_seconds((proc / "stat").read_text(), ticks)
            for task in (proc / "task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # gone meanwhile
    return total


class Relay:
    """A TCP relay to Redis that counts the commands passing through, in a thread of its own."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.counter = CommandCounter()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, LOOPBACK, self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        counter = CommandCounter()  # per connection: commands never span two

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        before = counter.commands
                        counter.feed(data)
                        self.counter.commands += counter.commands - before
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, upstream_writer, True), pipe(upstream_reader, writer, False)
        )

    @contextmanager
    def running(self) -> Iterator[Relay]:
        self._thread.start()
        self._ready.wait(10)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _register(port: int, count: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}", timeout=30) as client:
        for i in range(count):
            spec = {
                "name": f"idle-{i}-{uuid.uuid4().hex[:6]}",
                "source": {
                    "url": "http://127.0.0.1:9/users/{{ id }}",
                    "response_type": "JSON",
                    "params": {"id": "{{ id }}"},
                },
                "caching": {"enabled": True, "ttl": 600},
            }
            await register(client, spec)


PROBES = (("/readyz", 10.0), ("/metrics", 15.0))
"""With ``--probes``: kubelet's readiness probe and a Prometheus scrape, at their defaults."""


@contextmanager
def _probing(port: int, enabled: bool) -> Iterator[None]:
    """While inside: each of PROBES requested at its period (in a thread), if ``enabled``."""
    stop = threading.Event()

    def probe() -> None:
        due = {path: time.monotonic() for path, _ in PROBES}
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=10) as client:
            while not stop.is_set():
                for path, period in PROBES:
                    if time.monotonic() >= due[path]:
                        client.get(path).raise_for_status()
                        due[path] += period
                stop.wait(max(min(due.values()) - time.monotonic(), 0.0))

    thread = threading.Thread(target=probe, daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join(30)


def measure(
    postgres: str, redis: str, seconds: float, sources: int, workers: int, probes: bool
) -> str:
    """One idle run; the line to print."""
    parsed = httpx.URL(redis)
    relay = Relay(parsed.host or LOOPBACK, parsed.port or 6379)
    with (
        private_database(postgres, "databroker_idle") as database_url,
        private_prefix(redis, "idle") as prefix,
        TemporaryDirectory() as work,
        relay.running(),
    ):
        port = free_port()
        relayed = f"redis://{LOOPBACK}:{relay.port}{parsed.path or '/0'}"
        env = sidecar_env(database_url, relayed, Path(work) / "outbox", redis_prefix=prefix)
        argv = serve_argv(port, "--workers", str(workers))
        child = Child(argv, env, Path(work) / "serve.log")
        try:
            child.wait_listening(port)
            asyncio.run(_register(port, sources))
            time.sleep(SETTLE_SECONDS)
            cpu, commands, started = _tree_cpu(child.pid), relay.counter.commands, time.monotonic()
            with _probing(port, probes):
                time.sleep(seconds)
            elapsed = time.monotonic() - started
            cpu = _tree_cpu(child.pid) - cpu
            commands = relay.counter.commands - commands
        finally:
            child.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"idle: CPU {cpu / elapsed * 100:.3f} % of a core ({cpu:.2f} s in {elapsed:.0f} s), "
        f"Redis {commands / elapsed:.2f} commands/s ({commands} in {elapsed:.0f} s); "
        f"{workers} worker(s), {sources} sources, {'probed' if probes else 'no probes'}, "
        f"load average {load}"
    )


@click.command()
@click.option("--seconds", default=60.0, show_default=True, help="How long to measure.")
@click.option("--sources", default=3, show_default=True, help="Published sources.")
@click.option("--workers", default=1, show_default=True, help="serve --workers.")
@click.option("--runs", default=1, show_default=True, help="Runs, one after the other.")
@click.option("--postgres", default=POSTGRES_SERVER, show_default=True)
@click.option("--redis", default=REDIS_SERVER, show_default=True)
@click.option(
    "--probes", is_flag=True, help="GET /readyz every 10 s and /metrics every 15 s meanwhile."
)
def main(
    seconds: float, sources: int, workers: int, runs: int, postgres: str, redis: str, probes: bool
) -> None:
    """Idle CPU and Redis commands per second of one ``databroker serve``."""
    for _ in range(runs):
        print(measure(postgres, redis, seconds, sources, workers, probes), flush=True)


if __name__ == "__main__":
    main()
