"""Logs: the formats (pure), the request id at the door, and ``serve --workers 2`` writing
JSON lines in every process, each line about a request with its request id and run_id."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from proxy.logs import (
    CURRENT,
    JsonFormatter,
    RequestContext,
    RequestFilter,
    TextFormatter,
    default_format,
    log_config,
)
from proxy.request_ids import request_id
from tests.conftest import Broker
from tests.harness import (
    BROKER_PATH,
    async_wait_for,
    broker_request,
    register,
    sidecar_env,
)
from tests.instances import RedisInstance, sidecar, terminate
from tests.servers import Upstream

RUN_ID = uuid.UUID("5f0c7a52-2b1c-4f55-9d0e-8d6f2b7c1a11")


# --- formats (pure) ------------------------------------------------------------------------


def record(message: str = "served %s", *args: Any, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("databroker.broker", logging.ERROR, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def filtered(made: logging.LogRecord, context: RequestContext | None) -> logging.LogRecord:
    token = CURRENT.set(context)
    try:
        assert RequestFilter().filter(made)
    finally:
        CURRENT.reset(token)
    return made


def test_a_json_line_carries_the_request_it_is_about() -> None:
    line = JsonFormatter().format(filtered(record("served %s", "x"), RequestContext("r-1", RUN_ID)))
    parsed = json.loads(line)
    assert parsed["message"] == "served x"
    assert (parsed["level"], parsed["logger"]) == ("ERROR", "databroker.broker")
    assert (parsed["request_id"], parsed["run_id"]) == ("r-1", str(RUN_ID))
    assert parsed["time"].endswith("+00:00") and isinstance(parsed["pid"], int)
    assert "\n" not in line


def test_a_json_line_outside_a_request_has_no_request_fields() -> None:
    parsed = json.loads(JsonFormatter().format(filtered(record(), None)))
    assert "request_id" not in parsed and "run_id" not in parsed


def test_a_traceback_stays_inside_its_json_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = record()
        made.exc_info = sys.exc_info()
    line = JsonFormatter().format(filtered(made, RequestContext("r-2")))
    assert "\n" not in line
    parsed = json.loads(line)
    assert "RuntimeError: boom" in parsed["exception"]
    assert parsed["request_id"] == "r-2" and "run_id" not in parsed


def test_a_text_line_ends_with_the_request_fields_above_its_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = record("served %s", "x", method="GET", status=200)
        made.exc_info = sys.exc_info()
    text = TextFormatter().format(filtered(made, RequestContext("r-3", RUN_ID)))
    first, *rest = text.splitlines()
    assert first.endswith(f"served x request_id=r-3 run_id={RUN_ID} method=GET status=200")
    assert "RuntimeError: boom" in rest[-1]


def test_json_is_the_default_where_a_database_url_is_set() -> None:
    assert default_format("postgresql+asyncpg://db/x") == "json"
    assert default_format(None) == "text"


@pytest.mark.parametrize(
    ("log_format", "formatter"), [("json", "JsonFormatter"), ("text", "TextFormatter")]
)
def test_the_config_sends_every_logger_through_one_formatter(
    log_format: str, formatter: str
) -> None:
    config = log_config(log_format, "warning", access=False)  # type: ignore[arg-type]
    assert config["formatters"]["databroker"]["()"] == f"proxy.logs.{formatter}"
    assert config["loggers"]["databroker"]["level"] == "WARNING"
    assert config["loggers"]["databroker.access"]["level"] == "CRITICAL"
    assert (
        log_config("json", "warning", access=True)["loggers"]["databroker.access"]["level"]
        == "INFO"
    )


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"0f6e2b1c-9a7d-4e3f-8c5b-1a2d3e4f5a6b", True),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        (b"a" * 128, True),
        (b"a" * 129, False),
        (b"", False),
        (b"x y", False),
        (b'x" run_id="forged', False),
        ("é".encode(), False),
    ],
)
def test_an_acceptable_request_id_is_kept_anything_else_replaced(sent: bytes, kept: bool) -> None:
    got = request_id([(b"host", b"h"), (b"x-request-id", sent)])
    assert (got == sent.decode(errors="replace")) is kept
    if not kept:
        assert len(got) == 32 and int(got, 16) >= 0


def test_a_missing_request_id_is_made_new_each_time() -> None:
    made = {request_id([]) for _ in range(1000)}
    assert len(made) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in made)


def test_a_forked_process_makes_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then leave without pytest's cleanup
        os.write(write, request_id([]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    childs = os.read(read, 64).decode()
    os.close(read)
    assert childs[:16] != request_id([])[:16]


# --- the door, in-thread -------------------------------------------------------------------


async def test_every_answer_echoes_its_request_id(shared_broker: Broker) -> None:
    client = shared_broker.client
    given = {"X-Request-ID": "worker-7.req-42"}
    for answer in (
        await client.post(BROKER_PATH, json=broker_request("nobody"), headers=given),
        await client.get("/healthz", headers=given),
        await client.get("/data-sources", headers=given),  # 401: an error answer too
    ):
        assert answer.headers["x-request-id"] == "worker-7.req-42"
    made = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(len(rid) == 32 for rid in made)
    replaced = await client.get("/healthz", headers={"X-Request-ID": "two words"})
    assert replaced.headers["x-request-id"] != "two words"


# --- serve --workers 2 ---------------------------------------------------------------------


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line the processes wrote, each parsed: a line that is not JSON fails here."""
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.slow
async def test_two_workers_write_json_lines_with_request_id_and_run_id(
    pg_url: str, private_redis: RedisInstance, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.answer("/ok", b'{"ok": true}')
    env = sidecar_env(pg_url, private_redis.url, tmp_path / "outbox", access_log="1")
    # No DATABROKER_LOG_FORMAT: JSON because a database URL is set.
    # A fresh connection per request, so that both workers' accepts get some.
    async with sidecar(env, tmp_path, workers=2, max_keepalive_connections=0) as running:
        process, client = running.process, running.client
        spec = {
            "name": "ok",
            "source": {"url": f"{upstream.url}/ok?n={{{{ n }}}}"},
            "caching": {"enabled": True, "ttl": 60},
        }
        await register(client, spec)
        runs: dict[str, str] = {}

        async def call() -> list[dict[str, Any]]:
            """A miss (a new key each time); every line written so far."""
            rid, run_id = f"test-{len(runs)}", str(uuid.uuid4())
            runs[rid] = run_id
            answer = await client.post(
                BROKER_PATH,
                json=broker_request("ok", {"n": len(runs)}, run_id=run_id),
                headers={"X-Request-ID": rid},
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-request-id"] == rid
            return json_lines(process.output())

        async def both_workers_served() -> bool:
            return len({line["pid"] for line in await call() if "run_id" in line}) >= 2

        await async_wait_for(both_workers_served, timeout=60)
        # Redis gone: the request that finds out says so, inside the request.
        private_redis.kill()

        async def outage_seen() -> bool:
            return any(line["level"] == "WARNING" and "request_id" in line for line in await call())

        await async_wait_for(outage_seen, timeout=30)
        terminate(process)
    lines = json_lines(process.output())
    worker_pids = {line["pid"] for line in lines if line["message"].startswith("Started server")}
    assert len(worker_pids) == 2, lines
    # Every line about a broker call (the admin calls' have no run_id) names its run.
    about_requests = [line for line in lines if line.get("request_id") in runs]
    for line in about_requests:
        assert line["run_id"] == runs[line["request_id"]], line
    # One access line per broker call (and the registration's admin calls), from both workers.
    access = [line for line in lines if line["logger"] == "databroker.access"]
    assert {line["pid"] for line in access} == worker_pids
    assert all(line["status"] == 200 and line["duration_ms"] >= 0 for line in access)
    served = [line["request_id"] for line in access if line["path"] == BROKER_PATH]
    assert sorted(served) == sorted(runs)
    assert [line["message"] for line in about_requests if line["level"] == "WARNING"] != []
