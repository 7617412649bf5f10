"""Private service instances for fault tests, and the real ``databroker`` CLI in a subprocess.

Fault tests stop, kill and restart their neighbours, so they never touch the
machine's shared PostgreSQL and Redis: each instance here runs on a free port
of its own, in a temporary directory of its own, and is torn down in
``finally``. Slow to start → session-scoped (PostgreSQL, about a second for
``initdb``); fast → per test (Redis, a Redis Cluster).

- ``PostgresInstance``: ``initdb`` + ``pg_ctl`` (as the ``postgres`` OS user when
  the suite runs as root: PostgreSQL refuses to run as root); ``stop(mode)``
  and ``start()`` keep the port and the data directory, so clients reconnect
  to the same address.
- ``RedisInstance``: ``redis-server --port N`` as a child process;
  ``stop()``/``kill()`` and ``start()`` on the same port.
- ``RedisCluster``: three (or more) ``RedisInstance`` nodes in cluster mode,
  joined with ``redis-cli --cluster create``; a node restarted on its port
  rejoins from its ``nodes.conf``.
- ``sidecar(env, cwd)``: ``databroker serve`` on a free port, healthy, with a
  client; ``sidecar_env`` builds its environment from scratch.

Fixtures (registered from ``tests/conftest.py``): ``postgres_instance``
(session), ``private_pg`` (the same instance, guaranteed running before and
after the test), ``private_pg_url`` (a fresh database on it: a copy of one
migrated by ``databroker migrate``), ``private_redis``, ``redis_cluster``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.conftest import ADMIN_TOKEN
from tests.servers import async_wait_for, free_port, wait_for

DATABROKER = Path(sys.executable).with_name("databroker")
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EXIT_DEADLINE = 60.0
START_DEADLINE = 30.0
PG_OWNER = "postgres"


# --- PostgreSQL --------------------------------------------------------------------------


def _as_owner(command: Sequence[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` OS user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_OWNER, "--", *command]
    return list(command)


class PostgresInstance:
    """A private PostgreSQL cluster: its own data directory, port and socket directory."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "postgres.log"

    @classmethod
    def create(cls) -> PostgresInstance:
        """``initdb`` a fresh cluster in a temporary directory (not started yet)."""
        root = Path(tempfile.mkdtemp(prefix="databroker-pg-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_OWNER)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        instance = cls(root, free_port())
        instance._run(
            "initdb", "-D", str(instance.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"
        )
        return instance

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            _as_owner(command),
            cwd=self.root,
            capture_output=True,
            timeout=START_DEADLINE * 2,
            check=False,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}: "
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}{log}"
            )

    def start(self) -> None:
        """Start on the instance's port (the same one after a stop); returns once it accepts."""
        # fsync=off: the machine does not crash in a test, the server does. Commits stay
        # synchronous, so a commit the broker saw survives ``stop("immediate")``.
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(int(START_DEADLINE)), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (sessions ended cleanly) or ``immediate`` (like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        status = subprocess.run(
            _as_owner(["pg_ctl", "-D", str(self.data), "status"]),
            cwd=self.root,
            capture_output=True,
            check=False,
        )
        return status.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new database, empty or a copy of ``template``; returns its SQLAlchemy URL."""
        name = name or f"databroker_{uuid.uuid4().hex[:12]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        engine = create_async_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
        finally:
            await engine.dispose()
        return self.url(name)

    def destroy(self) -> None:
        """Stop (as a crash would: nothing to keep) and remove every file."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def migrate_database(url: str, cwd: Path) -> None:
    """``databroker migrate`` against ``url``, as an operator would run it."""
    done = subprocess.run(
        [str(DATABROKER), "migrate"],
        env=clean_env(database_url=url),
        cwd=cwd,
        capture_output=True,
        timeout=EXIT_DEADLINE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"databroker migrate failed:\n{done.stderr.decode(errors='replace')}")


# --- Redis -------------------------------------------------------------------------------


class RedisInstance:
    """A private ``redis-server`` child process; no persistence."""

    def __init__(self, root: Path, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.root = root
        self.port = port or free_port()
        self.args = list(args)
        self.log = root / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--dir", str(self.root), *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        process = self.process

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log.read_text(errors='replace')}")
            try:
                with self.client() as client:
                    return bool(client.ping())
            except sync_redis.RedisError:
                return False

        wait_for(answers, timeout=START_DEADLINE, interval=0.02)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM: it closes its clients; SIGKILL: as a crash)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=EXIT_DEADLINE)
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _cluster_args() -> list[str]:
    # The bus port is given explicitly: the default (port + 10000) may be taken, or past 65535.
    return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())]  # fmt: skip


class RedisCluster:
    """A local Redis Cluster of masters only (no replicas), every slot covered."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes = [RedisInstance(root / f"node-{i}", args=_cluster_args()) for i in range(size)]

    @property
    def url(self) -> str:
        """Any node's URL: a cluster client discovers the others from it."""
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True,
            timeout=EXIT_DEADLINE,
            check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout.decode()}")
        wait_for(self.healthy, timeout=START_DEADLINE, interval=0.05)

    def healthy(self) -> bool:
        """Every node answers and sees every slot served."""
        for node in self.nodes:
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
            except sync_redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


# --- the databroker CLI ------------------------------------------------------------------


