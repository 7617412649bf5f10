"""The upstream call alone: CPU per ``Upstream.fetch``, measured in-process.

``python -m bench.fetches`` starts bench.misses' fast upstream (its own uvicorn
process), then makes ``--calls`` fetches of a new URL each through
``proxy.upstream.Upstream`` (the broker's client, transport and egress dialer)
at each ``--concurrency``, and prints this process's CPU time per call: no
broker, no wrk, no other process's CPU in the figure. Other work on the machine
still slows each instruction; for a figure that load does not move, count
instructions::

    uvicorn bench.misses:fast_upstream --factory --port 18911 --loop uvloop &
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.fetches \\
        --upstream http://127.0.0.1:18911 --calls 500 --concurrency 16 --rounds 1
    # and again with --calls 1000: the difference / 500 is instructions per call
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvloop

from bench.run import ROOT, _uvicorn
from proxy.retry import Retrying
from proxy.templates import RenderedRequest
from proxy.upstream import Upstream, create_client
from tests.harness import LOOPBACK, Child, free_port

WARM_UP = 200
"""Calls before the measured ones: the connections open, the code paths hot."""


async def cpu_per_call(base: str, calls: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call of ``calls`` fetches of ``base``/u<n>, ``concurrency`` at once."""
    client = create_client()
    upstream = Upstream(client)
    retrying = Retrying()
    left = 0

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            request = RenderedRequest("GET", f"{base}/users/u{left}", (), (), None)
            await upstream.fetch(request, timeout=10.0, retrying=retrying, max_bytes=1 << 20)

    async with client:
        left = WARM_UP
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        gc.collect()
        left = calls
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu * 1e6 / calls, wall * 1e6 / calls


@contextlib.contextmanager
def fast_upstream(work: Path) -> Iterator[str]:
    """bench.misses' fast upstream in a uvicorn process of its own; its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
    child = Child(_uvicorn("bench.misses:fast_upstream", port), env, work / "upstream.log", ROOT)
    try:
        child.wait_listening(port, timeout=60)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        child.stop(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetches", description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000, help="measured calls per run")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[1, 16],
        help="callers at once, comma-separated (default: 1,16)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    parser.add_argument(
        "--upstream", help="a running upstream's base URL (default: start bench.misses' fast one)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="databroker-fetches-") as tmp:
        given = contextlib.nullcontext(args.upstream) if args.upstream else None
        with given or fast_upstream(Path(tmp)) as base:
            for c in args.concurrency:
                runs = [uvloop.run(cpu_per_call(base, args.calls, c)) for _ in range(args.rounds)]
                cpu = statistics.median(r[0] for r in runs)
                wall = statistics.median(r[1] for r in runs)
                print(
                    f"c={c:<3} {args.calls} calls: CPU {cpu:6.1f} µs/call, wall {wall:6.1f} "
                    f"µs/call (median of {args.rounds})",
                    flush=True,
                )
    print("load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
