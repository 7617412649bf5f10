"""``databroker``: serve, migrate, rotate-secrets, bench. Validates settings, then forwards to uvicorn, Alembic, the source store or proxy.bench."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
import uvicorn
from pydantic import ValidationError

from proxy.database import create_engine, migrate
from proxy.secrets import SecretKeyError, load_secret_box
from proxy.settings import Settings
from proxy.source_store import SourceStore


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors(include_input=False):
            name = "DATABROKER_" + str(error["loc"][0]).upper() if error["loc"] else "settings"
            click.echo(f"invalid setting {name}: {error['msg']}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="databroker", message="%(prog)s %(version)s")
def main() -> None:
    """A Redis-cached data broker sidecar for decision engines."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _socket_mode(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """Octal permission bits of the Unix socket: the owner reads and writes, others never
    (connecting takes write permission, so 0660 is what lets a group in)."""
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o770 or mode & 0o607 != 0o600:
        raise click.BadParameter(
            f"{value!r} is not 0600, 0660 or another octal mode with owner read-write"
            " and no access for others"
        )
    return mode


def _socket_group(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """A group name or numeric id, resolved to the id."""
    if value is None or value.isdigit():
        return None if value is None else int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group named {value!r}") from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--uds", type=click.Path(path_type=Path), help="Listen on a Unix socket instead.")
@click.option(
    "--uds-mode",
    default="0600",
    show_default=True,
    metavar="MODE",
    callback=_socket_mode,
    help="Permissions of the --uds socket; 0660 lets its group connect.",
)
@click.option(
    "--uds-group",
    metavar="GROUP",
    callback=_socket_group,
    help="Group (name or id) of the --uds socket, e.g. a group the worker's container shares.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
def serve(
    host: str, port: int, uds: Path | None, uds_mode: int, uds_group: int | None, workers: int
) -> None:
    """Run the broker."""
    if uds is None and (uds_mode != 0o600 or uds_group is not None):
        raise click.UsageError("--uds-mode and --uds-group apply to --uds")
    settings = _settings()
    if workers > 1 and (settings.embedded or settings.redis_url is None):
        raise click.UsageError(
            "the embedded default (SQLite, in-process Redis) runs one worker; "
            "set DATABROKER_DATABASE_URL and DATABROKER_REDIS_URL for more"
        )
    # uvicorn handles SIGTERM gracefully (drain requests, run the lifespan shutdown, ship the
    # outbox), then restores the previous handler and re-raises the signal: with the default
    # one the process would die of it (exit -15). After a clean drain, exit 0 instead.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    listener = _unix_socket(uds, uds_mode, uds_group) if uds else None
    try:
        uvicorn.run(
            "proxy.app:create_app",
            factory=True,
            host=host,
            port=port,
            fd=listener.fileno() if listener else None,
            workers=workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace),
        )
    finally:
        if listener is not None and uds is not None:
            listener.close()
            uds.unlink(missing_ok=True)


def _exit_after_drain(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


def _unix_socket(path: Path, mode: int, group: int | None) -> socket.socket:
    """A Unix socket bound at ``path`` with ``mode`` and ``group``, never wider on the way.

    uvicorn's own ``uds=`` binds, then chmods the socket to 0o666: any local user could
    call the broker. Bound here under umask 0o177 instead, the file is 0600 from the
    moment it exists: there is no window between bind and chmod in which another user
    could connect. The group is set next and the mode widened last, so a group gains
    access only once it is the intended one. uvicorn then serves this socket (``fd=``).
    The umask is process-wide, but nothing else runs yet that could create a file under it.
    """
    if path.is_socket():
        path.unlink()  # left behind by a killed run; uvicorn and asyncio do the same
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise click.ClickException(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(umask)
    try:
        if group is not None:
            os.chown(path, -1, group)
        if mode != 0o600:
            path.chmod(mode)
    except OSError as exc:
        listener.close()
        path.unlink()
        raise click.ClickException(
            f"cannot set the group or mode of {path}: {exc.strerror}"
        ) from exc
    return listener


@main.command("migrate")
def migrate_command() -> None:
    """Apply the Alembic migrations to DATABROKER_DATABASE_URL."""
    settings = _settings()

    async def run() -> None:
        engine = create_engine(settings.resolved_database_url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    click.echo("database is at the latest migration")


@main.command("rotate-secrets")
def rotate_secrets_command() -> None:
    """Re-encrypt every stored variable with the newest key of DATABROKER_SECRET_KEY."""
    settings = _settings()

    async def run() -> int:
        engine = create_engine(settings.resolved_database_url)
        try:
            if settings.embedded:
                await migrate(engine)  # as serve does: the embedded database shapes itself
            return await SourceStore(engine, load_secret_box(settings)).rotate_secrets()
        finally:
            await engine.dispose()

    try:
        rotated = asyncio.run(run())
    except SecretKeyError as exc:
        click.echo(f"rotate-secrets: {exc}; nothing was changed", err=True)
        sys.exit(1)
    click.echo(f"rotated {rotated} stored variable values to the newest key")


@main.command("bench")
@click.option(
    "--duration",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds per wrk run.",
)
@click.option(
    "--rounds",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Alternating rounds; the table shows medians.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(1, 2),
    help="wrk threads (at most the concurrency).",
)
@click.option(
    "--out",
    default=Path("bench-results"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--postgres",
    default="postgresql://postgres@127.0.0.1:5432/postgres",
    show_default=True,
    help="Admin connection that creates and drops the bench database.",
)
@click.option(
    "--redis",
    default="redis://127.0.0.1:6379/0",
    show_default=True,
    help="Redis; the bench uses a private key prefix and removes it.",
)
@click.option("--writer-records", default=200_000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--memory", is_flag=True, help="Also drive mixed requests and report the broker's RSS."
)
@click.option(
    "--memory-requests", default=1_000_000, show_default=True, type=click.IntRange(min=10)
)
@click.option(
    "--profile", is_flag=True, help="Also run py-spy on the broker under hit load (c=16)."
)
@click.option(
    "--skip-load", is_flag=True, help="Skip the hits/misses table (with --memory or --profile)."
)
def bench_command(**options: Any) -> None:
    """Measure hits, misses and the outbox writer against their floors (needs wrk)."""
    from proxy import bench

    sys.exit(bench.run(bench.Options(**options)))
