"""What every repository shares: the live states as stored, the dialect's upsert, and rows read
into domain objects (`server_from_row`, `session_from_row`, `pool_from_row`) with the column lists
the hot statements select, so that a statement and its reader name the same columns.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import servers, sessions

LIVE = [s.value for s in d.LIVE_STATES]


def upsert(conn: AsyncConnection, table: Any) -> Any:
    """The dialect's INSERT with ON CONFLICT support (PostgreSQL and SQLite spell it the same)."""
    return pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)


# Only what `server_from_row` / `session_from_row` read: fewer columns, less result processing.
SERVER_COLUMNS = [
    servers.c[name]
    for name in (
        "address", "pool", "weight", "max_sessions", "admin_state", "health", "agent_state", "load",
        "placements_since_report", "live_sessions", "held_sessions", "agent_url", "sessions_url",
        "health_detail", "agent_detail", "health_changed_at", "probed_at", "fresh_until", "power",
    )
]  # fmt: skip
SESSION_COLUMNS = [
    sessions.c[name]
    for name in (
        "id", "user", "pool", "server_address", "state", "created_at", "updated_at", "disconnected_at",
        "expires_at", "end_reason", "confirmed",
    )
]  # fmt: skip


def server_from_row(row: Row[Any]) -> d.Server:
    m = row._mapping
    return d.Server(
        address=m["address"],
        pool=m["pool"],
        weight=m["weight"],
        max_sessions=m["max_sessions"],
        admin_state=d.AdminState(m["admin_state"]),
        health=d.Health(m["health"]),
        agent_state=d.AgentState(m["agent_state"]),
        load=m["load"],
        placements_since_report=m["placements_since_report"],
        live_sessions=m["live_sessions"],
        held_sessions=m["held_sessions"],
        agent_url=m["agent_url"],
        sessions_url=m["sessions_url"],
        health_detail=m["health_detail"],
        agent_detail=m["agent_detail"],
        health_changed_at=m["health_changed_at"],
        probed_at=m["probed_at"],
        fresh_until=m["fresh_until"],
        power=d.PowerState(m["power"]),
    )


def session_from_row(row: Row[Any]) -> d.Session:
    m = row._mapping
    return d.Session(
        session_id=m["id"],
        user=m["user"],
        pool=m["pool"],
        server_address=m["server_address"],
        state=d.SessionState(m["state"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        disconnected_at=m["disconnected_at"],
        expires_at=m["expires_at"],
        end_reason=m["end_reason"],
        confirmed=bool(m["confirmed"]),
    )


def pool_from_row(row: Row[Any]) -> d.Pool:
    m = row._mapping
    return d.Pool(
        name=m["name"],
        is_default=m["is_default"],
        disconnect_timeout_s=m["disconnect_timeout_s"],
        probe_interval_ms=m["probe_interval_ms"],
        probe_timeout_ms=m["probe_timeout_ms"],
        probe_rise=m["probe_rise"],
        probe_fall=m["probe_fall"],
        domain=m["domain"],
        upn_suffixes=tuple(x for x in m["upn_suffixes"].split(",") if x),
        junk_bytes=m["junk_bytes"],
        confirm_timeout_s=m["confirm_timeout_s"],
        sessions_interval_ms=m["sessions_interval_ms"],
        stale_after_ms=m["stale_after_ms"],
        logon_lag_s=m["logon_lag_s"],
        honor_routing_tokens=m["honor_routing_tokens"],
        placement=d.Placement(m["placement"]),
    )
