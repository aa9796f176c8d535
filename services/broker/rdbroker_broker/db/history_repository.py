"""Queries for the dashboard's history and session counts (history.py), inside the caller's transaction.

Logons come from `connections` (every Route answer, kept `retention_s`): one range read on its
`created_at` index, counted per minute in the database, so the answer is at most one row per minute
and reason however many connections the hours held.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, cast, delete, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import connections, route_refusals, sessions

LIVE = [s.value for s in d.LIVE_STATES]


def _minute(conn: AsyncConnection) -> Any:
    """The minute since the epoch of a connection's created_at, as an integer."""
    if conn.dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", connections.c.created_at) / 60), BigInteger)
    # SQLite stores UTC as text ("2026-12-07 13:52:01.123456"); %s reads it as UTC. `/` of two integers
    # is integer division there (SQLAlchemy's own `/` would add 0.0 and make it a float).
    return cast(func.strftime("%s", connections.c.created_at), Integer).op("/")(literal(60, Integer))


class HistoryRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def answers_per_minute(self, since: datetime, until: datetime) -> list[tuple[int, str, int]]:
        """(minute since the epoch, reason, count) of the first answers (attempt 0: a client's new
        connection, not a proxy's retry after a failure) given in [since, until)."""
        minute = _minute(self.conn).label("minute")
        query = (
            select(minute, connections.c.reason, func.count().label("n"))
            .where(
                connections.c.created_at >= since,
                connections.c.created_at < until,
                connections.c.attempt == 0,
            )
            .group_by(minute, connections.c.reason)
            .order_by(minute)
        )
        return [(int(m), str(reason), int(n)) for m, reason, n in await self.conn.execute(query)]

    async def refusals(self, since: datetime, until: datetime) -> list[tuple[datetime, str, int]]:
        """(minute, reason, count) of the refused Routes the replicas have written (refusals.py)."""
        t = route_refusals
        query = (
            select(t.c.minute, t.c.reason, t.c.count)
            .where(t.c.minute >= since, t.c.minute < until)
            .order_by(t.c.minute)
        )
        return [(m, str(reason), int(n)) for m, reason, n in await self.conn.execute(query)]

    async def live_states(self, addresses: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """Live sessions per server and state (`{address: {state: count}}`), all servers or these."""
        address: Any = sessions.c.server_address
        if self.conn.dialect.name == "sqlite":
            # Grouping by the bare column, SQLite scans all of (server_address, state), ended sessions
            # included (35-50 ms with 300,000); as an expression it reads the live ones by state (7-15 ms).
            address = (address + "").label("server_address")
        query = (
            select(address, sessions.c.state, func.count())
            .where(sessions.c.state.in_(LIVE))
            .group_by(address, sessions.c.state)
        )
        if addresses:
            query = query.where(sessions.c.server_address.in_(list(addresses)))
        counts: dict[str, dict[str, int]] = {}
        for address, state, n in await self.conn.execute(query):
            counts.setdefault(address, {})[state] = int(n)
        return counts


async def purge_refusals(conn: AsyncConnection, before: datetime) -> int:
    result = await conn.execute(delete(route_refusals).where(route_refusals.c.minute < before))
    return int(result.rowcount)
