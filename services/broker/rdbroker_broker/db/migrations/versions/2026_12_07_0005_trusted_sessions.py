"""sessions the directory can trust: account forms, claims, capacity held, results that age

- pools: the account settings (`domain`, `upn_suffixes`), the claim settings (`junk_bytes`,
  `confirm_timeout_s`), how often agents' session lists are read (`sessions_interval_ms`, 0 = the
  broker's default), when a health result goes stale (`stale_after_ms`, 0 = three probe intervals
  plus the probe lease) and the logon lag of agent load figures (`logon_lag_s`);
- servers: `held_sessions`, the sessions that hold capacity (pending, active, or disconnected and
  confirmed by the server's agent), kept by the same trigger as `live_sessions`; `fresh_until`, when
  the last health result stops counting;
- sessions: `confirmed` (the server's agent listed the user there) and `account_name`, the user part
  of the account (no domain, no UPN suffix), indexed over live sessions so that a bare name and a
  `DOMAIN\\user` name find each other in either order; an index by (server, created_at) to count a
  server's recent placements.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LIVE = "('pending', 'active', 'disconnected')"
# A session holds capacity while its connection is open or being made, or when the server's agent
# confirmed it: an unconfirmed claim whose connection closed holds none.
HOLDS_NEW = "(NEW.state IN ('pending', 'active') OR (NEW.state = 'disconnected' AND NEW.confirmed))"
HOLDS_OLD = "(OLD.state IN ('pending', 'active') OR (OLD.state = 'disconnected' AND OLD.confirmed))"


def _pool_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("domain", sa.String(64), nullable=False, server_default=""),
        sa.Column("upn_suffixes", sa.String(1024), nullable=False, server_default=""),
        sa.Column("junk_bytes", sa.Integer(), nullable=False, server_default="2048"),
        sa.Column("confirm_timeout_s", sa.Float(), nullable=False, server_default="120"),
        sa.Column("sessions_interval_ms", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("stale_after_ms", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("logon_lag_s", sa.Float(), nullable=False, server_default="30"),
    ]


POSTGRESQL = [
    f"""
    CREATE OR REPLACE FUNCTION rdbroker_count_live_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        old_live int := 0; old_held int := 0; new_live int := 0; new_held int := 0;
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            old_live := CASE WHEN OLD.state IN {LIVE} THEN 1 ELSE 0 END;
            old_held := CASE WHEN {HOLDS_OLD} THEN 1 ELSE 0 END;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            new_live := CASE WHEN NEW.state IN {LIVE} THEN 1 ELSE 0 END;
            new_held := CASE WHEN {HOLDS_NEW} THEN 1 ELSE 0 END;
        END IF;
        IF TG_OP = 'INSERT' THEN
            IF new_live = 1 OR new_held = 1 THEN
                UPDATE servers SET live_sessions = live_sessions + new_live,
                    held_sessions = held_sessions + new_held,
                    placements_since_report = placements_since_report
                        + CASE WHEN NEW.learnt_from = 'route' AND new_live = 1 THEN 1 ELSE 0 END
                WHERE address = NEW.server_address;
            END IF;
        ELSIF TG_OP = 'DELETE' THEN
            IF old_live = 1 OR old_held = 1 THEN
                UPDATE servers SET live_sessions = live_sessions - old_live,
                    held_sessions = held_sessions - old_held
                WHERE address = OLD.server_address;
            END IF;
        ELSIF NEW.server_address = OLD.server_address THEN
            IF new_live <> old_live OR new_held <> old_held THEN
                UPDATE servers SET live_sessions = live_sessions + new_live - old_live,
                    held_sessions = held_sessions + new_held - old_held
                WHERE address = NEW.server_address;
            END IF;
        ELSE
            IF old_live = 1 OR old_held = 1 THEN
                UPDATE servers SET live_sessions = live_sessions - old_live,
                    held_sessions = held_sessions - old_held
                WHERE address = OLD.server_address;
            END IF;
            IF new_live = 1 OR new_held = 1 THEN
                UPDATE servers SET live_sessions = live_sessions + new_live,
                    held_sessions = held_sessions + new_held
                WHERE address = NEW.server_address;
            END IF;
        END IF;
        RETURN NULL;
    END $$
    """,
    "DROP TRIGGER sessions_count_live ON sessions",
    """
    CREATE TRIGGER sessions_count_live AFTER INSERT OR DELETE OR UPDATE OF state, server_address, confirmed
    ON sessions FOR EACH ROW EXECUTE FUNCTION rdbroker_count_live_sessions()
    """,
]

SQLITE = [
    *(
        f"DROP TRIGGER IF EXISTS sessions_count_live_{name}"
        for name in ("insert", "delete", "leave", "enter")
    ),
    f"""
    CREATE TRIGGER sessions_count_insert AFTER INSERT ON sessions
    WHEN NEW.state IN {LIVE} OR {HOLDS_NEW}
    BEGIN
        UPDATE servers SET live_sessions = live_sessions + (NEW.state IN {LIVE}),
            held_sessions = held_sessions + {HOLDS_NEW},
            placements_since_report = placements_since_report
                + (NEW.learnt_from = 'route' AND NEW.state IN {LIVE})
        WHERE address = NEW.server_address;
    END
    """,
    f"""
    CREATE TRIGGER sessions_count_delete AFTER DELETE ON sessions
    WHEN OLD.state IN {LIVE} OR {HOLDS_OLD}
    BEGIN
        UPDATE servers SET live_sessions = live_sessions - (OLD.state IN {LIVE}),
            held_sessions = held_sessions - {HOLDS_OLD}
        WHERE address = OLD.server_address;
    END
    """,
    # Two statements, old row out then new row in: right whether or not the server changed.
    f"""
    CREATE TRIGGER sessions_count_update AFTER UPDATE OF state, server_address, confirmed ON sessions
    WHEN (OLD.state IN {LIVE}) <> (NEW.state IN {LIVE}) OR {HOLDS_OLD} <> {HOLDS_NEW}
        OR NEW.server_address <> OLD.server_address
    BEGIN
        UPDATE servers SET live_sessions = live_sessions - (OLD.state IN {LIVE}),
            held_sessions = held_sessions - {HOLDS_OLD}
        WHERE address = OLD.server_address;
        UPDATE servers SET live_sessions = live_sessions + (NEW.state IN {LIVE}),
            held_sessions = held_sessions + {HOLDS_NEW}
        WHERE address = NEW.server_address;
    END
    """,
]


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        for column in _pool_columns():
            batch.add_column(column)
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("held_sessions", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("fresh_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("confirmed", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("account_name", sa.String(256), nullable=True))
    op.execute("UPDATE sessions SET confirmed = (learnt_from = 'agent')")
    op.execute(
        "UPDATE servers SET held_sessions = (SELECT count(*) FROM sessions "
        "WHERE sessions.server_address = servers.address AND (sessions.state IN ('pending', 'active') "
        "OR (sessions.state = 'disconnected' AND sessions.confirmed)))"
    )
    live_account = f"state IN {LIVE} AND account_name IS NOT NULL"
    op.create_index(
        "ix_sessions_live_account",
        "sessions",
        ["pool", "account_name"],
        postgresql_ops={"account_name": "text_pattern_ops"},
        postgresql_where=sa.text(live_account),
        sqlite_where=sa.text(live_account),
    )
    op.create_index("ix_sessions_server_created", "sessions", ["server_address", "created_at"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRESQL:
            op.execute(statement)
    else:
        for statement in SQLITE:
            op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("0005 is not reversible: restore the backup taken before the upgrade")
