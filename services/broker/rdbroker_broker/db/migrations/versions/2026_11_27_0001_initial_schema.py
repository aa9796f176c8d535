"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 09:32:44.320735
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("connection_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("proxy_id", sa.String(length=128), nullable=False),
        sa.Column("server_address", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("user", sa.String(length=256), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=False),
        sa.Column("client_address", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bytes_from_client", sa.BigInteger(), nullable=False),
        sa.Column("bytes_from_server", sa.BigInteger(), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("end_reason", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("connection_id", "attempt", name=op.f("pk_connections")),
    )
    op.create_index(op.f("ix_connections_created_at"), "connections", ["created_at"], unique=False)
    op.create_index(op.f("ix_connections_session_id"), "connections", ["session_id"], unique=False)
    op.create_table(
        "health_replicas",
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name=op.f("pk_health_replicas")),
    )
    op.create_table(
        "pools",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("name_key", sa.String(length=128), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("disconnect_timeout_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pools")),
        sa.UniqueConstraint("name_key", name=op.f("uq_pools_name_key")),
    )
    op.create_index(
        "uq_pools_one_default",
        "pools",
        ["is_default"],
        unique=True,
        postgresql_where=sa.text("is_default"),
        sqlite_where=sa.text("is_default"),
    )
    op.create_table(
        "proxies",
        sa.Column("proxy_id", sa.String(length=128), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active_connections", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("proxy_id", name=op.f("pk_proxies")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=256), nullable=False),
        sa.Column("user_key", sa.String(length=256), nullable=True),
        sa.Column("server_address", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("learnt_from", sa.String(length=16), nullable=False),
        sa.Column("origin_connection_id", sa.String(length=128), nullable=True),
        sa.Column("connection_id", sa.String(length=128), nullable=True),
        sa.Column("proxy_id", sa.String(length=128), nullable=True),
        sa.Column("client_address", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    op.create_index("ix_sessions_proxy_state", "sessions", ["proxy_id", "state"], unique=False)
    op.create_index("ix_sessions_server_state", "sessions", ["server_address", "state"], unique=False)
    op.create_index("ix_sessions_state_expires", "sessions", ["state", "expires_at"], unique=False)
    op.create_index("ix_sessions_user_key", "sessions", ["user_key"], unique=False)
    op.create_index(
        "uq_sessions_live_user",
        "sessions",
        ["pool", "user_key"],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"),
        sqlite_where=sa.text("state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"),
    )
    op.create_table(
        "servers",
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("max_sessions", sa.Integer(), nullable=False),
        sa.Column("admin_state", sa.String(length=16), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("health_detail", sa.String(length=255), nullable=False),
        sa.Column("health_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("agent_state", sa.String(length=16), nullable=False),
        sa.Column("agent_detail", sa.String(length=255), nullable=False),
        sa.Column("load", sa.Integer(), nullable=False),
        sa.Column("load_reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("placements_since_report", sa.Integer(), nullable=False),
        sa.Column("probed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("agent_url", sa.String(length=1024), nullable=False),
        sa.Column("sessions_url", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool"], ["pools.name"], name=op.f("fk_servers_pool_pools"), onupdate="CASCADE"
        ),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_servers")),
    )
    op.create_index(op.f("ix_servers_pool"), "servers", ["pool"], unique=False)
    op.create_table(
        "probe_leases",
        sa.Column("server_address", sa.String(length=255), nullable=False),
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_address"],
            ["servers.address"],
            name=op.f("fk_probe_leases_server_address_servers"),
            onupdate="CASCADE",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("server_address", name=op.f("pk_probe_leases")),
    )
    op.create_index(op.f("ix_probe_leases_replica_id"), "probe_leases", ["replica_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_probe_leases_replica_id"), table_name="probe_leases")
    op.drop_table("probe_leases")
    op.drop_index(op.f("ix_servers_pool"), table_name="servers")
    op.drop_table("servers")
    op.drop_index(
        "uq_sessions_live_user",
        table_name="sessions",
        postgresql_where=sa.text("state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"),
        sqlite_where=sa.text("state IN ('pending', 'active', 'disconnected') AND user_key IS NOT NULL"),
    )
    op.drop_index("ix_sessions_user_key", table_name="sessions")
    op.drop_index("ix_sessions_state_expires", table_name="sessions")
    op.drop_index("ix_sessions_server_state", table_name="sessions")
    op.drop_index("ix_sessions_proxy_state", table_name="sessions")
    op.drop_table("sessions")
    op.drop_table("proxies")
    op.drop_index(
        "uq_pools_one_default",
        table_name="pools",
        postgresql_where=sa.text("is_default"),
        sqlite_where=sa.text("is_default"),
    )
    op.drop_table("pools")
    op.drop_table("health_replicas")
    op.drop_index(op.f("ix_connections_session_id"), table_name="connections")
    op.drop_index(op.f("ix_connections_created_at"), table_name="connections")
    op.drop_table("connections")
