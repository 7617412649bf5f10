"""``databroker``: serve, migrate, bench. Validates settings, then forwards to uvicorn, Alembic or proxy.bench."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
import uvicorn
from pydantic import ValidationError

from proxy.database import create_engine, migrate
from proxy.settings import Settings


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
    uvicorn.run(
        "proxy.app:create_app",
        factory=True,
        host=host,
        port=port,
        uds=str(uds) if uds else None,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )


def _exit_after_drain(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


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
