"""bench.fetches end to end: a real upstream process, a few calls, one line per concurrency."""

from __future__ import annotations

import re

import pytest

from bench.fetches import main


def test_prints_cpu_per_call_at_each_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--calls", "40", "--concurrency", "1,4", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    found = [re.match(r"c=(\d+)\s+40 calls: CPU\s+([\d.]+) µs/call", line) for line in lines]
    measured = [(int(m.group(1)), float(m.group(2))) for m in found if m]
    assert [c for c, _ in measured] == [1, 4]
    assert all(cpu > 0 for _, cpu in measured)
    assert lines[-1].startswith("load average ")
