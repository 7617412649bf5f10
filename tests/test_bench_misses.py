"""bench.misses' pure half on canned input, and its wrk script against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import orjson
import pytest

from bench.misses import (
    BROKER,
    BROKER_CACHED,
    SOURCES,
    Row,
    Run,
    cpu_seconds,
    loop_thread,
    report,
    summarize,
    unique_keys_script,
)
from bench.stats import WrkRun


def test_cpu_seconds_reads_utime_and_stime_past_an_awkward_command_name() -> None:
    # Fields 14 and 15 (utime, stime) in clock ticks; the name may hold spaces and ")".
    stat = "4242 (uv icorn) x) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0 100 0 0"
    assert cpu_seconds(stat, 100) == 2.0


def _run(target: str, case: str, c: int, rps: float, p50: float, p99: float) -> Run:
    wrk = WrkRun(int(rps * 10), 10.0, p50, p50, p99, p99, 0)
    return Run(target, case, c, wrk, cpu_seconds=wrk.requests * 500e-6)


def test_report_judges_the_broker_against_both_cases() -> None:
    runs = [
        _run(BROKER, "a", 128, 600, 205, 250),
        _run("direct", "a", 128, 620, 203, 240),
        _run(BROKER, "b", 1, 900, 1.5, 3),
        _run("direct", "b", 1, 1000, 1.0, 2),
        _run(BROKER, "b", 16, 900, 14, 30),
        _run("direct", "b", 16, 1000, 12, 30),
    ]
    table = summarize(runs)
    assert table[("a", BROKER, 128)] == Row(600, 205, 250, 500, 0)
    text = report(table, [BROKER, "direct"])
    assert "600 req/s (target >= 576: ok), p99 250 ms (target <= 260: ok)" in text
    assert "c=1 +0.50 ms ok  c=16 +2.00 ms MISSED" in text


def test_report_says_what_a_cached_source_adds_to_a_miss() -> None:
    plain = _run(BROKER, "b", 16, 900, 14, 30)
    cached = _run(BROKER_CACHED, "b", 16, 800, 16, 35)
    cached = dataclasses.replace(cached, cpu_seconds=cached.wrk.requests * 800e-6)
    text = report(summarize([plain, cached]), [BROKER, BROKER_CACHED])
    assert "b: broker_cached CPU/req - broker CPU/req: c=16 +300 µs" in text


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by make bench")
async def test_every_request_of_the_wrk_script_carries_a_new_key(tmp_path: Path) -> None:
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                bodies.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script = tmp_path / "misses.lua"
    script.write_text(unique_keys_script(SOURCES["fast"], "run7"))
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t1", "-c4", "-d1s", "-s", str(script), f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await wrk.communicate()
    server.close()
    assert b"@@bench " in output  # the result line of bench.stats' done hook
    parsed = [orjson.loads(body) for body in bodies]
    keys = [p["configured_params"]["user_id"] for p in parsed]
    assert len(keys) > 10
    assert len(set(keys)) == len(keys)
    assert all(key.startswith("run7-1-") for key in keys)
    assert {p["data_source_name"] for p in parsed} == {SOURCES["fast"]}


def test_profiles_keep_the_event_loops_thread_only() -> None:
    main = "Runner.run (asyncio/runners.py:118);Event.wait (threading.py:629) 7\n"
    worker = (
        "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);"
        "_worker (concurrent/futures/thread.py:81) 5\n"
    )
    assert loop_thread(main + worker + main) == main + main
