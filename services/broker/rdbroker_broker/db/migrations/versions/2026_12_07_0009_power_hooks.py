"""capacity on demand: pools' power hooks and servers' power state

- pool_power: a pool's `power:` declaration from the farm file (start hook and when to call it, stop
  hook and when to call it, how long a new user waits for a starting server);
- servers: `power` (on | starting | stopping | off), when it last changed, the deadline of a start or
  stop under way, whether the power loop drained the server (so starting it again undoes only its own
  drain), and since when the server has held no live session (the stop rule's idle time).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_power",
        sa.Column("pool", sa.String(128), nullable=False),
        sa.Column("start_url", sa.String(1024), nullable=False, server_default=""),
        sa.Column("min_free_sessions", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("start_timeout_s", sa.Float(), nullable=False, server_default="600"),
        sa.Column("start_wait_s", sa.Float(), nullable=False, server_default="20"),
        sa.Column("stop_url", sa.String(1024), nullable=False, server_default=""),
        sa.Column("idle_for_s", sa.Float(), nullable=False, server_default="0"),
        sa.Column("keep_running", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("stop_timeout_s", sa.Float(), nullable=False, server_default="600"),
        sa.ForeignKeyConstraint(
            ["pool"],
            ["pools.name"],
            name="fk_pool_power_pool_pools",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pool", name="pk_pool_power"),
    )
    # Plain ADD COLUMNs on both databases (a batch would copy `servers`, which triggers watch).
    op.add_column("servers", sa.Column("power", sa.String(16), nullable=False, server_default="on"))
    op.add_column("servers", sa.Column("power_changed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("servers", sa.Column("power_deadline", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "servers",
        sa.Column("power_drained", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("servers", sa.Column("idle_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for column in ("idle_since", "power_drained", "power_deadline", "power_changed_at", "power"):
        op.drop_column("servers", column)
    op.drop_table("pool_power")
