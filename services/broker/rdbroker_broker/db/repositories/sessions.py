"""Sessions as the use cases read them: by id, a user's live one, the Route's context (pool, live
session and its server in one prebuilt statement), the live ones in key ranges or on a server.
`SessionRepository` adds to these reads the changes (`session_changes`) and the heartbeats' and
sweep's updates (`session_sweeps`), so the use cases hold one repository per table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, String, and_, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories.rows import (
    LIVE,
    SERVER_COLUMNS,
    SESSION_COLUMNS,
    pool_from_row,
    server_from_row,
    session_from_row,
)
from rdbroker_broker.db.repositories.session_changes import SessionChanges
from rdbroker_broker.db.repositories.session_sweeps import SessionSweeps
from rdbroker_broker.db.tables import LIVE_STATES_SQL, pools, servers, sessions

# The Route hot path runs prebuilt statements with bound parameters: building a statement costs
# more Python time than the database takes to answer it.
_ROUTE_CONTEXT_JOIN = pools.outerjoin(
    sessions,
    and_(
        sessions.c.pool == pools.c.name,
        sessions.c.user_key == bindparam("user_key"),
        sessions.c.state.in_(LIVE),
    ),
).outerjoin(servers, servers.c.address == sessions.c.server_address)
_ROUTE_CONTEXT_COLUMNS = [
    pools.c.name.label("pool_name"),
    pools.c.is_default,
    pools.c.disconnect_timeout_s,
    pools.c.domain,
    pools.c.upn_suffixes,
    pools.c.honor_routing_tokens,
    pools.c.placement,
    *[c.label(f"s_{c.name}") for c in SESSION_COLUMNS],
    *[c.label(f"v_{c.name}") for c in SERVER_COLUMNS],
]
_ROUTE_CONTEXT = {
    True: select(*_ROUTE_CONTEXT_COLUMNS).select_from(_ROUTE_CONTEXT_JOIN).where(pools.c.is_default),
    False: select(*_ROUTE_CONTEXT_COLUMNS)
    .select_from(_ROUTE_CONTEXT_JOIN)
    .where(pools.c.name_key == bindparam("pool_key")),
}
_POOL_DEFAULT = select(pools).where(pools.c.is_default)
_POOL_NAMED = select(pools).where(pools.c.name_key == bindparam("pool_key"))


class _Prefixed:
    """A row mapping seen through a column-label prefix (for joined rows)."""

    def __init__(self, mapping: Any, prefix: str) -> None:
        self._mapping = {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)}


def _prefixed(mapping: Any, prefix: str) -> Any:
    return _Prefixed(mapping, prefix)


def _byte_order(conn: AsyncConnection, column: Any, op: str, value: str) -> Any:
    """`column op value` in code-point order: PostgreSQL's byte-order operators (the indexes use
    text_pattern_ops); SQLite compares text by bytes already."""
    if conn.dialect.name == "postgresql":
        pattern = {">=": "~>=~", "<": "~<~"}[op]
        return column.op(pattern, is_comparison=True)(bindparam(None, value, type_=String))
    return column >= value if op == ">=" else column < value


class SessionRepository(SessionChanges, SessionSweeps):
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def get(self, session_id: str) -> d.Session | None:
        row = (await self.conn.execute(select(sessions).where(sessions.c.id == session_id))).first()
        return session_from_row(row) if row else None

    async def live_for_user(self, pool: str, key: str) -> d.Session | None:
        query = select(sessions).where(
            sessions.c.pool == pool, sessions.c.user_key == key, sessions.c.state.in_(LIVE)
        )
        row = (await self.conn.execute(query)).first()
        return session_from_row(row) if row else None

    async def route_context(
        self, pool: str, key: str
    ) -> tuple[d.Pool, d.Session | None, d.Server | None] | None:
        """The pool ("" = the default), the user's live session in it and that session's server."""
        if not key:
            query = _POOL_NAMED if pool else _POOL_DEFAULT
            row = (await self.conn.execute(query, {"pool_key": pool.casefold()})).first()
            return (pool_from_row(row), None, None) if row else None
        params = {"user_key": key, "pool_key": pool.casefold()}
        row = (await self.conn.execute(_ROUTE_CONTEXT[not pool], params)).first()
        if row is None:
            return None
        m = row._mapping
        suffixes = tuple(x for x in m["upn_suffixes"].split(",") if x)
        found = d.Pool(
            m["pool_name"],
            m["is_default"],
            m["disconnect_timeout_s"],
            domain=m["domain"],
            upn_suffixes=suffixes,
            honor_routing_tokens=m["honor_routing_tokens"],
            placement=d.Placement(m["placement"]),
        )
        if m["s_id"] is None:
            return found, None, None
        session = session_from_row(_prefixed(m, "s_"))
        server = server_from_row(_prefixed(m, "v_")) if m["v_address"] is not None else None
        return found, session, server

    async def live_in_ranges(self, pool: str, probes: accounts.Probes, limit: int = 50) -> list[d.Session]:
        """Live sessions in the pool whose key or user part falls in one of the ranges (each one probe
        of a byte-order index), at most `limit` per range."""
        found: dict[str, d.Session] = {}
        for column, ranges in (
            (sessions.c.user_key, probes.key_ranges),
            (sessions.c.account_name, probes.name_ranges),
        ):
            for lo, hi in ranges:
                query = select(sessions).where(
                    sessions.c.pool == pool,
                    # Spelt as the partial indexes' condition: SQLite uses a partial index only when
                    # the query's terms imply its WHERE, and `state IN (?, ?, ?)` does not (it then
                    # walked every live session by the state index, for each new placement).
                    text(LIVE_STATES_SQL),
                    _byte_order(self.conn, column, ">=", lo),
                    _byte_order(self.conn, column, "<", hi),
                )
                for row in await self.conn.execute(query.limit(limit)):
                    session = session_from_row(row)
                    found.setdefault(session.session_id, session)
        return list(found.values())

    async def live_on_server(self, address: str) -> list[tuple[d.Session, str]]:
        """Live sessions on a server with how each was learnt ("route" or "agent")."""
        query = select(sessions).where(sessions.c.server_address == address, sessions.c.state.in_(LIVE))
        return [(session_from_row(r), r._mapping["learnt_from"]) for r in await self.conn.execute(query)]

    async def for_user(self, key: str, pool: str, include_ended: bool, limit: int = 100) -> list[d.Session]:
        return await self.for_keys([key], pool, include_ended, limit)

    async def for_keys(
        self, keys: Sequence[str], pool: str, include_ended: bool, limit: int = 100
    ) -> list[d.Session]:
        query = select(sessions).where(sessions.c.user_key.in_(list(keys)))
        if pool:
            query = query.where(sessions.c.pool == pool)
        if not include_ended:
            query = query.where(sessions.c.state.in_(LIVE))
        query = query.order_by(sessions.c.created_at.desc()).limit(limit)
        return [session_from_row(r) for r in await self.conn.execute(query)]

    async def field(self, session_id: str, *names: str) -> Row[Any] | None:
        columns = [sessions.c[name] for name in names]
        return (await self.conn.execute(select(*columns).where(sessions.c.id == session_id))).first()
