"""The daily rollup of the audit table: how audit rows are folded into it, and how it is read.

Analytics over ``run_data_request`` itself cost a scan of every row in the window
(seconds at 10M rows, see the README's analytics bench), so the writer folds each
batch into ``run_data_request_daily`` in the transaction that inserts it: one
counter per source, UTC day, metric and label. A window then costs a few rows
per source and day, however many requests it saw.

Only rows the insert actually wrote are folded (Postgres: the rows its
``RETURNING`` gives back; SQLite: the ids not present before), so a segment
replayed after a crash counts nothing twice, as the audit insert writes nothing
twice. Rows removed later (retention, erasure) stay counted: the rollup is the
history of what was served.

Latency percentiles come from counts per latency bucket
(``proxy.analytics.BOUNDS``, ten a decade): a percentile is exact to within its
bucket's width (at most 25 % of its value above 2 ms), interpolated inside it.
"""

from __future__ import annotations

import uuid
from datetime import date
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.analytics import (
    BOUNDS,
    ERRORS,
    HITS,
    LATENCY,
    MISSES,
    OVERFLOW,
    REPLAYS,
    REQUESTS,
    SPEND,
    UPSTREAM,
    UPSTREAM_ERRORS,
    Counter,
    bucket_label,
)
from proxy.tables import DataSource, RunDataRequestDaily

_TABLE = RunDataRequestDaily.__tablename__
_COLUMNS = "data_source_id, day, metric, label, n, total"
_UPSERT = f"""
ON CONFLICT (data_source_id, day, metric, label) DO UPDATE
SET n = {_TABLE}.n + excluded.n, total = {_TABLE}.total + excluded.total
"""
_DAY = {
    "postgresql": "(r.created_at AT TIME ZONE 'UTC')::date",
    # SQLite stores a timestamp as UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff'.
    "sqlite": "substr(r.created_at, 1, 10)",
}
_CODE = {
    # Read from the text, not with ->>: json's operators refuse a value holding \u0000
    # anywhere, and an error may quote request-supplied text. Codes are [A-Z_]; the
    # error's own "code" comes first in its JSON (BrokerError.to_dict).
    "postgresql": 'substring(r.error::text from \'"code"\\s*:\\s*"([A-Za-z0-9_]*)"\')',
    "sqlite": "json_extract(r.error, '$.code')",
}
# Upstream calls, a hybrid replay's fresh call included (a stored answer has no timings).
_TIMED = "r.start_time IS NOT NULL AND r.end_time IS NOT NULL"
_MS = "(r.end_time - r.start_time) * 1000"


def _bucket() -> str:
    whens = " ".join(f"WHEN {_MS} <= {b!r} THEN '{bucket_label(b)}'" for b in BOUNDS)
    return f"CASE {whens} ELSE '{OVERFLOW}' END"


def fold(dialect: str, rows: str) -> str:
    """SQL adding the audit rows of the relation named ``rows`` to the rollup.

    ``rows`` is a table or a CTE the caller puts before this statement. Each branch
    makes distinct (source, day, metric, label) keys, as one upsert may touch a row
    only once; they are taken in key order so that concurrent writers lock in the
    same order.
    """
    branches = (
        (REQUESTS, "''", "0", "TRUE"),
        (HITS, "''", "0", "r.data_origin = 'CACHE' AND r.replay IS NULL"),
        (MISSES, "''", "0", "r.data_origin = 'REQUEST'"),
        (REPLAYS, "r.replay", "0", "r.replay IS NOT NULL"),
        (UPSTREAM, "''", f"sum({_MS})", _TIMED),
        (UPSTREAM_ERRORS, "''", "0", f"{_TIMED} AND r.error IS NOT NULL"),
        (LATENCY, _bucket(), "0", _TIMED),
        (ERRORS, f"coalesce({_CODE[dialect]}, '')", "0", "r.error IS NOT NULL"),
        (
            SPEND,
            "coalesce(r.cost_currency, '')",
            "sum(r.cost_amount)",
            "r.cost_amount IS NOT NULL",
        ),
    )
    union = "\nUNION ALL\n".join(
        f"SELECT r.data_source_id, {_DAY[dialect]} AS day, '{metric}' AS metric, {label} AS label,"
        f" count(*) AS n, CAST({total} AS NUMERIC) AS total FROM {rows} AS r WHERE {where}"
        " GROUP BY 1, 2, 4"
        for metric, label, total, where in branches
    )
    return (
        f"INSERT INTO {_TABLE} ({_COLUMNS})\n"
        f"SELECT {_COLUMNS} FROM ({union}) AS folded WHERE TRUE ORDER BY 1, 2, 3, 4\n{_UPSERT}"
    )


def rebuild(dialect: str) -> str:
    """SQL making the rollup again from the whole audit table (an empty rollup first)."""
    return fold(dialect, "run_data_request")


async def read_source(
    conn: AsyncConnection, data_source_id: uuid.UUID, start: date, end: date
) -> list[Counter]:
    """A source's counters of the days ``start`` to ``end``, both included."""
    t = RunDataRequestDaily
    query = select(t.data_source_id, t.day, t.metric, t.label, t.n, t.total).where(
        t.data_source_id == data_source_id, t.day >= start, t.day <= end
    )
    return [
        Counter(sid, day, metric, label, int(n), Decimal(total))
        for sid, day, metric, label, n, total in await conn.execute(query)
    ]


async def read_project(
    conn: AsyncConnection, project_id: uuid.UUID | None, start: date, end: date
) -> list[Counter]:
    """The counters of the project's sources (archived ones included: they served) over the
    days ``start`` to ``end``, summed over the days (``day`` is ``start`` in every one)."""
    t, s = RunDataRequestDaily, DataSource
    in_project = s.project_id.is_(None) if project_id is None else s.project_id == project_id
    query = (
        select(t.data_source_id, t.metric, t.label, func.sum(t.n), func.sum(t.total))
        .join(s, s.data_source_id == t.data_source_id)
        .where(t.day >= start, t.day <= end, in_project)
        .group_by(t.data_source_id, t.metric, t.label)
    )
    return [
        Counter(sid, start, metric, label, int(n), Decimal(total))
        for sid, metric, label, n, total in await conn.execute(query)
    ]
