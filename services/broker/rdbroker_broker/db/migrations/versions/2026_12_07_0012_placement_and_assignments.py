"""placement modes per pool, and assignment rules

- pools: `placement` ('breadth'): 'depth' fills the busiest server up to its limit before the next;
- assignments: the farm file's ordered `assignments:` rules, which pick a pool by account (a glob on
  the account key) and/or client network (CIDR) for a connection that names none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases (a batch would copy `pools`, which `servers` references).
    op.add_column("pools", sa.Column("placement", sa.String(16), nullable=False, server_default="breadth"))
    op.create_table(
        "assignments",
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("user_glob", sa.String(256), nullable=False, server_default=""),
        sa.Column("network", sa.String(64), nullable=False, server_default=""),
        sa.Column("pool", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_assignments"),
        sa.ForeignKeyConstraint(
            ["pool"], ["pools.name"], name="fk_assignments_pool_pools", onupdate="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("assignments")
    op.drop_column("pools", "placement")
