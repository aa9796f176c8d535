"""account names of live sessions recorded before the broker stored them

Live sessions get `account_name`, the user part of their name (casefolded, without `DOMAIN\\` or
`@suffix`), so that a bare name and a qualified one find each other (docs/accounts.md). Their keys
stay: every pool has no `domain` yet, and without one a key is the casefolded name, as before.
Ended sessions are history: nothing routes by them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def account_name(user: str) -> str:
    """As `accounts.resolve(user).name` without a pool domain (kept here: a migration must not
    change when the broker's code does)."""
    name = user.strip().casefold()
    prefix, sep, rest = name.rpartition("\\")
    if sep and prefix:
        return rest
    local, at, _ = rest.rpartition("@")
    return local if at and local else rest


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            'SELECT id, "user" FROM sessions WHERE account_name IS NULL AND user_key IS NOT NULL'
            " AND state IN ('pending', 'active', 'disconnected')"
        )
    ).fetchall()
    if rows:
        conn.execute(
            sa.text("UPDATE sessions SET account_name = :name WHERE id = :id"),
            [{"id": row[0], "name": account_name(row[1])} for row in rows],
        )


def downgrade() -> None:
    op.execute("UPDATE sessions SET account_name = NULL")
