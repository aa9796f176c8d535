"""The broker's schema as SQLAlchemy Core tables.

Core rather than ORM classes: the Route hot path is a handful of statements per call, and Core
keeps each one a single compiled, cached statement with no identity map to maintain.
Times are UTC-aware; SQLite stores them naive (in UTC) and `UtcDateTime` puts the zone back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    false,
    text,
)
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

LIVE_STATES_SQL = "state IN ('pending', 'active', 'disconnected')"


class UtcDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


pools = Table(
    "pools",
    metadata,
    Column("name", String(128), primary_key=True),
    Column(
        "name_key", String(128), nullable=False, unique=True
    ),  # lowercased: pools match case-insensitively
    Column("is_default", Boolean, nullable=False, default=False),
    Column("disconnect_timeout_s", Float, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Per-pool probe settings (migration 0003); 0 = the broker's RDBROKER_PROBE_* value.
    Column("probe_interval_ms", Integer, nullable=False, server_default="0"),
    Column("probe_timeout_ms", Integer, nullable=False, server_default="0"),
    Column("probe_rise", Integer, nullable=False, server_default="0"),
    Column("probe_fall", Integer, nullable=False, server_default="0"),
    # Account forms (migration 0005): the NetBIOS domain of bare names and the UPN suffixes that mean
    # it (comma-separated, lower case).
    Column("domain", String(64), nullable=False, server_default=""),
    Column("upn_suffixes", String(1024), nullable=False, server_default=""),
    # Claims: a connection that carried fewer bytes from the server ends its claim at once; a closed
    # claim the server's agent has not listed within confirm_timeout_s ends as `unconfirmed`.
    Column("junk_bytes", Integer, nullable=False, server_default="2048"),
    Column("confirm_timeout_s", Float, nullable=False, server_default="120"),
    # How often agents' session lists are read (0 = the broker's default); when a health result stops
    # counting (0 = three probe intervals plus the probe lease); how long a logon takes to show in an
    # agent's load figure.
    Column("sessions_interval_ms", Integer, nullable=False, server_default="0"),
    Column("stale_after_ms", Integer, nullable=False, server_default="0"),
    Column("logon_lag_s", Float, nullable=False, server_default="30"),
    # False: a routing token (`Cookie: msts=`) is ignored and the connection placed by policy (0008).
    Column("honor_routing_tokens", Boolean, nullable=False, server_default=text("true")),
    # How a new user is placed: `breadth` (least effective load) or `depth` (fill first) (0012).
    Column("placement", String(16), nullable=False, server_default="breadth"),
)
Index(
    "uq_pools_one_default",
    pools.c.is_default,
    unique=True,
    postgresql_where=text("is_default"),
    sqlite_where=text("is_default"),
)

servers = Table(
    "servers",
    metadata,
    Column("address", String(255), primary_key=True),
    Column("pool", String(128), ForeignKey("pools.name", onupdate="CASCADE"), nullable=False, index=True),
    Column("weight", Integer, nullable=False, default=100),
    Column("max_sessions", Integer, nullable=False, default=0),
    Column("admin_state", String(16), nullable=False, default="enabled"),
    Column("health", String(16), nullable=False, default="unknown"),
    Column("health_detail", String(255), nullable=False, default=""),
    Column("health_changed_at", UtcDateTime, nullable=True),
    Column("agent_state", String(16), nullable=False, default="none"),
    Column("agent_detail", String(255), nullable=False, default=""),
    Column("load", Integer, nullable=False, default=-1),
    Column("load_reported_at", UtcDateTime, nullable=True),
    Column("placements_since_report", Integer, nullable=False, default=0),
    # Kept by triggers on `sessions` (migration 0002): counting live sessions per placement would cost
    # a scan of every live session in the pool; the counter changes under the server's row lock.
    Column("live_sessions", Integer, nullable=False, default=0, server_default="0"),
    # The live sessions that hold capacity: pending, active, or disconnected and confirmed by the
    # server's agent (migration 0005, the same trigger).
    Column("held_sessions", Integer, nullable=False, default=0, server_default="0"),
    Column("probed_at", UtcDateTime, nullable=True),
    Column("fresh_until", UtcDateTime, nullable=True),  # the last health result counts until then
    Column("agent_url", String(1024), nullable=False, default=""),
    Column("sessions_url", String(1024), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Capacity on demand (migration 0010, power.py): on | starting | stopping | off; when it changed;
    # when a start or stop under way is given up; whether the power loop drained the server (starting
    # it undoes only that drain); since when it has held no live session.
    Column("power", String(16), nullable=False, server_default="on"),
    Column("power_changed_at", UtcDateTime, nullable=True),
    Column("power_deadline", UtcDateTime, nullable=True),
    Column("power_drained", Boolean, nullable=False, server_default=false()),
    Column("idle_since", UtcDateTime, nullable=True),
)

# A pool's power hooks (migration 0010): the farm file's `power:`; no row = no hooks.
pool_power = Table(
    "pool_power",
    metadata,
    Column(
        "pool",
        String(128),
        ForeignKey("pools.name", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True,
    ),
    Column("start_url", String(1024), nullable=False, server_default=""),
    Column("min_free_sessions", Integer, nullable=False, server_default="0"),
    Column("start_timeout_s", Float, nullable=False, server_default="600"),
    Column("start_wait_s", Float, nullable=False, server_default="20"),
    Column("stop_url", String(1024), nullable=False, server_default=""),
    Column("idle_for_s", Float, nullable=False, server_default="0"),
    Column("keep_running", Integer, nullable=False, server_default="0"),
    Column("stop_timeout_s", Float, nullable=False, server_default="600"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(32), primary_key=True),
    # No foreign keys: a session's history outlives the server or pool it was on.
    Column("pool", String(128), nullable=False),
    Column("user", String(256), nullable=False, default=""),
    Column("user_key", String(256), nullable=True),  # casefolded user; NULL = no identity
    Column("server_address", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("learnt_from", String(16), nullable=False, default="route"),  # route | agent
    Column("origin_connection_id", String(128), nullable=True),
    Column("connection_id", String(128), nullable=True),  # the connection last opened on it
    Column("proxy_id", String(128), nullable=True),
    Column("client_address", String(255), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("opened_at", UtcDateTime, nullable=True),
    Column("disconnected_at", UtcDateTime, nullable=True),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("end_reason", String(64), nullable=False, default=""),
    # The server's agent listed this user there (sessions learnt from the agent are confirmed).
    Column("confirmed", Boolean, nullable=False, default=False, server_default=false()),
    # The account's user part, casefolded, without domain or UPN suffix: a bare name and a
    # `DOMAIN\\user` name find each other through it.
    Column("account_name", String(256), nullable=True),
)
# One live session per (pool, user): this index is what makes concurrent replicas agree. Its key
# compares bytes (text_pattern_ops: equality is the same), so it also finds live sessions by
# user-key prefix (a 9-character mstsc cookie names a longer user): the routing statement's
# `~>=~`/`~<~` range and `LIKE 'prefix%'` probe it instead of scanning.
Index(
    "uq_sessions_live_user",
    sessions.c.pool,
    sessions.c.user_key,
    unique=True,
    postgresql_ops={"user_key": "text_pattern_ops"},
    postgresql_where=text(f"{LIVE_STATES_SQL} AND user_key IS NOT NULL"),
    sqlite_where=text(f"{LIVE_STATES_SQL} AND user_key IS NOT NULL"),
)
Index("ix_sessions_server_state", sessions.c.server_address, sessions.c.state)
Index("ix_sessions_state_expires", sessions.c.state, sessions.c.expires_at)
Index("ix_sessions_user_key", sessions.c.user_key)
Index("ix_sessions_proxy_state", sessions.c.proxy_id, sessions.c.state)
Index(
    "ix_sessions_live_account",
    sessions.c.pool,
    sessions.c.account_name,
    postgresql_ops={"account_name": "text_pattern_ops"},
    postgresql_where=text(f"{LIVE_STATES_SQL} AND account_name IS NOT NULL"),
    sqlite_where=text(f"{LIVE_STATES_SQL} AND account_name IS NOT NULL"),
)
Index("ix_sessions_server_created", sessions.c.server_address, sessions.c.created_at)
# Ended sessions by when they ended, for the purge (migration 0011).
ENDED_SQL = "state = 'ended'"
Index(
    "ix_sessions_ended_at",
    sessions.c.state,
    sessions.c.ended_at,
    postgresql_where=text(ENDED_SQL),
    sqlite_where=text(ENDED_SQL),
)
# The few sessions a proxy's heartbeat may revive (disconnected for want of news, migration 0007).
_NEWS_LOST = "state = 'disconnected' AND end_reason IN ('proxy_silent', 'connection_lost')"
Index(
    "ix_sessions_news_lost",
    sessions.c.proxy_id,
    postgresql_where=text(_NEWS_LOST),
    sqlite_where=text(_NEWS_LOST),
)

connections = Table(
    "connections",
    metadata,
    Column("connection_id", String(128), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("session_id", String(32), nullable=False, index=True),
    Column("proxy_id", String(128), nullable=False, default=""),
    Column("server_address", String(255), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("user", String(256), nullable=False, default=""),
    Column("pool", String(128), nullable=False),
    Column("client_address", String(255), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False, index=True),
    Column("opened_at", UtcDateTime, nullable=True),
    Column("closed_at", UtcDateTime, nullable=True),
    Column("bytes_from_client", BigInteger, nullable=False, default=0),
    Column("bytes_from_server", BigInteger, nullable=False, default=0),
    Column("duration_ms", BigInteger, nullable=False, default=0),
    Column("end_reason", String(64), nullable=False, default=""),
)

proxies = Table(
    "proxies",
    metadata,
    Column("proxy_id", String(128), primary_key=True),
    Column("first_seen_at", UtcDateTime, nullable=False),
    Column("last_heartbeat_at", UtcDateTime, nullable=False),
    Column("active_connections", Integer, nullable=False, default=0),
)

health_replicas = Table(
    "health_replicas",
    metadata,
    Column("replica_id", String(128), primary_key=True),
    Column("last_seen_at", UtcDateTime, nullable=False),
    Column("lease_ms", Integer, nullable=False),
)

probe_leases = Table(
    "probe_leases",
    metadata,
    Column(
        "server_address",
        String(255),
        ForeignKey("servers.address", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True,
    ),
    Column("replica_id", String(128), nullable=False, index=True),
    Column("expires_at", UtcDateTime, nullable=False),
)

# One row per operator change to the directory (migration 0008; `GET /v1/audit`).
audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False, index=True),
    Column("actor", String(255), nullable=False),
    Column("client", String(255), nullable=False, server_default=""),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=False, server_default=""),
    Column("outcome", String(32), nullable=False),
    Column("detail", String(1024), nullable=False, server_default=""),
)

# The farm file's `assignments:` (migration 0012): ordered rules picking the pool of a connection that
# names none, by a glob on the account key and/or the client's network; "" matches anything.
assignments = Table(
    "assignments",
    metadata,
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("user_glob", String(256), nullable=False, server_default=""),
    Column("network", String(64), nullable=False, server_default=""),
    Column("pool", String(128), ForeignKey("pools.name", onupdate="CASCADE"), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# A server's latest drain (migration 0011; drains.py): what was asked, its progress, and the lease of
# the replica advancing it. Removing the server removes its drain.
drains = Table(
    "drains",
    metadata,
    Column(
        "server_address",
        String(255),
        ForeignKey("servers.address", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True,
    ),
    Column("step", String(16), nullable=False),  # starting | messaging | waiting | done | cancelled
    Column("then_state", String(16), nullable=False),  # maintenance | draining
    Column("notify_text", String(500), nullable=False, server_default=""),
    Column("logoff_after_s", Float, nullable=True),  # NULL: disconnected sessions are not logged off
    Column("started_at", UtcDateTime, nullable=False),
    Column("started_by", String(255), nullable=False),
    Column("started_from", String(255), nullable=False, server_default=""),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("next_at", UtcDateTime, nullable=False),  # the next pass is due then
    Column("owner", String(128), nullable=True),  # the replica advancing it, until lease_until
    Column("lease_until", UtcDateTime, nullable=True),
    Column("sessions_left", Integer, nullable=False, server_default="0"),
    Column("active", Integer, nullable=False, server_default="0"),
    Column("disconnected", Integer, nullable=False, server_default="0"),
    Column("messaged", Integer, nullable=False, server_default="0"),
    Column("logged_off", Integer, nullable=False, server_default="0"),
    Column("errors", Integer, nullable=False, server_default="0"),
    Column("last_error", String(1024), nullable=False, server_default=""),
    Column("next_logoff_at", UtcDateTime, nullable=True),
    Column("detail", String(1024), nullable=False, server_default=""),
)
Index("ix_drains_step_next_at", drains.c.step, drains.c.next_at)

# What a drain did to each session: messaged once; a failed action is tried again at retry_at.
drain_sessions = Table(
    "drain_sessions",
    metadata,
    Column(
        "server_address",
        String(255),
        ForeignKey("drains.server_address", ondelete="CASCADE", onupdate="CASCADE"),
        primary_key=True,
    ),
    Column("session_id", String(32), primary_key=True),
    Column("messaged_at", UtcDateTime, nullable=True),
    Column("retry_at", UtcDateTime, nullable=True),
    Column("failures", Integer, nullable=False, server_default="0"),
)

# Refused Route calls per minute and reason (migration 0013, refusals.py): each replica counts its own
# in memory and adds them here at its sweep, so the dashboard's history shows refusals beside the logons
# of `connections` without a write per refused call.
route_refusals = Table(
    "route_refusals",
    metadata,
    Column("minute", UtcDateTime, primary_key=True),  # the minute's start
    Column("reason", String(32), primary_key=True),  # the gRPC status: resource_exhausted, not_found, ...
    Column("count", Integer, nullable=False),
)
