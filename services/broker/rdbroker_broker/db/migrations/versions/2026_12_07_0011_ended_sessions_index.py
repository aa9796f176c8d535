"""an index of ended sessions by when they ended

The purge looks for sessions ended before the retention every minute. Through `ix_sessions_state_expires`
it read every ended session each time (about 40 ms at 100,000 on SQLite, where statements run on the
event loop's thread, so every proxied connection waited with it); this partial index finds only
those due (state leads it, so that SQLite's planner, weighing equality terms first, prefers it).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ENDED = "state = 'ended'"


def upgrade() -> None:
    op.create_index(
        "ix_sessions_ended_at",
        "sessions",
        ["state", "ended_at"],
        postgresql_where=sa.text(ENDED),
        sqlite_where=sa.text(ENDED),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_ended_at", table_name="sessions")
