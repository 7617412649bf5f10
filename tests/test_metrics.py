"""Metrics: what each family counts, in one process and summed across ``serve --workers 2``.

The multi-worker test sends every request and every scrape on a new connection, so
both land on either worker: without multiprocess mode a scrape would show only the
counts of the worker it reached, and go backwards from one scrape to the next.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import httpx
from prometheus_client import REGISTRY, Gauge
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response

from proxy import __version__
from proxy.metrics import sample
from proxy.outbox import Outbox, RunDataRequestRecord
from tests.conftest import REDIS_URL, Broker
from tests.harness import (
    BROKER_PATH,
    async_wait_for,
    broker_request,
    register,
    sidecar_env,
)
from tests.instances import sidecar
from tests.servers import Upstream
from tests.test_shutdown import slow_json


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _spec(name: str, url: str, **source: object) -> dict[str, object]:
    return {
        "name": name,
        "source": {"url": url, "params": {"n": "{{ n }}"}, "response_type": "JSON", **source},
        "caching": {"enabled": True, "ttl": 600},
    }


async def test_requests_are_counted_by_source_origin_and_code_and_timed_by_origin(
    shared_broker: Broker, upstream: Upstream
) -> None:
    name = f"counted_{uuid.uuid4().hex[:8]}"
    await shared_broker.register(_spec(name, slow_json(upstream, f"/{name}")))
    requests = "databroker_requests_total"
    before = {
        origin: _sample(requests, source=name, origin=origin, code="OK")
        for origin in ("REQUEST", "CACHE")
    }
    timed = {
        origin: _sample("databroker_request_duration_seconds_count", origin=origin)
        for origin in ("REQUEST", "CACHE", "NONE")
    }
    unknown = _sample(requests, source="", origin="NONE", code="DATA_SOURCE_NOT_FOUND")
    invalid = _sample(requests, source="", origin="NONE", code="INVALID_REQUEST")

    for _ in range(2):
        assert (await shared_broker.call(name, {"n": "1"})).status_code == 200
    assert (await shared_broker.call(f"no_such_{name}")).status_code == 404
    assert (await shared_broker.client.post(BROKER_PATH, content=b"{")).status_code == 400

    assert _sample(requests, source=name, origin="REQUEST", code="OK") == before["REQUEST"] + 1
    assert _sample(requests, source=name, origin="CACHE", code="OK") == before["CACHE"] + 1
    # An unknown name is the caller's text: never a label value.
    assert _sample(requests, source="", origin="NONE", code="DATA_SOURCE_NOT_FOUND") == unknown + 1
    assert _sample(requests, source="", origin="NONE", code="INVALID_REQUEST") == invalid + 1
    after = {
        origin: _sample("databroker_request_duration_seconds_count", origin=origin)
        for origin in timed
    }
    assert after == {
        "REQUEST": timed["REQUEST"] + 1,
        "CACHE": timed["CACHE"] + 1,
        "NONE": timed["NONE"] + 2,
    }
    metrics = (await shared_broker.client.get("/metrics")).text
    assert f'databroker_build_info{{version="{__version__}"}} 1.0' in metrics


async def test_upstream_statuses_and_retries_are_counted_per_source(
    shared_broker: Broker, upstream: Upstream
) -> None:
    name = f"flaky_{uuid.uuid4().hex[:8]}"
    answers = iter([503, 503, 200])

    async def flaky(_: Request) -> Response:
        return Response(b'{"ok": true}', next(answers))

    url = upstream.on(f"/{name}", flaky)
    retry = {"max_retries": 3, "backoff_factor": 0.001, "status_forcelist": [503]}
    await shared_broker.register(_spec(name, url, retry=retry))
    assert (await shared_broker.call(name, {"n": "1"})).status_code == 200
    assert _sample("databroker_upstream_responses_total", source=name, status="503") == 2
    assert _sample("databroker_upstream_responses_total", source=name, status="200") == 1
    assert _sample("databroker_upstream_retries_total", source=name) == 2

    down = f"down_{uuid.uuid4().hex[:8]}"
    await shared_broker.register(_spec(down, "http://127.0.0.1:1/x"))  # nothing listens on 1
    assert (await shared_broker.call(down, {"n": "1"})).status_code == 502
    assert (
        _sample("databroker_upstream_responses_total", source=down, status="CONNECTION_ERROR") == 1
    )
    assert _sample("databroker_upstream_retries_total", source=down) == 0


async def test_with_one_process_a_sampled_gauge_is_read_when_scraped_and_nothing_wakes() -> None:
    gauge = Gauge("databroker_test_sampled", "A test's.", registry=None)
    held = [1.0]
    # Returns at once: no task is left to wake up every interval.
    await asyncio.wait_for(sample(3600, [(gauge, lambda: held[0])]), timeout=5)
    held[0] = 2.0
    assert [s.value for s in gauge.collect()[0].samples] == [2.0]


def test_the_oldest_record_is_dated_by_its_first_write_not_its_segment_opening(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    assert outbox.oldest_record_time() is None  # an open segment with nothing in it
    before = time.time()
    record = RunDataRequestRecord(
        uuid.uuid4(), uuid.uuid4(), None, uuid.uuid4(), "CACHE", None, None, None, before
    )
    outbox.append(record)
    oldest = outbox.oldest_record_time()
    assert oldest is not None and before <= oldest <= time.time()
    outbox.seal()
    outbox.append(record)  # a newer segment: the oldest is still the first one's
    assert outbox.oldest_record_time() == oldest
    outbox.close()


async def _includes(found: Awaitable[dict[str, float]], want: dict[str, float]) -> bool:
    got = await found
    return all(got.get(name) == value for name, value in want.items())


async def _warm(client: httpx.AsyncClient, name: str, times: int = 10) -> int:
    """Ask for one key ``times`` times, each on a new connection (either worker): all 200."""
    for _ in range(times):
        answer = await client.post(BROKER_PATH, json=broker_request(name, {"n": "warm"}))
        assert answer.status_code == 200, answer.text
    return times


def _families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        family.name: [
            (s.labels, s.value) for s in family.samples if s.name.endswith(("_total", "_count"))
        ]
        for family in text_string_to_metric_families(text)
    }


async def test_two_workers_scrape_as_one_counters_never_go_backwards(
    pg_url: str, redis_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"")  # a previous run's: serve removes it
    env = sidecar_env(
        pg_url,
        REDIS_URL,
        tmp_path / "outbox",
        redis_prefix=redis_prefix,
    )
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    url = slow_json(upstream, "/workers")
    # A new connection for every call: each may reach either worker.
    async with sidecar(env, tmp_path, workers=2, max_keepalive_connections=0) as running:
        process, client = running.process, running.client
        name = f"workers_{uuid.uuid4().hex[:8]}"  # the session's tables are shared
        await register(client, _spec(name, url))
        # Both workers know the source from the admin answer on (proxy.source_registry
        # counts the change before answering): no 404, from either.
        made = await _warm(client, name)
        seen: list[float] = []
        for scrape in range(20):
            # Misses in flight together (the upstream takes 20 ms), and hits of them.
            params = [{"n": str(scrape * 4 + i % 4)} for i in range(8)]
            answers = await asyncio.gather(
                *(client.post(BROKER_PATH, json=broker_request(name, p)) for p in params)
            )
            assert [a.status_code for a in answers] == [200] * len(params)
            made += len(params)
            families = _families((await client.get("/metrics")).text)
            counted = sum(
                v for labels, v in families["databroker_requests"] if labels["source"] == name
            )
            timed = sum(v for _, v in families["databroker_request_duration_seconds"])
            assert counted == made == timed, (scrape, counted, made, timed)
            assert not seen or counted >= seen[-1]
            seen.append(counted)
        upstream_calls = sum(v for _, v in families["databroker_upstream_responses"])
        assert upstream_calls == 20 * 4 + 1 == upstream.hits("/workers")

        async def gauges() -> dict[str, float]:
            text = (await client.get("/metrics")).text
            return {
                f.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
                for f in text_string_to_metric_families(text)
                if f.type == "gauge"
                for s in f.samples
            }

        # Live gauges combine the workers' values (min, max, sum), nobody else's.
        want = {
            "databroker_hot_live": 1.0,
            "databroker_dependency_up{redis}": 1.0,
            "databroker_dependency_up{database}": 1.0,
            f"databroker_build_info{{{__version__}}}": 1.0,
        }
        try:
            await async_wait_for(lambda: _includes(gauges(), want), timeout=10)
        except AssertionError as exc:  # say which gauge never came: it failed once in four
            raise AssertionError(f"{exc}: wanted {want}, last scrape {await gauges()}") from exc
        # The workers' files only: not the parent's (it serves no metrics), nor the stale one.
        pids = {path.stem.split("_")[-1] for path in shared.glob("*.db")}
        assert str(process.pid) not in pids and "1" not in pids
        assert len(pids) == 2, pids
        # Both served (every worker's files exist from its import on: they prove nothing).
        serving = {
            path.stem.split("_")[-1]
            for path in shared.glob("counter_*.db")
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
            if value and json.loads(key)[0] == "databroker_requests"
        }
        assert serving == pids, f"one worker served everything; nothing was summed: {serving}"
