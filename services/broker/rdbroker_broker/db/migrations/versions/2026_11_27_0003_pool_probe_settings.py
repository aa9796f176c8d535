"""per-pool probe settings (farm `probe:`); 0 = the broker's RDBROKER_PROBE_* value

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("probe_interval_ms", "probe_timeout_ms", "probe_rise", "probe_fall")


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:  # batch: SQLite rebuilds the table, PostgreSQL alters it
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
