"""What the tests and the benchmark (``bench/``) both need, written once: free ports,
waits with a deadline, private Postgres databases and Redis prefixes, child processes
(``databroker serve`` and the bench's reference apps), the broker's request body and
source registration through the admin API.

Not shipped (the wheel holds ``proxy`` only), and free of pytest: ``python -m bench``
imports it as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from proxy.engine import migrate
from proxy.keys import make_cache_key
from proxy.tables import data_object, data_source

LOOPBACK = "127.0.0.1"
DATABROKER = Path(sys.executable).with_name("databroker")
"""The console script of the running environment (``.venv`` or ``.venv-lowest``)."""
START_DEADLINE = 30.0
EXIT_DEADLINE = 60.0
ADMIN_TOKEN = "test-admin-token-0123456789"
BROKER_PATH = "/internal/data-broker"
# The local servers the benches default to: an admin connection that creates and drops
# private databases, and the Redis private prefixes live in.
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_SERVER = "redis://127.0.0.1:6379/0"


# --- ports and waits ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """``wait_for`` without blocking the loop; ``condition`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# --- private databases and key prefixes --------------------------------------------------


def database_url(server_url: str, name: str) -> str:
    """The asyncpg URL of database ``name`` on ``server_url``'s server, as its user."""
    url = make_url(server_url).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


async def _administer(server_url: str, sql: str) -> None:
    # CREATE/DROP DATABASE cannot run in a transaction; no pool to leave behind.
    engine = create_async_engine(
        database_url(server_url, make_url(server_url).database or "postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


async def create_database(
    server_url: str, name: str | None = None, template: str | None = None
) -> str:
    """A new database on ``server_url``'s server, empty or a copy of ``template``; its URL."""
    name = name or f"databroker_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    await _administer(server_url, f'CREATE DATABASE "{name}"{copy}')
    return database_url(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    await _administer(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_arguments(parser: argparse.ArgumentParser) -> None:
    """A bench's ``--postgres`` and ``--redis``, for ``private_database``/``private_prefix``."""
    parser.add_argument("--postgres", default=POSTGRES_SERVER)
    parser.add_argument("--redis", default=REDIS_SERVER)


@contextlib.contextmanager
def private_database(server_url: str, label: str = "databroker_test") -> Iterator[str]:
    """A fresh database, migrated, dropped at the end (whoever is still connected); yields its URL.

    ``server_url`` is any database URL on the server (``postgresql://`` or
    ``postgresql+asyncpg://``); its user creates and drops the database.
    """
    name = f"{label}_{uuid.uuid4().hex[:10]}"
    url = asyncio.run(create_database(server_url, name))
    try:

        async def upgrade() -> None:
            engine = create_async_engine(url, poolclass=NullPool)
            try:
                await migrate(engine)
            finally:
                await engine.dispose()

        asyncio.run(upgrade())
        yield url
    finally:
        asyncio.run(drop_database(server_url, name))


def drop_prefix(redis_url: str, prefix: str) -> None:
    """Unlink every key under ``prefix``."""
    with sync_redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])


@contextlib.contextmanager
def private_prefix(redis_url: str, label: str = "dbtest") -> Iterator[str]:
    """A Redis key prefix of our own; every key under it is unlinked at the end."""
    prefix = f"{label}:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        drop_prefix(redis_url, prefix)


# --- child processes ---------------------------------------------------------------------


def clean_env(**databroker: str) -> dict[str, str]:
    """This process's environment without any DATABROKER_* variable, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
    env.update({f"DATABROKER_{k.upper()}": v for k, v in databroker.items()})
    return env


def sidecar_env(
    database_url: str,
    redis_url: str,
    outbox_dir: Path,
    admin_token: str = ADMIN_TOKEN,
    **more: str,
) -> dict[str, str]:
    """A production-shaped sidecar environment (Postgres, Redis, admin token, secret key)."""
    return clean_env(
        database_url=database_url,
        redis_url=redis_url,
        admin_token=admin_token,
        secret_key=Fernet.generate_key().decode(),
        outbox_dir=str(outbox_dir),
        **more,
    )


def serve_argv(port: int, *more: str) -> list[str]:
    """``databroker serve`` on 127.0.0.1:``port``."""
    return [str(DATABROKER), "serve", "--host", LOOPBACK, "--port", str(port), *more]


class Child(subprocess.Popen[bytes]):
    """A child process whose stdout and stderr go to ``log`` (appended).

    Ended by its own pid, never by name: ``stop`` (SIGTERM, then SIGKILL past the
    deadline) or ``kill``. It leads a process group of its own, so that ``kill`` ends
    the workers it started too.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
    ) -> None:
        self.log = log
        self.name = Path(argv[0]).name
        with log.open("ab") as out:
            super().__init__(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_listening(self, port: int, timeout: float = START_DEADLINE) -> None:
        """Return once ``port`` accepts connections; fail if the process exits first.

        uvicorn listens only after the application's start-up has completed, so for
        ``databroker serve`` this is "ready".
        """

        def listening() -> bool:
            if self.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.returncode} before listening on "
                    f"{port}:\n{self.tail()}"
                )
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
                return True
            return False

        wait_for(listening, timeout=timeout, interval=0.02)

    def stop(self, timeout: float = EXIT_DEADLINE, signalled: bool = False) -> int | None:
        """SIGTERM (unless ``signalled`` already), and the exit code; None if it had to be killed."""
        if not signalled and self.poll() is None:
            self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait(timeout=EXIT_DEADLINE)
            return None

    def kill(self) -> None:
        """SIGKILL to the process and its own children (``serve --workers N``'s, which
        would live on without their parent), then reaped: no drain, no last flush. By
        the group this process leads: its id is ours until it is reaped."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.wait(timeout=EXIT_DEADLINE)


# --- the broker's API --------------------------------------------------------------------


def broker_request(
    name: str,
    params: Mapping[str, Any] | None = None,
    run_id: uuid.UUID | str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The body of ``POST /internal/data-broker``; a new ``run_id`` unless given."""
    return {
        "data_source_name": name,
        "configured_params": params or {},
        "run_id": str(run_id or uuid.uuid4()),
        **extra,
    }


def counter(metrics: str, family: str) -> float:
    """Counter ``family`` (its name without ``_total``) in a ``/metrics`` answer, all labels summed."""
    for found in text_string_to_metric_families(metrics):
        if found.name == family:
            return sum(sample.value for sample in found.samples if sample.name.endswith("_total"))
    raise AssertionError(f"no {family}_total in /metrics")


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ok(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code != 200:
        request = answer.request
        raise RuntimeError(
            f"{request.method} {request.url.path} answered {answer.status_code}: {answer.text}"
        )
    body: dict[str, Any] = answer.json()
    return body


async def insert_source(
    engine: AsyncEngine,
    name: str,
    created_at: datetime,
    source: Mapping[str, Any] | None = None,
    runtime_params: Sequence[str] = (),
    retention_days: int | None = None,
) -> uuid.UUID:
    """A published source row written straight to its table, for tests of what reads the
    tables (export, prune) with no broker running; its id."""
    data_source_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            insert(data_source).values(
                data_source_id=data_source_id,
                name=name,
                source=dict(source or {"url": "http://127.0.0.1/"}),
                caching_enabled=False,
                runtime_params=list(runtime_params),
                variables=[],
                status="PUBLISHED",
                retention_days=retention_days,
                created_at=created_at,
                last_updated_at=created_at,
            )
        )
    return data_source_id


def source_row(**columns: Any) -> Any:
    """A ``data_source`` row as the store reads one, read by attribute, for tests that build
    a Source without a database: every column (by key: ``meta``), None unless given."""
    keys = [column.key for column in data_source.c]
    unknown = columns.keys() - set(keys)
    assert not unknown, f"not columns of data_source: {sorted(unknown)}"
    return namedtuple("SourceRow", keys)(**{key: columns.get(key) for key in keys})


async def insert_objects(
    engine: AsyncEngine,
    data_source_id: uuid.UUID,
    objects: Sequence[tuple[Mapping[str, Any], bytes, datetime]],
) -> list[uuid.UUID]:
    """DataObjects written straight to their table, each ``(params, value, created_at)``
    under the key the broker would give ``params``; their ids, in order."""
    ids = [uuid.uuid4() for _ in objects]
    async with engine.begin() as conn:
        await conn.execute(
            insert(data_object),
            [
                {
                    "data_object_id": object_id,
                    "data_source_id": data_source_id,
                    "key": make_cache_key(data_source_id, dict(params)),
                    "value": value,
                    "created_at": at,
                }
                for object_id, (params, value, at) in zip(ids, objects, strict=True)
            ],
        )
    return ids


async def register(
    client: httpx.AsyncClient,
    spec: Mapping[str, Any],
    variables: Mapping[str, Any] | None = None,
    publish: bool = True,
    token: str = ADMIN_TOKEN,
) -> dict[str, Any]:
    """Create a source through ``client``'s broker (set its variables, publish it); the source.

    Any answer but 200 raises, with the broker's answer in the message. Later calls name
    the source's project: admin routes see only their project's sources.
    """
    headers = admin_headers(token)
    source = _ok(await client.post("/data-sources", json=dict(spec), headers=headers))
    sid = source["data_source_id"]
    path = f"/data-sources/{sid}"
    project = {} if source["project_id"] is None else {"project_id": source["project_id"]}
    if variables:
        items = [{"name": k, "value": v} for k, v in variables.items()]
        answer = await client.put(f"{path}/variables", json=items, headers=headers, params=project)
        _ok(answer)
    if publish:
        source = _ok(await client.post(f"{path}/publish", headers=headers, params=project))
    return source
