"""Start-up that ends: ``databroker`` refusing in one line, within a deadline.

Every refusal — a bad or half setting, a database or Redis that is away or
silent, an unmigrated database, a taken port, a failure once the background
tasks run — ends the command with a non-zero exit and one line that says why,
never a traceback; SIGTERM during start-up ends it at once. Refusals decided
before uvicorn starts run the command in this process (click's runner: the
same code, without a second of imports per case); what involves uvicorn,
workers or signals runs the real ``databroker serve``. The deadlines only prove
that nothing hangs (asyncpg alone waits 60 s to connect, for ever on a statement).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from proxy.cli import main
from tests.conftest import REDIS_URL
from tests.harness import DATABROKER, create_database, free_port, sidecar_env, wait_for
from tests.instances import PostgresInstance, databroker, log_of
from tests.tcp import HangingProxy, silent_server

# Imports, a connect timeout of 1 s and redis-py's retries, on a loaded 2-core machine.
DEADLINE = 45.0
KEY = Fernet.generate_key().decode()
SERVE = ["serve", "--port", "0"]
# uvicorn's progress notes, and the line it adds after the application's own reason.
NOTES = ("INFO:", "ERROR:    Application startup failed. Exiting.")


def invoke(args: list[str], **settings: str) -> tuple[int, list[str]]:
    """The command in this process with exactly these DATABROKER_* settings: its exit code
    and the lines it wrote.

    In a thread, so that a command that starts serving instead of refusing fails the test
    at the deadline rather than holding it (it is left running: the test already failed).
    """
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DATABROKER_")}
    env.update({f"DATABROKER_{k.upper()}": v for k, v in settings.items()})
    results: list[Result] = []
    thread = threading.Thread(
        target=lambda: results.append(CliRunner().invoke(main, args, env=env)), daemon=True
    )
    thread.start()
    thread.join(DEADLINE)
    assert results, f"databroker {args[0]} still running after {DEADLINE}s"
    return results[0].exit_code, results[0].output.splitlines()


def run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, list[str]]:
    """The real command to its end (the test fails at the deadline): its exit code and the
    lines it wrote as text (what a terminal shows), less uvicorn's notes."""
    try:
        done = subprocess.run(
            [str(DATABROKER), *args],
            env={**env, "DATABROKER_LOG_FORMAT": "text"},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"databroker {args[0]} still running after {DEADLINE}s") from exc
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if line.strip() and not line.startswith(NOTES)]


def refused(code: int, lines: list[str], expected_code: int, *words: str) -> str:
    """One line, every word in it, the expected exit code."""
    assert code == expected_code, lines
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines
    return lines[0]


def production(database_url: str, redis_url: str = REDIS_URL, **more: str) -> dict[str, str]:
    return {"database_url": database_url, "redis_url": redis_url, "secret_key": KEY, **more}


def unreachable_pg() -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"


# --- settings: exit 2, naming the variable -----------------------------------------------


