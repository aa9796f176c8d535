"""What the sweep and the proxies' heartbeats do to sessions: expire those whose time is up,
disconnect the sessions of a silent proxy or those a heartbeat no longer lists, revive those a
heartbeat lists again, and purge ended ones in bounded batches. A mixin of `SessionRepository`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import ENDED_SQL, connections, servers, sessions

# A session disconnected for want of news, not because its connection was seen to close: a silent
# proxy (the sweep) or a heartbeat's list that did not show its connection.
NEWS_LOST = ("proxy_silent", "connection_lost")


class SessionSweeps:
    conn: AsyncConnection  # given by SessionRepository

    async def expire(self, now: datetime, limit: int | None = None) -> int:
        """End pending and disconnected sessions whose time is up (at most `limit` of each state)."""
        total = 0
        for state, reason in (("pending", "pending_expired"), ("disconnected", "disconnect_timeout")):
            due: Any = and_(sessions.c.state == state, sessions.c.expires_at < now)
            if limit is not None:
                some = select(sessions.c.id).where(due).limit(limit).scalar_subquery()
                due = sessions.c.id.in_(some)
            result = await self.conn.execute(
                update(sessions)
                .where(due)
                .values(state="ended", end_reason=reason, ended_at=now, updated_at=now, expires_at=None)
            )
            total += int(result.rowcount)
        return total

    async def disconnect_orphans(
        self, pool: d.Pool, alive_proxies: Any, silent_since: datetime, now: datetime
    ) -> int:
        """Active sessions whose proxy has gone silent become disconnected (they keep their user)."""
        result = await self.conn.execute(
            update(sessions)
            .where(
                sessions.c.pool == pool.name,
                sessions.c.state == "active",
                sessions.c.learnt_from == "route",
                sessions.c.proxy_id.is_not(None),
                sessions.c.proxy_id.not_in(alive_proxies),
                sessions.c.updated_at < silent_since,
            )
            .values(
                state="disconnected",
                disconnected_at=now,
                expires_at=now + timedelta(seconds=pool.disconnect_timeout_s),
                updated_at=now,
                end_reason=NEWS_LOST[0],
            )
        )
        return int(result.rowcount)

    async def disconnect_unlisted(
        self, pool: d.Pool, proxy_id: str, open_ids: Sequence[str], before: datetime, now: datetime
    ) -> int:
        """A proxy's heartbeat lists its open connections: its active sessions on any other
        connection (opened before `before`, so not racing the heartbeat) lost their close report."""
        result = await self.conn.execute(
            update(sessions)
            .where(
                sessions.c.pool == pool.name,
                sessions.c.proxy_id == proxy_id,
                sessions.c.state == "active",
                sessions.c.learnt_from == "route",
                sessions.c.connection_id.is_not(None),  # none: the agent saw it attached without a proxy
                _not_listed(self.conn, open_ids),
                sessions.c.updated_at < before,
            )
            .values(
                state="disconnected",
                disconnected_at=now,
                expires_at=now + timedelta(seconds=pool.disconnect_timeout_s),
                updated_at=now,
                end_reason=NEWS_LOST[1],
            )
        )
        return int(result.rowcount)

    async def lock_proxy_servers(self, proxy_id: str) -> None:
        """Lock, in address order, the servers of the proxy's sessions a heartbeat may change (active,
        or disconnected for want of news): a transaction that writes several server rows (by the
        sessions' triggers) takes them in one order, so it never waits for another in a cycle.
        SQLite has no row locks: its one writer at a time needs none."""
        if self.conn.dialect.name != "postgresql":
            return
        touched = select(sessions.c.server_address).where(
            sessions.c.proxy_id == proxy_id,
            (sessions.c.state == "active")
            | ((sessions.c.state == "disconnected") & sessions.c.end_reason.in_(NEWS_LOST)),
        )
        await self.conn.execute(
            select(servers.c.address)
            .where(servers.c.address.in_(touched))
            .order_by(servers.c.address)
            .with_for_update()
        )

    async def revive_listed(self, proxy_id: str, open_ids: Sequence[str], now: datetime) -> int:
        """A proxy's heartbeat lists these connections as open: its sessions on them that were marked
        disconnected for want of news (a silent proxy, a list that missed them) are active again.
        Not one whose connection has been reported closed (a heartbeat sent before the close)."""
        closed = (
            select(connections.c.connection_id)
            .where(
                connections.c.connection_id == sessions.c.connection_id,
                connections.c.closed_at.is_not(None),
            )
            .exists()
        )
        result = await self.conn.execute(
            update(sessions)
            .where(
                sessions.c.proxy_id == proxy_id,
                sessions.c.state == "disconnected",
                sessions.c.end_reason.in_(NEWS_LOST),
                _listed(self.conn, open_ids),
                ~closed,
            )
            .values(state="active", disconnected_at=None, expires_at=None, end_reason="", updated_at=now)
        )
        return int(result.rowcount)

    async def purge_ended(self, before: datetime, limit: int) -> int:
        """Delete at most `limit` sessions ended before `before` (a bounded transaction)."""
        some = (
            select(sessions.c.id)
            # Spelt as the partial index's condition (SQLite uses it only then): ix_sessions_ended_at.
            .where(text(ENDED_SQL), sessions.c.ended_at < before)
            .limit(limit)
            .scalar_subquery()
        )
        result = await self.conn.execute(delete(sessions).where(sessions.c.id.in_(some)))
        return int(result.rowcount)


def _listed(conn: AsyncConnection, ids: Sequence[str]) -> Any:
    """`connection_id` among `ids` (one parameter whatever the list's length, as `_not_listed`)."""
    if conn.dialect.name == "postgresql":
        return sessions.c.connection_id == func.any(bindparam("open_ids", list(ids), type_=ARRAY(String)))
    return sessions.c.connection_id.in_(_json_values(ids))


def _not_listed(conn: AsyncConnection, ids: Sequence[str]) -> Any:
    """`connection_id` not among `ids`: one array parameter on PostgreSQL (a list of bound parameters
    would hit the 65535-parameter limit on a busy proxy), one JSON parameter on SQLite."""
    if conn.dialect.name == "postgresql":
        return sessions.c.connection_id != func.all(bindparam("open_ids", list(ids), type_=ARRAY(String)))
    return sessions.c.connection_id.not_in(_json_values(ids))


def _json_values(ids: Sequence[str]) -> Any:
    """`SELECT value FROM json_each(?)` on SQLite: the list as one JSON parameter. A list of bound
    parameters fails with "too many SQL variables" past 999 on SQLite builds older than 3.32 (and on
    builds configured lower), and a proxy holding 5,000 connections lists them all."""
    each = func.json_each(bindparam("open_ids", json.dumps(list(ids)), type_=String)).table_valued("value")
    return select(each.c.value)
