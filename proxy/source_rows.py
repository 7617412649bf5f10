"""A data source's stored row: the spec it holds, and the registry's read of every row.

The registry reads with plain SQL (``Database.read``): on Postgres the serving
pool's, so that a sidecar that only serves never imports SQLAlchemy (README
"Footprint"). A row is read by attribute, as SQLAlchemy's rows are
(``row.name``; the ``metadata`` column as ``row.meta``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from types import SimpleNamespace
from typing import Any, TypeAlias

from proxy.database import Database, Row
from proxy.source_spec import DataSourceSpec

SourceRow: TypeAlias = Any
"""A ``data_source`` row, read by attribute: SQLAlchemy's ``Row`` or one read here."""

SOURCES = (
    "SELECT data_source_id, name, description, source, caching_enabled, caching_ttl,"
    " caching_stale_if_error, runtime_params, variables, status, project_id,"
    " metadata AS meta, retention_days, created_at, last_updated_at FROM data_source"
)
VARIABLES = "SELECT data_source_id, name, value FROM data_source_env_var"
CREDENTIALS = "SELECT data_source_id, credential_type, value FROM data_source_credential"


def spec_of(row: SourceRow) -> DataSourceSpec:
    return DataSourceSpec.model_validate(
        {
            "name": row.name,
            "source": row.source,
            "caching": {
                "enabled": row.caching_enabled,
                "ttl": row.caching_ttl,
                "stale_if_error": row.caching_stale_if_error,
            },
            "retention_days": row.retention_days,
            "description": row.description,
            "metadata": row.meta,
            "runtime_params": row.runtime_params,
            "variables": row.variables,
            "project_id": row.project_id,
        }
    )


def as_uuid(value: Any) -> uuid.UUID | None:
    # SQLite keeps a UUID as its 32 hex digits.
    return value if value is None or isinstance(value, uuid.UUID) else uuid.UUID(value)


def _json(value: Any) -> Any:
    # A JSON column's text, on both databases; decoded as SQLAlchemy's JSON type decodes
    # it (the standard library's parser: integers of any size, as the admin API took them).
    return value if value is None else json.loads(value)


def _time(value: Any) -> datetime:
    # SQLite keeps a timestamp as its UTC text, read back naive as SQLAlchemy reads it.
    return datetime.fromisoformat(value) if isinstance(value, str) else value


# How a column's stored value becomes the value SQLAlchemy's types would read.
_TYPED: Mapping[str, Callable[[Any], Any]] = {
    "data_source_id": as_uuid,
    "project_id": as_uuid,
    "source": _json,
    "runtime_params": _json,
    "variables": _json,
    "meta": _json,
    "caching_enabled": bool,
    "created_at": _time,
    "last_updated_at": _time,
}


def _same(value: Any) -> Any:
    return value


def _row(stored: Row) -> SimpleNamespace:
    return SimpleNamespace(**{name: _TYPED.get(name, _same)(v) for name, v in stored.items()})


async def read_all(
    database: Database,
) -> tuple[list[SourceRow], list[SimpleNamespace], list[SimpleNamespace]]:
    """Every source, variable and credential, read in one transaction."""
    sources, variables, credentials = await database.read(SOURCES, VARIABLES, CREDENTIALS)
    return [_row(r) for r in sources], [_row(r) for r in variables], [_row(r) for r in credentials]
