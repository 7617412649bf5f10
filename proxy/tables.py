"""The seed's tables, same names and columns, for Postgres and SQLite alike.

Audit tables (``data_object``, ``run_data_request``) carry ids without foreign
keys on purpose: the audit trail must outlive a hard-deleted draft, and a
record shipped from one sidecar's outbox may name an object another sidecar
has not shipped yet. A foreign key there would block the outbox writer.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from proxy.source_spec import MAX_NAME_LENGTH


class Base(DeclarativeBase):
    pass


class DataSource(Base):
    __tablename__ = "data_source"

    data_source_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    description: Mapped[str | None] = mapped_column(Text)
    source: Mapped[dict[str, Any]] = mapped_column(JSON)
    caching_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    caching_ttl: Mapped[int | None] = mapped_column(Integer)
    caching_stale_if_error: Mapped[int | None] = mapped_column(Integer)
    runtime_params: Mapped[list[str]] = mapped_column(JSON)
    variables: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    project_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # Days a source's DataObjects and audit rows are kept; None: the global default.
    retention_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
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


class DataSourceEnvVar(Base):
    __tablename__ = "data_source_env_var"

    data_source_env_var_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    data_source_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("data_source.data_source_id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    value: Mapped[str | None] = mapped_column(Text, doc="Fernet token of the JSON value")
    nullable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("data_source_id", "name"),)


class DataSourceCredential(Base):
    __tablename__ = "data_source_credential"

    credential_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    data_source_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("data_source.data_source_id", ondelete="CASCADE")
    )
    credential_type: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(Text, doc="Fernet token of the JSON value")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("data_source_id", "credential_type"),)


class DataObject(Base):
    __tablename__ = "data_object"

    data_object_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    data_source_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    key: Mapped[str] = mapped_column(String(32))
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # A key's objects in time order (replay, erasure); a source's by age (paging,
        # export, pruning).
        Index("ix_data_object_source_key_created", "data_source_id", "key", "created_at"),
        Index("ix_data_object_source_created", "data_source_id", "created_at"),
    )


class RunDataRequest(Base):
    __tablename__ = "run_data_request"

    run_data_request_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    data_object_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    data_source_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    data_origin: Mapped[str | None] = mapped_column(String(16))
    start_time: Mapped[float | None] = mapped_column(Float)
    end_time: Mapped[float | None] = mapped_column(Float)
    # none_as_null: a success stores SQL NULL, so "WHERE error IS NULL" finds it.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # The price of an upstream call, as the source declared it when the call was made.
    cost_amount: Mapped[Decimal | None] = mapped_column(Numeric(18, 6))
    cost_currency: Mapped[str | None] = mapped_column(String(3))
    # Set on a replayed request: what the replay looked up by.
    replay: Mapped[str | None] = mapped_column(String(8))
    # Set when the object this row names was erased; the row stays, its reference cleared.
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunDataRequestDaily(Base):
    """The audit rows folded into counters per source and UTC day (``proxy.rollup``).

    The analytics routes read this, never ``run_data_request``: a 30-day window is
    a few rows per source and day, whatever the audit table holds. One counter per
    ``(metric, label)``: ``n`` counts rows, ``total`` sums a quantity (latency ms, cost).
    A project's counters (all its sources together) sit under its id (the nil UUID
    for the global namespace), their metric prefixed with ``*``. No foreign key, as
    for the audit rows it counts.
    """

    __tablename__ = "run_data_request_daily"

    data_source_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    metric: Mapped[str] = mapped_column(String(16), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[Decimal] = mapped_column(Numeric(24, 6))

    # A summary ranks a project's sources by a few metrics over a window: from the index alone.
    __table_args__ = (
        Index("ix_run_data_request_daily_ranking", "metric", "day", "data_source_id", "n"),
    )
