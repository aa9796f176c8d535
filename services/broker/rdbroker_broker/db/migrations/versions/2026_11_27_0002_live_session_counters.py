"""live session counters on servers, kept by triggers on sessions

A session counts as live in states pending, active and disconnected. An insert of a live session by
routing (learnt_from = 'route') also counts as a placement since the server's last load report.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LIVE = "('pending', 'active', 'disconnected')"

POSTGRESQL = [
    f"""
    CREATE FUNCTION rdbroker_count_live_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.state IN {LIVE} THEN
                UPDATE servers SET live_sessions = live_sessions + 1,
                    placements_since_report = placements_since_report
                        + CASE WHEN NEW.learnt_from = 'route' THEN 1 ELSE 0 END
                WHERE address = NEW.server_address;
            END IF;
        ELSIF TG_OP = 'DELETE' THEN
            IF OLD.state IN {LIVE} THEN
                UPDATE servers SET live_sessions = live_sessions - 1 WHERE address = OLD.server_address;
            END IF;
        ELSE
            IF OLD.state IN {LIVE}
                    AND (NEW.state NOT IN {LIVE} OR NEW.server_address <> OLD.server_address) THEN
                UPDATE servers SET live_sessions = live_sessions - 1 WHERE address = OLD.server_address;
            END IF;
            IF NEW.state IN {LIVE}
                    AND (OLD.state NOT IN {LIVE} OR NEW.server_address <> OLD.server_address) THEN
                UPDATE servers SET live_sessions = live_sessions + 1 WHERE address = NEW.server_address;
            END IF;
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER sessions_count_live AFTER INSERT OR DELETE OR UPDATE OF state, server_address
    ON sessions FOR EACH ROW EXECUTE FUNCTION rdbroker_count_live_sessions()
    """,
]

SQLITE = [
    f"""
    CREATE TRIGGER sessions_count_live_insert AFTER INSERT ON sessions WHEN NEW.state IN {LIVE}
    BEGIN
        UPDATE servers SET live_sessions = live_sessions + 1,
            placements_since_report = placements_since_report + (NEW.learnt_from = 'route')
        WHERE address = NEW.server_address;
    END
    """,
    f"""
    CREATE TRIGGER sessions_count_live_delete AFTER DELETE ON sessions WHEN OLD.state IN {LIVE}
    BEGIN
        UPDATE servers SET live_sessions = live_sessions - 1 WHERE address = OLD.server_address;
    END
    """,
    f"""
    CREATE TRIGGER sessions_count_live_leave AFTER UPDATE OF state, server_address ON sessions
    WHEN OLD.state IN {LIVE} AND (NEW.state NOT IN {LIVE} OR NEW.server_address <> OLD.server_address)
    BEGIN
        UPDATE servers SET live_sessions = live_sessions - 1 WHERE address = OLD.server_address;
    END
    """,
    f"""
    CREATE TRIGGER sessions_count_live_enter AFTER UPDATE OF state, server_address ON sessions
    WHEN NEW.state IN {LIVE} AND (OLD.state NOT IN {LIVE} OR NEW.server_address <> OLD.server_address)
    BEGIN
        UPDATE servers SET live_sessions = live_sessions + 1 WHERE address = NEW.server_address;
    END
    """,
]


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("live_sessions", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE servers SET live_sessions = (SELECT count(*) FROM sessions "
        f"WHERE sessions.server_address = servers.address AND sessions.state IN {LIVE})"
    )
    for statement in POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER sessions_count_live ON sessions")
        op.execute("DROP FUNCTION rdbroker_count_live_sessions()")
    else:
        for name in ("insert", "delete", "leave", "enter"):
            op.execute(f"DROP TRIGGER sessions_count_live_{name}")
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("live_sessions")