@pytest.mark.parametrize(
    ("command", "settings", "variable"),
    [
        (SERVE, {"database_url": "postgres://u:pw-canary@h/db"}, "DATABROKER_DATABASE_URL"),
        (SERVE, {"database_url": "notaurl"}, "DATABROKER_DATABASE_URL"),
        (
            SERVE,
            {"database_url": "postgresql+asyncpg://u:pw-canary@h:port/db"},
            "DATABROKER_DATABASE_URL",
        ),
        (
            SERVE,
            {"database_url": "postgresql+asyncpg://u:pw-canary@[::1/db"},
            "DATABROKER_DATABASE_URL",
        ),
        (SERVE, {"redis_url": "redis://u:pw-canary@h:port/0"}, "DATABROKER_REDIS_URL"),
        (SERVE, {"redis_url": "redis+cluster://u:pw-canary@h"}, "DATABROKER_REDIS_URL"),
        (SERVE, {"secret_key": "pw-canary"}, "DATABROKER_SECRET_KEY"),
        (SERVE, {"egress_deny": "10.0.0.1/8"}, "DATABROKER_EGRESS_DENY"),
        (["migrate"], {"database_url": "postgres://u:pw-canary@h/db"}, "DATABROKER_DATABASE_URL"),
        (["migrate"], {"database_url": "notaurl"}, "DATABROKER_DATABASE_URL"),
        (["rotate-secrets"], {"secret_key": "pw-canary"}, "DATABROKER_SECRET_KEY"),
        (["rotate-secrets"], {"database_url": "notaurl"}, "DATABROKER_DATABASE_URL"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    command: list[str], settings: dict[str, str], variable: str
) -> None:
    line = refused(*invoke(command, **settings), 2, f"invalid setting {variable}")
    assert "pw-canary" not in line


@pytest.mark.parametrize(
    ("given", "missing"),
    [("database_url", "DATABROKER_REDIS_URL"), ("redis_url", "DATABROKER_DATABASE_URL")],
)
def test_half_a_production_configuration_is_refused_naming_what_is_missing(
    tmp_path: Path, pg_url: str, given: str, missing: str
) -> None:
    """Not completed with the embedded default: on the in-process Redis this sidecar would
    cache alone, where no other sidecar and no redis-cli flush can reach."""
    value = {"database_url": pg_url, "redis_url": REDIS_URL}[given]
    settings = {given: value, "secret_key": KEY, "data_dir": str(tmp_path / "data")}
    refused(*invoke(SERVE, **settings), 2, f"{missing} is not set")
    assert not (tmp_path / "data").exists()


# --- services checked before uvicorn: exit 1 ---------------------------------------------


@pytest.mark.parametrize("command", [SERVE, ["migrate"], ["rotate-secrets"]])
def test_an_unreachable_database_is_one_line(command: list[str]) -> None:
    code, lines = invoke(command, **production(unreachable_pg()))
    refused(code, lines, 1, "cannot reach the database of DATABROKER_DATABASE_URL")


@pytest.mark.parametrize("command", [SERVE, ["migrate"], ["rotate-secrets"]])
def test_a_database_that_never_answers_is_one_line(command: list[str]) -> None:
    with silent_server() as port:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x"
        code, lines = invoke(command, **production(url, database_connect_timeout="1"))
    refused(code, lines, 1, "did not answer in time")


@pytest.mark.parametrize("command", [SERVE, ["rotate-secrets"]])
def test_an_unmigrated_database_says_to_migrate(
    private_pg: PostgresInstance, command: list[str]
) -> None:
    empty = asyncio.run(create_database(private_pg.url()))
    refused(*invoke(command, **production(empty)), 1, "run `databroker migrate`")


def test_a_missing_secret_key_is_one_line(pg_url: str) -> None:
    code, lines = invoke(SERVE, database_url=pg_url, redis_url=REDIS_URL)
    refused(code, lines, 1, "DATABROKER_SECRET_KEY is required")


def test_redis_that_never_answers_is_one_line(pg_url: str) -> None:
    with silent_server() as port:
        code, lines = invoke(SERVE, **production(pg_url, f"redis://127.0.0.1:{port}/0"))
    refused(code, lines, 1, "Redis at DATABROKER_REDIS_URL does not answer")


# --- the real ``databroker serve`` --------------------------------------------------------


@pytest.mark.slow
def test_serve_with_the_database_away_ends_in_one_line(tmp_path: Path) -> None:
    """The defect's own case: it used to hang at "Waiting for application startup"."""
    env = sidecar_env(unreachable_pg(), REDIS_URL, tmp_path / "outbox")
    refused(*run(SERVE, env, tmp_path), 1, "cannot reach the database")


@pytest.mark.slow
def test_serve_with_redis_away_ends_in_one_line(tmp_path: Path, pg_url: str) -> None:
    env = sidecar_env(pg_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "outbox")
    refused(*run(SERVE, env, tmp_path), 1, "Redis at DATABROKER_REDIS_URL does not answer")


@pytest.mark.slow
def test_a_taken_port_is_one_line_before_anything_starts(tmp_path: Path, pg_url: str) -> None:
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox")
    with silent_server() as port:
        refused(*run(["serve", "--port", str(port)], env, tmp_path), 1, "cannot listen on")
    assert not (tmp_path / "outbox").exists()


@pytest.mark.slow
def test_a_failure_once_background_tasks_run_still_ends_the_process(
    tmp_path: Path, pg_url: str
) -> None:
    """The outbox cannot open (its directory is a file) once the invalidation link runs:
    start-up unwinds, cancelling a task that can swallow one cancel, and the process ends."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    env = sidecar_env(pg_url, REDIS_URL, blocked)
    refused(*run(SERVE, env, tmp_path), 3, "ERROR:    start-up failed: ", "not-a-directory")


def proxied(url: str, port: int) -> str:
    return make_url(url).set(port=port).render_as_string(hide_password=False)


@pytest.mark.slow
def test_a_database_that_hangs_after_the_check_fails_start_up_in_time(
    tmp_path: Path, pg_url: str
) -> None:
    """``serve`` checks the database, then the application connects again: this time the
    proxy answers nothing, and start-up gives up after the connect timeout."""
    target = make_url(pg_url)
    with HangingProxy(target.host or "127.0.0.1", target.port or 5432, forward=1) as proxy:
        url = proxied(pg_url, proxy.port)
        env = sidecar_env(url, REDIS_URL, tmp_path / "outbox", database_connect_timeout="1")
        code, lines = run(SERVE, env, tmp_path)
    refused(code, lines, 3, "ERROR:    the database of DATABROKER_DATABASE_URL did not answer")


@pytest.mark.slow
def test_sigterm_during_start_up_ends_the_process(tmp_path: Path, pg_url: str) -> None:
    """uvicorn reads its exit flag only once start-up is over: here start-up waits on a
    database for two minutes, and SIGTERM still ends it at once."""
    target = make_url(pg_url)
    with HangingProxy(target.host or "127.0.0.1", target.port or 5432, forward=1) as proxy:
        url = proxied(pg_url, proxy.port)
        env = sidecar_env(url, REDIS_URL, tmp_path / "outbox", database_connect_timeout="120")
        with databroker(SERVE, env, tmp_path) as process:
            wait_for(lambda: "Waiting for application startup" in log_of(tmp_path), DEADLINE)
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"SIGTERM ignored:\n{log_of(tmp_path)}") from None
    assert code == 128 + signal.SIGTERM, log_of(tmp_path)
    assert "databroker: stopped by SIGTERM during start-up" in log_of(tmp_path)
