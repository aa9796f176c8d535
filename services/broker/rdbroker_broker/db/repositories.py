"""Queries on pools, servers, sessions and connections. Repositories take a connection inside the
caller's transaction, return domain objects, and never commit (the use case owns the transaction).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, String, and_, bindparam, case, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import ENDED_SQL, LIVE_STATES_SQL, connections, pools, servers, sessions
from rdbroker_broker.errors import InvalidInput

LIVE = [s.value for s in d.LIVE_STATES]
# A session disconnected for want of news, not because its connection was seen to close: a silent
# proxy (the sweep) or a heartbeat's list that did not show its connection.
NEWS_LOST = ("proxy_silent", "connection_lost")


def upsert(conn: AsyncConnection, table: Any) -> Any:
    """The dialect's INSERT with ON CONFLICT support (PostgreSQL and SQLite spell it the same)."""
    return pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)


def new_session_id() -> str:
    return uuid.uuid4().hex


class _Prefixed:
    """A row mapping seen through a column-label prefix (for joined rows)."""

    def __init__(self, mapping: Any, prefix: str) -> None:
        self._mapping = {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix)}


def _prefixed(mapping: Any, prefix: str) -> Any:
    return _Prefixed(mapping, prefix)


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
_SERVERS_IN_POOL = (
    select(*SERVER_COLUMNS).where(servers.c.pool == bindparam("pool")).order_by(servers.c.address)
)
# The best-ranked server no other transaction holds, in one statement (PostgreSQL arrays).
_RANKED = bindparam("ranked", type_=ARRAY(String))
_LOCK_BEST_SERVER = (
    select(*SERVER_COLUMNS)
    .where(servers.c.address == func.any(_RANKED))
    .order_by(func.array_position(_RANKED, servers.c.address))
    .limit(1)
    .with_for_update(skip_locked=True)
)
_SERVER = select(*SERVER_COLUMNS).where(servers.c.address == bindparam("address"))
_LOCK_SERVER_WAIT = select(*SERVER_COLUMNS).where(servers.c.address == bindparam("address")).with_for_update()
# Claims that never became sessions on their server: ended before the proxy reported them open,
# or ended for carrying next to nothing (`abandoned`) or a failed connect. They never show in a load.
NEVER_SESSIONS = ("abandoned", "connect_failed", "closed_before_open", "pending_expired")


def _unseen_placements(address: str, since: datetime) -> Any:
    """How many Route placements on `address` were made after `since` (ix_sessions_server_created)."""
    never = and_(
        sessions.c.state == "ended",
        sessions.c.opened_at.is_(None) | sessions.c.end_reason.in_(NEVER_SESSIONS),
    )
    return (
        select(func.count())
        .select_from(sessions)
        .where(
            sessions.c.server_address == address,
            sessions.c.created_at > since,
            sessions.c.learnt_from == "route",
            ~never,
        )
        .scalar_subquery()
    )


_LIVE_USER_INDEX_WHERE = text(f"{LIVE_STATES_SQL} AND user_key IS NOT NULL")
_INSERT_SESSION = {
    name: factory(sessions)
    .on_conflict_do_nothing(
        index_elements=[sessions.c.pool, sessions.c.user_key], index_where=_LIVE_USER_INDEX_WHERE
    )
    .returning(sessions.c.id)
    for name, factory in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}
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


class PoolRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def resolve(self, name: str) -> d.Pool | None:
        """The pool named `name` (case-insensitively), or the default pool for ""."""
        query = select(pools)
        query = (
            query.where(pools.c.is_default) if not name else query.where(pools.c.name_key == name.casefold())
        )
        row = (await self.conn.execute(query)).first()
        return pool_from_row(row) if row else None

    async def list(self) -> list[d.Pool]:
        rows = await self.conn.execute(select(pools).order_by(pools.c.name))
        return [pool_from_row(r) for r in rows]

    async def upsert(self, pool: d.Pool, now: datetime) -> None:
        values = {
            "name": pool.name,
            "name_key": pool.name.casefold(),
            "is_default": pool.is_default,
            "disconnect_timeout_s": pool.disconnect_timeout_s,
            "probe_interval_ms": pool.probe_interval_ms,
            "probe_timeout_ms": pool.probe_timeout_ms,
            "probe_rise": pool.probe_rise,
            "probe_fall": pool.probe_fall,
            "domain": pool.domain,
            "upn_suffixes": ",".join(s for s in pool.upn_suffixes if s),  # as `pool_from_row` reads it
            "junk_bytes": pool.junk_bytes,
            "confirm_timeout_s": pool.confirm_timeout_s,
            "sessions_interval_ms": pool.sessions_interval_ms,
            "stale_after_ms": pool.stale_after_ms,
            "logon_lag_s": pool.logon_lag_s,
            "honor_routing_tokens": pool.honor_routing_tokens,
            "placement": pool.placement.value,
            "updated_at": now,
        }
        stmt = upsert(self.conn, pools).values(**values, created_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[pools.c.name], set_=values)
        await self.conn.execute(stmt)

    async def clear_default(self, except_name: str) -> None:
        await self.conn.execute(
            update(pools).where(pools.c.is_default, pools.c.name != except_name).values(is_default=False)
        )

    async def delete(self, name: str) -> None:
        await self.conn.execute(delete(pools).where(pools.c.name == name))


class ServerRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def get(self, address: str) -> d.Server | None:
        row = (await self.conn.execute(select(servers).where(servers.c.address == address))).first()
        return server_from_row(row) if row else None

    async def list(self, pool: str = "") -> list[d.Server]:
        if pool:
            return [server_from_row(r) for r in await self.conn.execute(_SERVERS_IN_POOL, {"pool": pool})]
        query = select(servers).order_by(servers.c.pool, servers.c.address)
        return [server_from_row(r) for r in await self.conn.execute(query)]

    async def lock_first(self, ranked: Sequence[str]) -> d.Server | None:
        """Lock the best-ranked server no other transaction holds (SKIP LOCKED), fresh from the table.

        Concurrent placements then fan out over the next-best servers instead of queueing on one
        row. SQLite has no row locks; its single connection serialises transactions instead.
        """
        if self.conn.dialect.name != "postgresql":
            row = (await self.conn.execute(_SERVER, {"address": ranked[0]})).first()
        else:
            row = (await self.conn.execute(_LOCK_BEST_SERVER, {"ranked": list(ranked)})).first()
        return server_from_row(row) if row else None

    async def lock(self, address: str) -> d.Server | None:
        """Wait for the row lock on one server (when every candidate is momentarily locked)."""
        row = (await self.conn.execute(_LOCK_SERVER_WAIT, {"address": address})).first()
        return server_from_row(row) if row else None

    async def set_admin_state(self, address: str, state: d.AdminState, now: datetime) -> bool:
        result = await self.conn.execute(
            update(servers)
            .where(servers.c.address == address)
            .values(admin_state=state.value, updated_at=now)
        )
        return bool(result.rowcount)

    async def record_probe(
        self, result: d.ProbeResult, now: datetime, stale_after: timedelta, logon_lag: timedelta
    ) -> None:
        """Store a health result; it counts until its time plus `stale_after` (`fresh_until`).

        With a load figure, `placements_since_report` becomes the server's placements that figure
        cannot show yet: made by Route after the result's time less `logon_lag` (users still logging
        on), claims that never became sessions left out. The insert trigger adds each later one.
        """
        # The result's time, never later than the broker's own: a replica's clock running ahead
        # must not keep its results fresh for longer.
        at = min(result.probed_at or now, now)
        detail = result.rdp_detail[:255]
        values: dict[str, Any] = {
            "health": result.health.value,
            "health_changed_at": case(
                (servers.c.health != result.health.value, now), else_=servers.c.health_changed_at
            ),
            "health_detail": detail,
            "agent_state": result.agent_state.value,
            "agent_detail": result.agent_detail[:255],
            "load": result.load,
            "probed_at": result.probed_at or now,
            "fresh_until": at + stale_after,
        }
        if not result.rdp_ok and result.health is not d.Health.DOWN:
            # A failed probe never proves a server up: a server recorded down (by the broker's own
            # failover probe, before the replica's fall count got there) stays down.
            kept = servers.c.health == d.Health.DOWN.value
            values["health"] = case((kept, servers.c.health), else_=result.health.value)
            values["health_changed_at"] = case(
                (kept | (servers.c.health == result.health.value), servers.c.health_changed_at), else_=now
            )
            values["health_detail"] = case((kept, servers.c.health_detail), else_=detail)
        if result.load >= 0:
            values["load_reported_at"] = at
            values["placements_since_report"] = _unseen_placements(result.address, at - logon_lag)
            if self.conn.dialect.name == "postgresql":
                # Lock the row before counting: a placement committing meanwhile (its trigger holds
                # this lock) is then seen by the count (READ COMMITTED: a new snapshot per
                # statement), and a later one adds itself to the count after this update.
                await self.conn.execute(_LOCK_SERVER_WAIT, {"address": result.address})
        await self.conn.execute(update(servers).where(servers.c.address == result.address).values(**values))

    async def record_down(self, address: str, detail: str, now: datetime, fresh_until: datetime) -> None:
        """The broker's own probe failed: the server is down from now, as a health result says it."""
        await self.conn.execute(
            update(servers)
            .where(servers.c.address == address)
            .values(
                health=d.Health.DOWN.value,
                health_changed_at=case(
                    (servers.c.health != d.Health.DOWN.value, now), else_=servers.c.health_changed_at
                ),
                health_detail=detail[:255],
                probed_at=now,
                fresh_until=fresh_until,
            )
        )

    async def upsert(self, server: d.Server, now: datetime) -> None:
        values = {
            "pool": server.pool,
            "weight": server.weight,
            "max_sessions": server.max_sessions,
            "agent_url": server.agent_url,
            "sessions_url": server.sessions_url,
            "updated_at": now,
        }
        stmt = upsert(self.conn, servers).values(address=server.address, created_at=now, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[servers.c.address], set_=values)
        await self.conn.execute(stmt)

    async def delete(self, address: str) -> None:
        await self.conn.execute(delete(servers).where(servers.c.address == address))


