"""bench.replay: its bodies replay instants that find an object; a tiny run end to end."""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime

import orjson
import pytest

from bench.replay import T0, YEAR, created_at, main, progress_rate, replay_bodies
from tests.conftest import REDIS_URL, pg_server


def test_each_body_asks_for_an_instant_after_its_keys_first_object() -> None:
    bodies = [orjson.loads(b) for b in replay_bodies(500, objects=1000, keys=100)]
    assert len({b["configured_params"]["n"] for b in bodies}) > 50
    for body in bodies:
        k = int(body["configured_params"]["n"])
        instant = datetime.fromisoformat(body["replay"]["as_of"])
        assert 0 <= k < 100 and created_at(k, 1000) <= instant <= T0 + YEAR
        assert body["replay"].keys() == {"as_of"}  # strict by default


def test_the_export_rate_is_read_from_the_last_progress_line() -> None:
    stderr = "[###   ] 10/100 objects (10%), 900/s\n[######] 100/100 objects (100%), 52,345/s\n"
    assert progress_rate(stderr) == 52_345


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by make bench")
def test_a_tiny_run_finds_every_replay_through_the_index(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = asyncio.run(pg_server())
    argv = ["--objects", "2000", "--duration", "1", "--export-days", "365"]
    assert main([*argv, "--postgres", server, "--redis", REDIS_URL]) == 0
    out = capsys.readouterr().out
    assert "Index Scan Backward using ix_data_object_source_key_created" in out
    assert "errors 0; index ix_data_object_source_key_created: ok; broker CPU" in out
    assert "export of 365 days: 2,000 objects, streamed at" in out
