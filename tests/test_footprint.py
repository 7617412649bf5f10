"""What the serving process loads: only what serving uses (README "Footprint").

A sidecar runs beside every worker, so each module ``databroker serve`` imports
costs memory across the fleet. The real command runs here on Postgres and Redis,
under a wrapper that writes its ``sys.modules`` on SIGUSR1: read once it is
ready and has answered probes and a broker request, then again after an admin
request stored a variable, which must load what was left for it. A module
here, not an RSS threshold: memory depends on the machine, an import does not.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL
from tests.harness import (
    ADMIN_TOKEN,
    BROKER_PATH,
    LOOPBACK,
    Child,
    admin_headers,
    broker_request,
    counter,
    free_port,
    insert_source,
    sidecar_env,
    wait_for,
)
from tests.servers import Upstream

# The CLI as the console script runs it, plus a SIGUSR1 handler that writes sys.modules.
SERVE = """
import json, os, signal, sys

def written(_signum, _frame):
    target = os.environ["MODULES_FILE"]
    with open(target + ".part", "w") as out:
        json.dump(sorted(sys.modules), out)
    os.replace(target + ".part", target)

signal.signal(signal.SIGUSR1, written)
from proxy.cli import main
main()
"""

# Never in the serving process: migrations (databroker migrate), uvicorn's --reload and
# WebSocket dependencies, pydantic-settings (proxy.settings reads the environment itself).
NEVER = {"alembic", "mako", "pydantic_settings", "watchfiles", "websockets"}
# Loaded by the first request that needs them, not before: Fernet for a stored secret,
# the XML parser for an XML body, SQLAlchemy and the admin routes for an admin request.
WHEN_NEEDED = {"cryptography.fernet", "defusedxml", "sqlalchemy", "proxy.routes.admin"}


def modules(process: Child, target: Path) -> set[str]:
    """The modules ``process`` holds now."""
    target.unlink(missing_ok=True)
    os.kill(process.pid, signal.SIGUSR1)
    wait_for(target.exists, timeout=30)
    loaded: list[str] = json.loads(target.read_text())
    return set(loaded)


@pytest.fixture
async def served_source(db: AsyncEngine, upstream: Upstream) -> str:
    """A source in the database before the sidecar starts: serving it needs no admin route."""
    name = f"served_{uuid.uuid4().hex[:8]}"
    url = upstream.answer("/footprint", b'{"ok": true}')
    await insert_source(db, name, datetime.now(UTC), {"url": url, "response_type": "JSON"})
    return name


def test_serve_loads_only_what_it_uses(
    served_source: str, pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    target = tmp_path / "modules.json"
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=redis_prefix)
    argv = [sys.executable, "-c", SERVE, "serve", "--host", LOOPBACK, "--port", str(port)]
    process = Child(argv, {**env, "MODULES_FILE": str(target)}, tmp_path / "serve.log")
    try:
        process.wait_listening(port)
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            assert client.get("/metrics").status_code == 200
            assert client.get("/").status_code == 404  # a balancer's check, say
            unknown = client.post(BROKER_PATH, json=broker_request("no_such_source"))
            assert unknown.json()["error"]["code"] == "DATA_SOURCE_NOT_FOUND"
            fetched = client.post(BROKER_PATH, json=broker_request(served_source))
            assert fetched.json()["value"] == {"ok": True}, fetched.text
            # The miss's DataObject and audit row reach the database: the writer's path too.
            wait_for(
                lambda: counter(client.get("/metrics").text, "databroker_records_written") >= 2
            )

            early = modules(process, target) & (NEVER | WHEN_NEEDED)
            assert not early, f"serving loaded {sorted(early)}"

            headers = admin_headers(ADMIN_TOKEN)
            spec = {
                "name": "with_secret",
                "source": {"url": "http://127.0.0.1:9/{{ TOKEN }}"},
                "variables": ["TOKEN"],
            }
            made = client.post("/data-sources", json=spec, headers=headers)
            assert made.status_code == 200, made.text
            variables = [{"name": "TOKEN", "value": "s3cret"}]
            path = f"/data-sources/{made.json()['data_source_id']}/variables"
            assert client.put(path, json=variables, headers=headers).status_code == 200

            used = modules(process, target)
        assert {"cryptography.fernet", "sqlalchemy", "proxy.routes.admin"} <= used
        assert used & NEVER == set()
    finally:
        process.kill()
