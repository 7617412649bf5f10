"""The seed's tables, same names and columns, for Postgres and SQLite alike.

Audit tables (``data_object``, ``run_data_request``) carry ids without foreign
keys on purpose: the audit trail must outlive a hard-deleted draft, and a
record shipped from one sidecar's outbox may name an object another sidecar
has not shipped yet. A foreign key there would block the outbox writer.

SQLAlchemy Core tables, not ORM classes: what uses them (the admin routes, the
commands, SQLite's serving path) reads and writes rows, and declarative mapping cost
~3 MiB of RSS for nothing used. A row comes back as a ``Row``, read by attribute. On
Postgres the serving path reads and writes with plain SQL instead (README "Footprint").
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)

from proxy.source_spec import MAX_NAME_LENGTH

metadata = MetaData()


def _stamped() -> tuple[Column[Any], Column[Any]]:
    """When a source's row, or one of its variables or credentials, was made and last set."""
    return (
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("last_updated_at", DateTime(timezone=True), nullable=False),
    )


def _owned_by_source(*, index: bool = False) -> Column[Any]:
    """A variable's or credential's source: it goes with a deleted draft."""
    on_delete = ForeignKey("data_source.data_source_id", ondelete="CASCADE")
    return Column("data_source_id", Uuid, on_delete, nullable=False, index=index)


data_source = Table(
    "data_source",
    metadata,
    Column("data_source_id", Uuid, primary_key=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("description", Text),
    Column("source", JSON, nullable=False),
    Column("caching_enabled", Boolean, nullable=False, default=False),
    Column("caching_ttl", Integer),
    Column("caching_stale_if_error", Integer),
    Column("runtime_params", JSON, nullable=False),
    Column("variables", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("project_id", Uuid),
    # Read as ``meta``: ``metadata`` names the schema in SQLAlchemy.
    Column("metadata", JSON, key="meta"),
    # Days a source's DataObjects and audit rows are kept; None: the global default.
    Column("retention_days", Integer),
    *_stamped(),
    # Names are unique among the non-archived sources of a project. NULL
    # project ids (global sources) are compared equal on Postgres 15+;
    # SQLite relies on the registry's check inside the same transaction.
    Index(
        "uq_data_source_live_name",
        "project_id",
        "name",
        unique=True,
        postgresql_where=text("status <> 'ARCHIVED'"),
        sqlite_where=text("status <> 'ARCHIVED'"),
        postgresql_nulls_not_distinct=True,
    ),
)

data_source_env_var = Table(
    "data_source_env_var",
    metadata,
    Column("data_source_env_var_id", Uuid, primary_key=True),
    _owned_by_source(index=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("value", Text, doc="Fernet token of the JSON value"),
    Column("nullable", Boolean, nullable=False, default=False),
    *_stamped(),
    UniqueConstraint("data_source_id", "name"),
)

data_source_credential = Table(
    "data_source_credential",
    metadata,
    Column("credential_id", Uuid, primary_key=True),
    _owned_by_source(),
    Column("credential_type", String(16), nullable=False),
    Column("value", Text, nullable=False, doc="Fernet token of the JSON value"),
    *_stamped(),
    UniqueConstraint("data_source_id", "credential_type"),
)

data_object = Table(
    "data_object",
    metadata,
    Column("data_object_id", Uuid, primary_key=True),
    Column("data_source_id", Uuid, nullable=False),
    Column("key", String(32), nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A key's objects in time order (replay, erasure); a source's by age (paging,
    # export, pruning).
    Index("ix_data_object_source_key_created", "data_source_id", "key", "created_at"),
    Index("ix_data_object_source_created", "data_source_id", "created_at"),
)

run_data_request = Table(
    "run_data_request",
    metadata,
    Column("run_data_request_id", Uuid, primary_key=True),
    Column("run_id", Uuid, nullable=False, index=True),
    Column("data_object_id", Uuid),
    Column("data_source_id", Uuid, nullable=False, index=True),
    Column("data_origin", String(16)),
    Column("start_time", Float),
    Column("end_time", Float),
    # none_as_null: a success stores SQL NULL, so "WHERE error IS NULL" finds it.
    Column("error", JSON(none_as_null=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    # The price of an upstream call, as the source declared it when the call was made.
    Column("cost_amount", Numeric(18, 6)),
    Column("cost_currency", String(3)),
    # Set on a replayed request: what the replay looked up by.
    Column("replay", String(8)),
    # Set when the object this row names was erased; the row stays, its reference cleared.
    Column("erased_at", DateTime(timezone=True)),
)

# The audit rows folded into counters per source and UTC day (``proxy.rollup``).
#
# The analytics routes read this, never ``run_data_request``: a 30-day window is
# a few rows per source and day, whatever the audit table holds. One counter per
# ``(metric, label)``: ``n`` counts rows, ``total`` sums a quantity (latency ms, cost).
# A project's counters (all its sources together) sit under its id (the nil UUID
# for the global namespace), their metric prefixed with ``*``. No foreign key, as
# for the audit rows it counts.
run_data_request_daily = Table(
    "run_data_request_daily",
    metadata,
    Column("data_source_id", Uuid, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("metric", String(16), primary_key=True),
    Column("label", String(64), primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("total", Numeric(24, 6), nullable=False),
    # A summary ranks a project's sources by a few metrics over a window: from the index alone.
    Index("ix_run_data_request_daily_ranking", "metric", "day", "data_source_id", "n"),
)