def clean_env(**databroker: str) -> dict[str, str]:
    """The test's environment without any DATABROKER_* variable, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABROKER_")}
    env.update({f"DATABROKER_{k.upper()}": v for k, v in databroker.items()})
    return env


def sidecar_env(database_url: str, redis_url: str, outbox_dir: Path, **more: str) -> dict[str, str]:
    """A production-shaped sidecar environment (Postgres, Redis, admin token, secret key)."""
    return clean_env(
        database_url=database_url,
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,
        secret_key=Fernet.generate_key().decode(),
        outbox_dir=str(outbox_dir),
        **more,
    )


@contextmanager
def databroker(
    args: list[str], env: dict[str, str], cwd: Path, log_name: str = "databroker.log"
) -> Iterator[subprocess.Popen[bytes]]:
    """Run the console script; its output goes to ``cwd/log_name``; always killed."""
    with (cwd / log_name).open("wb") as log:
        process = subprocess.Popen(
            [str(DATABROKER), *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            process.kill()
            process.wait(timeout=EXIT_DEADLINE)


def log_of(cwd: Path, log_name: str = "databroker.log") -> str:
    return (cwd / log_name).read_text(errors="replace")


@dataclass
class Sidecar:
    """A running ``databroker serve`` and a client for it."""

    process: subprocess.Popen[bytes]
    port: int
    cwd: Path
    log_name: str
    client: httpx.AsyncClient

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return log_of(self.cwd, self.log_name)

    async def call(
        self, name: str, params: dict[str, Any], run_id: uuid.UUID | None = None
    ) -> httpx.Response:
        body = {
            "data_source_name": name,
            "configured_params": params,
            "run_id": str(run_id or uuid.uuid4()),
        }
        return await self.client.post("/internal/data-broker", json=body)

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        answer = await self.client.get("/readyz")
        return answer.status_code, answer.json()

    def kill(self) -> None:
        """SIGKILL: no drain, no last flush — what the outbox holds is all that survives."""
        self.process.kill()
        self.process.wait(timeout=EXIT_DEADLINE)


@asynccontextmanager
async def sidecar(
    env: dict[str, str],
    cwd: Path,
    port: int | None = None,
    log_name: str | None = None,
    **limits: Any,
) -> AsyncIterator[Sidecar]:
    """``databroker serve`` on ``port`` (a free one by default), healthy, with a client.

    ``limits`` go to the client's ``httpx.Limits`` (to send many requests at once).
    """
    port = port or free_port()
    log_name = log_name or f"sidecar-{port}.log"
    with databroker(["serve", "--port", str(port)], env, cwd, log_name) as process:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            limits=httpx.Limits(**limits) if limits else httpx.Limits(),
        ) as client:

            async def healthy() -> bool:
                assert process.poll() is None, f"databroker exited early:\n{log_of(cwd, log_name)}"
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await async_wait_for(healthy, timeout=START_DEADLINE)
            yield Sidecar(process, port, cwd, log_name, client)


@asynccontextmanager
async def serving(
    env: dict[str, str], cwd: Path, **limits: Any
) -> AsyncIterator[tuple[subprocess.Popen[bytes], httpx.AsyncClient]]:
    """``sidecar`` logging to ``cwd/databroker.log`` (what ``log_of(cwd)`` reads)."""
    async with sidecar(env, cwd, log_name="databroker.log", **limits) as running:
        yield running.process, running.client


async def publish(client: httpx.AsyncClient, spec: dict[str, Any]) -> str:
    """Create and publish a source through the admin API; returns its id."""
    created = await client.post("/data-sources", json=spec, headers=ADMIN)
    assert created.status_code == 200, created.text
    sid: str = created.json()["data_source_id"]
    published = await client.post(f"/data-sources/{sid}/publish", headers=ADMIN)
    assert published.status_code == 200, published.text
    return sid


def terminate(process: subprocess.Popen[bytes], cwd: Path, signalled: bool = False) -> None:
    """SIGTERM (unless already sent), then a clean exit within the deadline."""
    if not signalled:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"databroker did not exit after SIGTERM:\n{log_of(cwd)}") from None
    assert code == 0, f"exit code {code}:\n{log_of(cwd)}"


# --- fixtures ----------------------------------------------------------------------------


MIGRATED_TEMPLATE = "databroker_migrated"


@pytest.fixture(scope="session")
def postgres_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """One private PostgreSQL for the session (``initdb`` is the slow part).

    It holds a database migrated once by ``databroker migrate``, the template of
    every ``private_pg_url``: a copy takes milliseconds, the CLI seconds.
    """
    instance = PostgresInstance.create()
    try:
        instance.start()
        url = asyncio.run(instance.create_database(MIGRATED_TEMPLATE))
        migrate_database(url, tmp_path_factory.mktemp("migrate"))
        yield instance
    finally:
        instance.destroy()


@pytest.fixture
def private_pg(postgres_instance: PostgresInstance) -> Iterator[PostgresInstance]:
    """The private PostgreSQL, running; a test that stops it leaves it running for the next."""
    if not postgres_instance.running:
        postgres_instance.start()
    try:
        yield postgres_instance
    finally:
        if not postgres_instance.running:
            postgres_instance.start()


@pytest.fixture
def private_pg_url(private_pg: PostgresInstance) -> str:
    """A fresh database on the private PostgreSQL, migrated (by ``databroker migrate``)."""
    return asyncio.run(private_pg.create_database(template=MIGRATED_TEMPLATE))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisInstance]:
    instance = RedisInstance(tmp_path / "redis")
    try:
        instance.start()
        yield instance
    finally:
        instance.kill()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
