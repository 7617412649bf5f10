"""The seed's tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_source",
        sa.Column("data_source_id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("caching_enabled", sa.Boolean(), nullable=False),
        sa.Column("caching_ttl", sa.Integer()),
        sa.Column("caching_stale_if_error", sa.Integer()),
        sa.Column("runtime_params", sa.JSON(), nullable=False),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("project_id", sa.Uuid()),
        sa.Column("metadata", sa.JSON()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "uq_data_source_live_name",
        "data_source",
        ["project_id", "name"],
        unique=True,
        postgresql_where=sa.text("status <> 'ARCHIVED'"),
        sqlite_where=sa.text("status <> 'ARCHIVED'"),
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        "data_source_env_var",
        sa.Column("data_source_env_var_id", sa.Uuid(), primary_key=True),
        sa.Column(
            "data_source_id",
            sa.Uuid(),
            sa.ForeignKey("data_source.data_source_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Text()),
        sa.Column("nullable", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("data_source_id", "name"),
    )
    op.create_index(
        "ix_data_source_env_var_data_source_id", "data_source_env_var", ["data_source_id"]
    )
    op.create_table(
        "data_object",
        sa.Column("data_object_id", sa.Uuid(), primary_key=True),
        sa.Column("data_source_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_data_object_data_source_id", "data_object", ["data_source_id"])
    op.create_index("ix_data_object_key", "data_object", ["key"])
    op.create_table(
        "run_data_request",
        sa.Column("run_data_request_id", sa.Uuid(), primary_key=True),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("data_object_id", sa.Uuid()),
        sa.Column("data_source_id", sa.Uuid(), nullable=False),
        sa.Column("data_origin", sa.String(16)),
        sa.Column("start_time", sa.Float()),
        sa.Column("end_time", sa.Float()),
        sa.Column("error", sa.JSON(none_as_null=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_run_data_request_run_id", "run_data_request", ["run_id"])
    op.create_index("ix_run_data_request_data_source_id", "run_data_request", ["data_source_id"])
    op.create_index("ix_run_data_request_created_at", "run_data_request", ["created_at"])


def downgrade() -> None:
    op.drop_table("run_data_request")
    op.drop_table("data_object")
    op.drop_table("data_source_env_var")
    op.drop_table("data_source")
