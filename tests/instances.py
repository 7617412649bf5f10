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
- ``sidecar(env, cwd)``: ``databroker serve`` on a free port, started, with a
  client (``tests.harness.sidecar_env`` builds its environment from scratch).

Ports, waits, processes, environments and source registration are
``tests/harness.py``'s, shared with the benchmark.

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
import subprocess
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

from tests.harness import (
    BROKER_PATH,
    DATABROKER,
    EXIT_DEADLINE,
    LOOPBACK,
    START_DEADLINE,
    Child,
    async_wait_for,
    broker_request,
    clean_env,
    create_database,
    free_port,
    wait_for,
)

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
        self.process: Child | None = None

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
        self.process = process = Child(
            [
                "redis-server", "--port", str(self.port), "--bind", LOOPBACK,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.root), *self.args,
            ],
            os.environ,
            self.log,
        )  # fmt: skip

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{process.output()}")
            try:
                with self.client() as client:
                    return bool(client.ping())
            except sync_redis.RedisError:
                return False

        wait_for(answers, timeout=START_DEADLINE, interval=0.02)

    def stop(self) -> None:
        """SIGTERM: the server closes its clients."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        """SIGKILL: as a crash."""
        if self.process is not None:
            self.process.kill()
            self.process = None


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


@contextmanager
def databroker(
    args: list[str], env: dict[str, str], cwd: Path, log_name: str = "databroker.log"
) -> Iterator[Child]:
    """Run the console script; its output goes to ``cwd/log_name``; always killed."""
    process = Child([str(DATABROKER), *args], env, cwd / log_name, cwd)
    try:
        yield process
    finally:
        process.kill()


def log_of(cwd: Path, log_name: str = "databroker.log") -> str:
    return (cwd / log_name).read_text(errors="replace")


@dataclass
class Sidecar:
    """A running ``databroker serve`` and a client for it."""

    process: Child
    port: int
    client: httpx.AsyncClient

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.process.output()

    async def call(
        self, name: str, params: dict[str, Any], run_id: uuid.UUID | None = None
    ) -> httpx.Response:
        return await self.client.post(BROKER_PATH, json=broker_request(name, params, run_id))

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        answer = await self.client.get("/readyz")
        return answer.status_code, answer.json()

    def kill(self) -> None:
        """SIGKILL: no drain, no last flush — what the outbox holds is all that survives."""
        self.process.kill()


@asynccontextmanager
async def sidecar(
    env: dict[str, str],
    cwd: Path,
    port: int | None = None,
    log_name: str | None = None,
    workers: int = 1,
    **limits: Any,
) -> AsyncIterator[Sidecar]:
    """``databroker serve`` on ``port`` (a free one by default), started, with a client.

    ``limits`` go to the client's ``httpx.Limits`` (to send many requests at once;
    ``max_keepalive_connections=0`` for a new connection a request, so that each may
    reach any of several ``workers``).
    """
    port = port or free_port()
    log_name = log_name or f"sidecar-{port}.log"
    argv = ["serve", "--port", str(port)]
    deadline = START_DEADLINE
    if workers > 1:
        argv += ["--workers", str(workers)]
        # Workers importing at once on a loaded machine: more than the usual deadline.
        deadline = 4 * START_DEADLINE
    with databroker(argv, env, cwd, log_name) as process:
        await asyncio.to_thread(process.wait_listening, port, deadline)
        if workers > 1:
            # The parent listens before it spawns the workers; each starts up on its own,
            # and one may still be importing when the other serves. Until then its metrics
            # files hold what its import set (live gauges at 0) and nothing it served.
            started = "Application startup complete"
            await async_wait_for(
                lambda: process.output().count(started) >= workers, deadline, interval=0.1
            )
        async with httpx.AsyncClient(
            base_url=f"http://{LOOPBACK}:{port}",
            timeout=deadline,
            limits=httpx.Limits(**limits) if limits else httpx.Limits(),
        ) as client:
            yield Sidecar(process, port, client)


@asynccontextmanager
async def serving(
    env: dict[str, str], cwd: Path, **limits: Any
) -> AsyncIterator[tuple[Child, httpx.AsyncClient]]:
    """``sidecar`` logging to ``cwd/databroker.log`` (what ``log_of(cwd)`` reads)."""
    async with sidecar(env, cwd, log_name="databroker.log", **limits) as running:
        yield running.process, running.client


def terminate(process: Child, *, signalled: bool = False) -> None:
    """SIGTERM (unless already sent), then a clean exit within the deadline."""
    code = process.stop(signalled=signalled)
    assert code is not None, f"databroker did not exit after SIGTERM:\n{process.output()}"
    assert code == 0, f"exit code {code}:\n{process.output()}"


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
        url = asyncio.run(create_database(instance.url(), MIGRATED_TEMPLATE))
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
    return asyncio.run(create_database(private_pg.url(), template=MIGRATED_TEMPLATE))


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
