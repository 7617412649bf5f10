"""``databroker``: serve, migrate, rotate-secrets. Validates settings, then forwards to uvicorn, Alembic or the source store."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

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
def main() -> None:
    """A Redis-cached data broker sidecar for decision engines."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--uds", type=click.Path(path_type=Path), help="Listen on a Unix socket instead.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
def serve(host: str, port: int, uds: Path | None, workers: int) -> None:
    """Run the broker."""
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
    listener = _private_socket(uds) if uds else None
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


def _private_socket(path: Path) -> socket.socket:
    """A Unix socket bound at ``path`` that only this user can connect to (mode 0600).

    uvicorn's own ``uds=`` binds, then chmods the socket to 0o666: any local user could
    call the broker. Bound here under umask 0o177 instead, the file is 0600 from the
    moment it exists: there is no window between bind and chmod in which another user
    could connect. uvicorn then serves this socket (``fd=``). The umask is process-wide,
    but nothing else runs yet that could create a file under it.
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
