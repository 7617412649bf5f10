"""bench.broker_cpu end to end: the broker's app in-process, a few misses on each source."""

from __future__ import annotations

import re

import pytest

from bench.broker_cpu import main


def test_prints_cpu_per_miss_of_each_source_beside_the_upstream_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--misses", "40", "--concurrency", "1,4", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pattern = (
        r"c=(\d+)\s+40 misses: CPU µs/miss uncached (\d+), cached (\d+); "
        r"the upstream call alone \(bench.fetches\) (\d+); median of 1"
    )
    found = [m for line in lines if (m := re.fullmatch(pattern, line))]
    assert [int(m.group(1)) for m in found] == [1, 4]
    assert all(int(cpu) > 0 for m in found for cpu in m.groups()[1:])
    assert lines[-1].startswith("load average ")
