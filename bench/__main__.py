"""``python -m bench``: the options, then ``bench.run``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bench.run import Options, run
from tests.harness import POSTGRES_SERVER, REDIS_SERVER


@click.command()
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
    default=POSTGRES_SERVER,
    show_default=True,
    help="Admin connection that creates and drops the bench database.",
)
@click.option(
    "--redis",
    default=REDIS_SERVER,
    show_default=True,
    help="Redis; the bench uses a private key prefix and removes it.",
)
@click.option("--writer-records", default=200_000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--invalidation-rounds",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Writes made elsewhere, each timed until the broker's next read sees it.",
)
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
@click.option(
    "--analytics-rows",
    default=10_000_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Audit rows the analytics case loads with COPY (0: skip it; also `python -m bench.analytics`).",
)
def main(**options: Any) -> None:
    """Measure hits, misses, invalidation and the outbox writer against their targets (needs wrk)."""
    sys.exit(run(Options(**options)))


if __name__ == "__main__":
    main()
