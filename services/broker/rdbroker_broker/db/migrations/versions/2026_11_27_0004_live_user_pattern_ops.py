"""the live-user unique index compares bytes (text_pattern_ops), so it also serves user-key prefix
searches (9-character mstsc cookies) without a second index on every session write

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = "state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"


def _recreate(ops: dict[str, str]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has one byte-wise comparison already; nothing to change
    # Built beside the old one, then swapped: the table never lacks its uniqueness guard.
    op.create_index(
        "uq_sessions_live_user_next",
        "sessions",
        ["pool", "user_key"],
        unique=True,
        postgresql_ops=ops,
        postgresql_where=sa.text(LIVE),
    )
    op.drop_index("uq_sessions_live_user", table_name="sessions")
    op.execute("ALTER INDEX uq_sessions_live_user_next RENAME TO uq_sessions_live_user")


def upgrade() -> None:
    _recreate({"user_key": "text_pattern_ops"})


def downgrade() -> None:
    _recreate({})