class SessionRepository:
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

    async def insert(
        self,
        *,
        pool: str,
        user: str,
        server_address: str,
        state: d.SessionState,
        now: datetime,
        expires_at: datetime | None,
        origin_connection_id: str | None = None,
        proxy_id: str | None = None,
        client_address: str = "",
        learnt_from: str = "route",
        confirmed: bool = False,
        rules: accounts.Rules = accounts.NO_RULES,
    ) -> str | None:
        """Insert a session, keyed on its account's canonical key in the pool's `rules`; None when
        that account already has a live one in the pool (the unique index)."""
        session_id = new_session_id()
        account = _fitting(user, rules) if user else None
        values = {
            "id": session_id,
            "pool": pool,
            "user": user,
            "user_key": account.key if account else None,
            "account_name": account.name if account else None,
            "server_address": server_address,
            "state": state.value,
            "learnt_from": learnt_from,
            "origin_connection_id": origin_connection_id,
            "proxy_id": proxy_id,
            "client_address": client_address,
            "created_at": now,
            "updated_at": now,
            "disconnected_at": now if state is d.SessionState.DISCONNECTED else None,
            "expires_at": expires_at,
            "end_reason": "",
            "confirmed": confirmed,
        }
        # Without a user there is no unique key to conflict on: the statement works the same.
        result = await self.conn.execute(_INSERT_SESSION[self.conn.dialect.name], values)
        inserted: str | None = result.scalar_one_or_none()
        return inserted

    async def end(self, session_id: str, reason: str, now: datetime) -> bool:
        result = await self.conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.state.in_(LIVE))
            .values(state="ended", end_reason=reason, ended_at=now, updated_at=now, expires_at=None)
        )
        return bool(result.rowcount)

    async def open(self, session_id: str, connection_id: str, proxy_id: str, now: datetime) -> int:
        result = await self.conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id)
            .values(
                state="active",
                connection_id=connection_id,
                proxy_id=proxy_id,
                opened_at=func.coalesce(sessions.c.opened_at, now),
                disconnected_at=None,
                expires_at=None,
                ended_at=None,
                end_reason="",
                updated_at=now,
            )
        )
        return int(result.rowcount)

    async def disconnect(self, session_id: str, now: datetime, expires_at: datetime) -> bool:
        result = await self.conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.state == "active")
            .values(state="disconnected", disconnected_at=now, expires_at=expires_at, updated_at=now)
        )
        return bool(result.rowcount)

    async def field(self, session_id: str, *names: str) -> Row[Any] | None:
        columns = [sessions.c[name] for name in names]
        return (await self.conn.execute(select(*columns).where(sessions.c.id == session_id))).first()

    async def relabel(
        self, session_id: str, user: str, now: datetime, rules: accounts.Rules = accounts.NO_RULES
    ) -> None:
        account = _fitting(user, rules)
        await self.conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id)
            .values(user=user, user_key=account.key, account_name=account.name, updated_at=now)
        )

    async def rekey_pool(self, pool: str, rules: accounts.Rules, now: datetime) -> tuple[int, list[str]]:
        """Store every live session of the pool under its account's key in `rules` (a pool's domain
        or UPN suffixes changed). A session whose new key another live session holds keeps its key:
        answers how many were re-keyed, and the ids of those skipped."""
        query = select(sessions.c.id, sessions.c.user, sessions.c.user_key, sessions.c.account_name).where(
            sessions.c.pool == pool, sessions.c.state.in_(LIVE), sessions.c.user_key.is_not(None)
        )
        rows = list(await self.conn.execute(query))
        taken = {row.user_key for row in rows}
        changes = []
        for row in rows:
            account = accounts.resolve(row.user, rules)
            if (account.key, account.name) != (row.user_key, row.account_name):
                changes.append((row, account))
        rekeyed, skipped = 0, []
        # Keys being given up first, so that two sessions may swap nothing but their own keys.
        for row, account in changes:
            if account.key != row.user_key and account.key in taken:
                skipped.append(row.id)
                continue
            await self.conn.execute(
                update(sessions)
                .where(sessions.c.id == row.id)
                .values(user_key=account.key, account_name=account.name, updated_at=now)
            )
            taken.discard(row.user_key)
            taken.add(account.key)
            rekeyed += 1
        return rekeyed, skipped

    async def confirm(self, session_id: str) -> bool:
        """The server's agent listed the session's user there: it holds capacity while disconnected."""
        result = await self.conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.state.in_(LIVE), sessions.c.confirmed.is_(False))
            .values(confirmed=True)
        )
        return bool(result.rowcount)

    async def set_state_from_agent(
        self,
        session_id: str,
        was: d.SessionState,
        state: d.SessionState,
        listed_at: datetime,
        expires_at: datetime | None,
    ) -> bool:
        """The state the agent listed at `listed_at`, unless the session changed since (a proxy event
        the list could not show: the guard also covers one committed after we read the row).

        The agent's word then owns the state: the end reason a proxy's silence left is cleared (a
        heartbeat must not revive what the server calls disconnected), and a session the server calls
        active while no proxy connection is open keeps no connection id (a heartbeat must not disconnect
        it again because it does not list that old connection)."""
        values: dict[str, Any] = {
            "state": state.value,
            "expires_at": expires_at,
            "disconnected_at": listed_at if state is d.SessionState.DISCONNECTED else None,
            "updated_at": listed_at,
            "end_reason": "",
        }
        if state is d.SessionState.ACTIVE and was is not d.SessionState.PENDING:
            values["connection_id"] = None
        result = await self.conn.execute(
            update(sessions)
            .where(
                sessions.c.id == session_id,
                sessions.c.state == was.value,
                sessions.c.updated_at <= listed_at,
            )
            .values(**values)
        )
        return bool(result.rowcount)

    async def end_unchanged_since(
        self, session_id: str, reason: str, listed_at: datetime, now: datetime
    ) -> bool:
        """End a live session the list taken at `listed_at` lacks, unless it changed after the list."""
        result = await self.conn.execute(
            update(sessions)
            .where(
                sessions.c.id == session_id,
                sessions.c.state.in_(LIVE),
                sessions.c.updated_at <= listed_at,
            )
            .values(state="ended", end_reason=reason, ended_at=now, updated_at=now, expires_at=None)
        )
        return bool(result.rowcount)

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


