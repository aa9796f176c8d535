"""routing tokens under policy per pool, and the operators' audit trail

- pools: `honor_routing_tokens` (true): false makes the broker place a connection that carries a
  `Cookie: msts=` routing token by policy, as if it carried none;
- audit: one row per operator change to the directory (who, from where, what, on what, how it ended),
  read back by `GET /v1/audit`; ordered by `id`, pruned with the other history after `retention_s`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases (a batch would copy `pools`, which `servers` references).
    op.add_column(
        "pools",
        sa.Column("honor_routing_tokens", sa.Boolean(), nullable=False, server_default=sa.text("true")),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("client", sa.String(255), nullable=False, server_default=""),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False, server_default=""),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(1024), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_at", "audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_audit_at", table_name="audit")
    op.drop_table("audit")
    op.drop_column("pools", "honor_routing_tokens")
