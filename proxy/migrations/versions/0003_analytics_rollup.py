"""The daily rollup the analytics routes read (``proxy.rollup``), filled from the audit rows
already there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from proxy.rollup import rebuild

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_data_request_daily",
        sa.Column("data_source_id", sa.Uuid(), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("metric", sa.String(16), primary_key=True),
        sa.Column("label", sa.String(64), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.Numeric(24, 6), nullable=False),
    )
    op.create_index(
        "ix_run_data_request_daily_ranking",
        "run_data_request_daily",
        ["metric", "day", "data_source_id", "n"],
    )
    # The audit rows written before this release: analytics cover them too.
    op.execute(rebuild(op.get_bind().dialect.name))


def downgrade() -> None:
    op.drop_index("ix_run_data_request_daily_ranking", "run_data_request_daily")
    op.drop_table("run_data_request_daily")
