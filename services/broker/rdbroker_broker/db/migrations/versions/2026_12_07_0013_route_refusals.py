"""route refusals: refused Route calls per minute and reason, for the dashboard's history

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "route_refusals",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "reason", name="pk_route_refusals"),
    )


def downgrade() -> None:
    op.drop_table("route_refusals")
