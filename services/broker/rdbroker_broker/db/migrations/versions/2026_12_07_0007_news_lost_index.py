"""an index of the sessions a proxy's heartbeat may revive

Every heartbeat looks for the proxy's sessions disconnected for want of news (`proxy_silent`,
`connection_lost`) whose connection it lists. Through `ix_sessions_proxy_state` that read walked every
disconnected session the proxy ever carried (thousands in a working day); this partial index holds
only the few waiting to be revived.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NEWS_LOST = "state = 'disconnected' AND end_reason IN ('proxy_silent', 'connection_lost')"


def upgrade() -> None:
    op.create_index(
        "ix_sessions_news_lost",
        "sessions",
        ["proxy_id"],
        postgresql_where=sa.text(NEWS_LOST),
        sqlite_where=sa.text(NEWS_LOST),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_news_lost", table_name="sessions")
