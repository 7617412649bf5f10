"""The benchmark's pure half (bench.stats): wrk scripts and output, medians, ratios,
the table, invalidation latency, profiles; and that the benchmark is not shipped.

Nothing here starts a server or times anything; ``make bench`` runs the benchmark.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from setuptools import find_packages

from bench.idle import CommandCounter, cpu_seconds
from bench.stats import (
    MARK,
    STOPPED,
    Latencies,
    Summary,
    WrkRun,
    fold_profile,
    format_footprint,
    format_latencies,
    format_table,
    lua_script,
    parse_wrk,
    ratios,
    rss_kib,
    summarize,
    summarize_latencies,
)
from proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent

WRK_OUTPUT = f"""Running 10s test @ http://127.0.0.1:40000/internal/data-broker
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  400.00us  12.00ms   90.00%
  50000 requests in 10.00s, 20.00MB read
Requests/sec:   5000.00
{MARK}{{"requests":50000,"duration_us":10000000,"p50_us":2000,"p90_us":2500,"p99_us":4100,"max_us":12000,"connect":0,"read":1,"write":0,"status":2,"timeout":0}}
"""


def run(rps: float, p50: float, p99: float, errors: int = 0) -> WrkRun:
    return WrkRun(int(rps * 10), 10.0, p50, p50, p99, p99, errors)


def test_parse_wrk_reads_the_done_hook_line() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result == WrkRun(50000, 10.0, 2.0, 2.5, 4.1, 12.0, errors=3)
    assert result.rps == 5000


def test_parse_wrk_without_the_line_says_so() -> None:
    with pytest.raises(ValueError, match="@@bench"):
        parse_wrk("Running 10s test\nunable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_script_posts_one_body_and_reports() -> None:
    script = lua_script([b'{"data_source_name":"s"}'])
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = [==[{"data_source_name":"s"}]==]' in script
    assert "latency:percentile(99)" in script
    assert MARK in script
    assert "response" not in script  # no per-response Lua call on the timed runs


def test_lua_script_rotates_bodies_and_stops_at_a_limit() -> None:
    script = lua_script([b'{"a":1}', b'{"b":2}'], limit=500)
    assert "request = function()" in script
    assert "answered == 500" in script
    assert STOPPED in script and "wrk.thread:stop()" in script


def test_lua_script_refuses_what_it_cannot_embed() -> None:
    with pytest.raises(ValueError):
        lua_script([])
    with pytest.raises(ValueError):
        lua_script([b'{"a": "]==]"}'])


def test_summarize_takes_medians_and_sums_errors() -> None:
    summary = summarize([run(1000, 1.0, 5.0), run(3000, 3.0, 9.0, errors=1), run(2000, 2.0, 7.0)])
    assert summary == Summary(rps=2000, p50_ms=2.0, p99_ms=7.0, errors=1, runs=3)


def test_ratios_pair_each_target_with_its_reference() -> None:
    table = {
        ("ceiling", 16): Summary(10000, 1.0, 2.0, 0, 2),
        ("hits", 16): Summary(9000, 1.2, 2.5, 0, 2),
        ("hits_redis", 16): Summary(7000, 1.5, 4.0, 0, 2),
        ("direct", 16): Summary(4000, 3.0, 6.0, 0, 2),
        ("misses", 16): Summary(3500, 3.4, 7.0, 0, 2),
        ("ceiling", 1): Summary(3000, 0.3, 0.5, 0, 2),
    }
    got = ratios(table)
    assert got["hits_rps_over_ceiling"] == {16: pytest.approx(0.9)}
    assert got["hits_p99_over_ceiling"] == {16: pytest.approx(1.25)}
    assert got["hits_redis_rps_over_ceiling"] == {16: pytest.approx(0.7)}
    assert got["hits_redis_p99_over_ceiling"] == {16: pytest.approx(2.0)}
    assert got["misses_p50_minus_direct_ms"] == {16: pytest.approx(0.4)}


def test_format_table_lists_every_row_and_judges_the_targets() -> None:
    table = {
        ("ceiling", 16): Summary(10000, 1.0, 2.0, 0, 2),
        ("hits", 16): Summary(8000, 1.2, 3.5, 0, 2),
        ("hits_redis", 16): Summary(11000, 0.9, 2.4, 0, 2),
        ("direct", 16): Summary(4000, 3.0, 6.0, 0, 2),
        ("misses", 16): Summary(3500, 3.4, 7.0, 4, 2),
    }
    text = format_table(table, ratios(table))
    lines = text.splitlines()
    assert lines[0].split() == ["target", "c", "req/s", "p50", "ms", "p99", "ms", "errors"]
    assert lines[1].split() == ["ceiling", "16", "10000", "1.00", "2.00", "0"]
    assert lines[3].split() == ["hits_redis", "16", "11000", "0.90", "2.40", "0"]
    assert lines[5].split() == ["misses", "16", "3500", "3.40", "7.00", "4"]
    assert "hits / ceiling req/s (target >= 0.85): c=16 0.80 MISSED" in text
    assert "hits p99 / ceiling p99 at c=16 (target <= 1.5): 1.75 MISSED" in text
    assert "hits_redis / ceiling req/s (target >= 0.85): c=16 1.10 ok" in text
    assert "hits_redis p99 / ceiling p99 at c=16 (target <= 1.5): 1.20 ok" in text
    assert "c=16 +0.40 ms ok" in text


def test_footprint_judges_each_figure_against_its_target() -> None:
    marks = {
        "requests": 1_000_000,
        "start_to_ready_seconds": 0.8,
        "rss_kib_idle": 61 * 1024,
        "rss_kib_after_first": 70 * 1024,
        "rss_kib_after_all": 81 * 1024,
    }
    assert format_footprint(marks) == [
        "footprint: start to ready 0.80 s (target <= 1: ok)",
        "footprint: idle RSS 61.0 MiB (target <= 60: MISSED)",
        "footprint: RSS 70.0 MiB after 100000 mixed requests (target <= 80: ok)",
        "footprint: RSS 81.0 MiB after 1000000 mixed requests (target <= 80: MISSED)",
        "footprint: growth from 100000 to 1000000 requests x1.157 (target <= 1.1: MISSED)",
    ]


def test_rss_kib_reads_vmrss() -> None:
    status = "Name:\tdatabroker\nVmPeak:\t  200000 kB\nVmRSS:\t   81234 kB\nThreads:\t3\n"
    assert rss_kib(status) == 81234
    with pytest.raises(ValueError):
        rss_kib("Name:\tkthreadd\n")


def test_fold_profile_shares_self_inclusive_and_modules() -> None:
    collapsed = "\n".join(
        [
            "main (a.py:1);handle (proxy/broker.py:10);get (redis/client.py:5) 6",
            "main (a.py:1);handle (proxy/broker.py:12);append (proxy/outbox.py:3) 3",
            "main (a.py:1);send (uvicorn/h.py:9) 1",
            "garbage line",
        ]
    )
    profile = fold_profile(collapsed, top=3)
    assert profile.samples == 10
    assert profile.self_time[0] == ("get (redis/client.py)", 60.0)
    # Line numbers are folded: both lines of ``handle`` count once per stack.
    assert profile.inclusive == [
        ("handle (proxy/broker.py)", 90.0),
        ("append (proxy/outbox.py)", 30.0),
    ]
    assert dict(profile.modules) == {
        "redis/client.py": 60.0,
        "proxy/outbox.py": 30.0,
        "uvicorn/h.py": 10.0,
    }


def test_latencies_are_judged_against_50_ms() -> None:
    latencies = summarize_latencies([0.0004, 0.0012, 0.0009], stale_reads=1)
    assert latencies == Latencies(
        rounds=3, p50_ms=pytest.approx(0.9), max_ms=pytest.approx(1.2), over_target=0, stale_reads=1
    )
    assert format_latencies(latencies).endswith("1 stale answers (target <= 50 ms: ok)")
    late = summarize_latencies([0.001, 0.051], stale_reads=0)
    assert late.over_target == 1
    assert "MISSED" in format_latencies(late)
    with pytest.raises(ValueError):
        summarize_latencies([], stale_reads=0)


def test_the_benchmark_is_not_shipped() -> None:
    """Neither in the wheel (the packages setuptools finds with our pyproject) nor in the CLI."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(ROOT, **config["packages"]["find"])
    assert "proxy" in packages
    assert [p for p in packages if not p.startswith("proxy")] == []
    assert "bench" not in main.commands
    assert "bench" not in CliRunner().invoke(main, ["--help"]).output


def test_the_idle_bench_counts_commands_however_the_socket_splits_them() -> None:
    stream = (
        b"*1\r\n$4\r\nPING\r\n*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$6\r\na\r\nb\r\n" + b"PING\r\n"
    )
    for size in (1, 2, 5, len(stream)):
        counter = CommandCounter()
        for start in range(0, len(stream), size):
            counter.feed(stream[start : start + size])
        assert counter.commands == 3


def test_the_idle_bench_reads_cpu_seconds_past_a_name_with_spaces() -> None:
    stat = "42 (data broker) S 1 42 42 0 -1 4194560 0 0 0 0 150 50 7 7 20 0 3 0"
    assert cpu_seconds(stat, 100) == 2.0
