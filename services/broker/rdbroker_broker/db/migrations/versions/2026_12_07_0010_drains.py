"""drain until empty: a server's drain and its progress, carried on by any broker replica

- drains: one row per server (its latest drain): what the operator asked (notify text, log off
  disconnected sessions after, the state to end in), who and when, the step and the counts so far,
  and the lease of the replica advancing it (`owner`, `lease_until`);
- drain_sessions: what a drain did to each session (messaged once, a failed action's retry time).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drains",
        sa.Column("server_address", sa.String(255), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("then_state", sa.String(16), nullable=False),
        sa.Column("notify_text", sa.String(500), nullable=False, server_default=""),
        sa.Column("logoff_after_s", sa.Float(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_by", sa.String(255), nullable=False),
        sa.Column("started_from", sa.String(255), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sessions_left", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("active", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("disconnected", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("messaged", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("logged_off", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(1024), nullable=False, server_default=""),
        sa.Column("next_logoff_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.String(1024), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("server_address", name="pk_drains"),
        sa.ForeignKeyConstraint(
            ["server_address"],
            ["servers.address"],
            name="fk_drains_server_address_servers",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
    )
    op.create_index("ix_drains_step_next_at", "drains", ["step", "next_at"])
    op.create_table(
        "drain_sessions",
        sa.Column("server_address", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("messaged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("server_address", "session_id", name="pk_drain_sessions"),
        sa.ForeignKeyConstraint(
            ["server_address"],
            ["drains.server_address"],
            name="fk_drain_sessions_server_address_drains",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("drain_sessions")
    op.drop_index("ix_drains_step_next_at", table_name="drains")
    op.drop_table("drains")
