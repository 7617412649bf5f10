"""The second release's shared schema: credentials, cost and replay on audit rows, erasure, retention,
and the data_object indexes that replay, paging, export and pruning read through.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_source_credential",
        sa.Column("credential_id", sa.Uuid(), primary_key=True),
        sa.Column(
            "data_source_id",
            sa.Uuid(),
            sa.ForeignKey("data_source.data_source_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("credential_type", sa.String(16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("data_source_id", "credential_type"),
    )
    with op.batch_alter_table("data_source") as batch:
        batch.add_column(sa.Column("retention_days", sa.Integer()))
    with op.batch_alter_table("run_data_request") as batch:
        batch.add_column(sa.Column("cost_amount", sa.Numeric(18, 6)))
        batch.add_column(sa.Column("cost_currency", sa.String(3)))
        batch.add_column(sa.Column("replay", sa.String(8)))
        batch.add_column(sa.Column("erased_at", sa.DateTime(timezone=True)))
    # (source, key, created_at) finds a key's objects in time order (replay, erasure);
    # (source, created_at) pages, exports and prunes a source's objects by age. Both start
    # with data_source_id, so the single-column indexes they replace are not missed, and
    # the writer maintains two indexes per row instead of three.
    op.drop_index("ix_data_object_data_source_id", "data_object")
    op.drop_index("ix_data_object_key", "data_object")
    op.create_index(
        "ix_data_object_source_key_created", "data_object", ["data_source_id", "key", "created_at"]
    )
    op.create_index(
        "ix_data_object_source_created", "data_object", ["data_source_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_data_object_source_created", "data_object")
    op.drop_index("ix_data_object_source_key_created", "data_object")
    op.create_index("ix_data_object_key", "data_object", ["key"])
    op.create_index("ix_data_object_data_source_id", "data_object", ["data_source_id"])
    with op.batch_alter_table("run_data_request") as batch:
        batch.drop_column("erased_at")
        batch.drop_column("replay")
        batch.drop_column("cost_currency")
        batch.drop_column("cost_amount")
    with op.batch_alter_table("data_source") as batch:
        batch.drop_column("retention_days")
    op.drop_table("data_source_credential")
