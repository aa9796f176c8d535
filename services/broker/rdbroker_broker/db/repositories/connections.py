"""Connections through the proxies: the answer given to each attempt (stored once, read back on a
retry), opened and closed reports, whether a session's user is logging on now, and the purge.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import connections, sessions

_INSERT_CONNECTION = {
    name: factory(connections)
    .on_conflict_do_nothing(index_elements=[connections.c.connection_id, connections.c.attempt])
    .returning(connections.c.attempt)
    for name, factory in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
_ANSWERS = select(
    connections.c.attempt,
    connections.c.server_address,
    connections.c.session_id,
    connections.c.reason,
    connections.c.user,
    connections.c.pool,
).where(connections.c.connection_id == bindparam("connection_id"))


class ConnectionRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def logging_on(self, session_id: str, since: datetime) -> bool:
        """Whether the session's current proxy connection is open and opened at or after `since`."""
        query = (
            select(connections.c.connection_id)
            .join(sessions, sessions.c.connection_id == connections.c.connection_id)
            .where(
                sessions.c.id == session_id,
                connections.c.session_id == session_id,
                connections.c.closed_at.is_(None),
                connections.c.opened_at >= since,
            )
            .limit(1)
        )
        return (await self.conn.execute(query)).first() is not None

    async def answers(self, connection_id: str) -> dict[int, d.RouteDecision]:
        """Every answer already given for this connection, by attempt."""
        return {
            row.attempt: d.RouteDecision(
                server_address=row.server_address,
                session_id=row.session_id,
                reason=d.RouteReason(row.reason),
                user=row.user,
                pool=row.pool,
            )
            for row in await self.conn.execute(_ANSWERS, {"connection_id": connection_id})
        }

    async def record(self, request: d.RouteRequest, decision: d.RouteDecision, now: datetime) -> bool:
        """Store the answer; False when this (connection_id, attempt) already has one."""
        result = await self.conn.execute(
            _INSERT_CONNECTION[self.conn.dialect.name],
            {
                "connection_id": request.connection_id,
                "attempt": request.attempt,
                "session_id": decision.session_id,
                "proxy_id": request.proxy_id,
                "server_address": decision.server_address,
                "reason": decision.reason.value,
                "user": decision.user,
                "pool": decision.pool,
                "client_address": request.client_address,
                "created_at": now,
                "opened_at": None,
                "closed_at": None,
                "bytes_from_client": 0,
                "bytes_from_server": 0,
                "duration_ms": 0,
                "end_reason": "",
            },
        )
        return result.first() is not None

    async def opened(self, connection_id: str, now: datetime) -> None:
        await self.conn.execute(
            update(connections)
            .where(connections.c.connection_id == connection_id, connections.c.opened_at.is_(None))
            .values(opened_at=now)
        )

    async def closed(
        self,
        connection_id: str,
        *,
        bytes_from_client: int,
        bytes_from_server: int,
        duration_ms: int,
        end_reason: str,
        now: datetime,
    ) -> None:
        await self.conn.execute(
            update(connections)
            .where(connections.c.connection_id == connection_id, connections.c.closed_at.is_(None))
            .values(
                closed_at=now,
                bytes_from_client=bytes_from_client,
                bytes_from_server=bytes_from_server,
                duration_ms=duration_ms,
                end_reason=end_reason,
            )
        )

    async def purge(self, before: datetime, limit: int) -> int:
        """Delete at most `limit` connections made before `before` (a bounded transaction)."""
        some = select(connections.c.connection_id, connections.c.attempt).where(
            connections.c.created_at < before
        )
        key = tuple_(connections.c.connection_id, connections.c.attempt)
        result = await self.conn.execute(delete(connections).where(key.in_(some.limit(limit))))
        return int(result.rowcount)