def _json_values(ids: Sequence[str]) -> Any:
    """`SELECT value FROM json_each(?)` on SQLite: the list as one JSON parameter. A list of bound
    parameters fails with "too many SQL variables" past 999 on SQLite builds older than 3.32 (and on
    builds configured lower), and a proxy holding 5,000 connections lists them all."""
    each = func.json_each(bindparam("open_ids", json.dumps(list(ids)), type_=String)).table_valued("value")
    return select(each.c.value)


def _fitting(user: str, rules: accounts.Rules) -> accounts.Account:
    """The account of `user`, whose key must fit its column once qualified with the pool's domain."""
    account = accounts.resolve(user, rules)
    if len(account.key) > d.MAX_USER_CHARS:
        raise InvalidInput(
            f"user {user[:40]!r} is too long once qualified with the pool's domain "
            f"({len(account.key)} characters, at most {d.MAX_USER_CHARS})"
        )
    return account


def _byte_order(conn: AsyncConnection, column: Any, op: str, value: str) -> Any:
    """`column op value` in code-point order: PostgreSQL's byte-order operators (the indexes use
    text_pattern_ops); SQLite compares text by bytes already."""
    if conn.dialect.name == "postgresql":
        pattern = {">=": "~>=~", "<": "~<~"}[op]
        return column.op(pattern, is_comparison=True)(bindparam(None, value, type_=String))
    return column >= value if op == ">=" else column < value


def _not_listed(conn: AsyncConnection, ids: Sequence[str]) -> Any:
    """`connection_id` not among `ids`: one array parameter on PostgreSQL (a list of bound parameters
    would hit the 65535-parameter limit on a busy proxy), one JSON parameter on SQLite."""
    if conn.dialect.name == "postgresql":
        return sessions.c.connection_id != func.all(bindparam("open_ids", list(ids), type_=ARRAY(String)))
    return sessions.c.connection_id.not_in(_json_values(ids))


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
