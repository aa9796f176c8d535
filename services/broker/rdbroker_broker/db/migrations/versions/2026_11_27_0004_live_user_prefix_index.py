"""live sessions by user-key prefix, for 9-character (truncated) mstsc cookies

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 13:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = "state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_sessions_live_user_prefix",
        "sessions",
        ["pool", "user_key"],
        postgresql_ops={"user_key": "text_pattern_ops"},
        postgresql_where=sa.text(LIVE),
        sqlite_where=sa.text(LIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_live_user_prefix", table_name="sessions")
