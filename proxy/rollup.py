"""The daily rollup of the audit table: how audit rows are folded into it (``proxy.rollup_reads``
reads it).

Analytics over ``run_data_request`` itself cost a scan of every row in the window
(seconds at 10M rows, see the README's analytics bench), so the writer folds each
batch into ``run_data_request_daily`` in the transaction that inserts it: one
counter per source (and per project), UTC day, metric and label. A window then
costs a few rows per source and day, however many requests it saw.

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

from proxy.analytics import (
    BOUNDS,
    ERRORS,
    HITS,
    LATENCY,
    MISSES,
    OVERFLOW,
    PROJECT,
    REPLAYS,
    REQUESTS,
    SPEND,
    UPSTREAM,
    UPSTREAM_ERRORS,
    bucket_label,
)

_TABLE = "run_data_request_daily"
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
# The global namespace's key (no project), as each database stores a UUID.
GLOBAL = uuid.UUID(int=0)
_GLOBAL = {"postgresql": f"'{GLOBAL}'::uuid", "sqlite": f"'{GLOBAL.hex}'"}
# A source's counters that rank it in its project's summary.
RANKED = (REQUESTS, HITS, MISSES)
# Upstream calls, a hybrid replay's fresh call included (a stored answer has no timings).
_TIMED = "r.start_time IS NOT NULL AND r.end_time IS NOT NULL"
_MS = "(r.end_time - r.start_time) * 1000"


def _bucket() -> str:
    whens = " ".join(f"WHEN {_MS} <= {b!r} THEN '{bucket_label(b)}'" for b in BOUNDS)
    return f"CASE WHEN {_TIMED} THEN CASE {whens} ELSE '{OVERFLOW}' END END"


def fold(dialect: str, rows: str, ctes: str = "") -> str:
    """SQL adding the audit rows of the relation named ``rows`` to the rollup.

    ``rows`` is a table, or a CTE that ``ctes`` defines (``name AS (…)``). The
    rows are read once, grouped by everything a counter splits by (``pre``);
    each counter is then a sum over those groups. Every counter is kept twice:
    for the row's source, and for its source's project (``project_key``; metric
    ``PROJECT`` + name), so that a project's summary reads a few rows a day
    however many sources it has. Each branch makes distinct (key, day, metric,
    label) rows, as one upsert may touch a row only once; they are taken in key
    order so that concurrent writers lock in the same order.
    """
    pre = (
        f"pre AS (SELECT r.data_source_id, {_DAY[dialect]} AS day, r.data_origin AS origin,"
        f" r.replay, r.error IS NOT NULL AS failed, {_CODE[dialect]} AS code,"
        f" {_bucket()} AS bucket, r.cost_currency AS currency, count(*) AS n,"
        f" sum(CASE WHEN {_TIMED} THEN {_MS} END) AS ms, sum(r.cost_amount) AS cost,"
        f" count(r.cost_amount) AS costed"
        f" FROM {rows} AS r GROUP BY 1, 2, 3, 4, 5, 6, 7, 8)"
    )
    branches = (
        (REQUESTS, "''", "0", "TRUE"),
        (HITS, "''", "0", "r.origin = 'CACHE' AND r.replay IS NULL"),
        (MISSES, "''", "0", "r.origin = 'REQUEST'"),
        (REPLAYS, "r.replay", "0", "r.replay IS NOT NULL"),
        (UPSTREAM, "''", "sum(r.ms)", "r.bucket IS NOT NULL"),
        (UPSTREAM_ERRORS, "''", "0", "r.bucket IS NOT NULL AND r.failed"),
        (LATENCY, "r.bucket", "0", "r.bucket IS NOT NULL"),
        (ERRORS, "coalesce(r.code, '')", "0", "r.failed"),
        (SPEND, "coalesce(r.currency, '')", "sum(r.cost)", "r.costed > 0"),
    )
    # Rows of a source that no longer exists (a deleted draft) count for no project.
    scopes = (
        ("r.data_source_id", "", "pre AS r"),
        (
            f"coalesce(s.project_id, {_GLOBAL[dialect]})",
            PROJECT,
            "pre AS r JOIN data_source AS s ON s.data_source_id = r.data_source_id",
        ),
    )
    union = "\nUNION ALL\n".join(
        f"SELECT {key} AS data_source_id, r.day, '{prefix}{metric}' AS metric,"
        f" {label} AS label, sum({'r.costed' if metric == SPEND else 'r.n'}) AS n,"
        f" CAST({total} AS NUMERIC) AS total FROM {source} WHERE {where} GROUP BY 1, 2, 4"
        for key, prefix, source in scopes
        for metric, label, total, where in branches
    )
    return (
        f"WITH {ctes + ', ' if ctes else ''}{pre}\n"
        f"INSERT INTO {_TABLE} ({_COLUMNS})\n"
        f"SELECT {_COLUMNS} FROM ({union}) AS folded WHERE TRUE ORDER BY 1, 2, 3, 4\n{_UPSERT}"
    )


def project_key(project_id: uuid.UUID | None) -> uuid.UUID:
    """Where a project's counters are kept (``data_source_id``)."""
    return GLOBAL if project_id is None else project_id


def rebuild(dialect: str) -> str:
    """SQL making the rollup again from the whole audit table (an empty rollup first)."""
    return fold(dialect, "run_data_request")
