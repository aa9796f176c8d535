"""Changes to sessions from Routes, connection reports, operators and the agents' session lists:
insert a claim (idempotent on the user's live session), open, disconnect, end, relabel, re-key a
pool's sessions, and take the agent's word on a session's state. A mixin of `SessionRepository`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories.rows import LIVE
from rdbroker_broker.db.tables import LIVE_STATES_SQL, sessions
from rdbroker_broker.errors import InvalidInput

_LIVE_USER_INDEX_WHERE = text(f"{LIVE_STATES_SQL} AND user_key IS NOT NULL")
_INSERT_SESSION = {
    name: factory(sessions)
    .on_conflict_do_nothing(
        index_elements=[sessions.c.pool, sessions.c.user_key], index_where=_LIVE_USER_INDEX_WHERE
    )
    .returning(sessions.c.id)
    for name, factory in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}


def new_session_id() -> str:
    return uuid.uuid4().hex


def _fitting(user: str, rules: accounts.Rules) -> accounts.Account:
    """The account of `user`, whose key must fit its column once qualified with the pool's domain."""
    account = accounts.resolve(user, rules)
    if len(account.key) > d.MAX_USER_CHARS:
        raise InvalidInput(
            f"user {user[:40]!r} is too long once qualified with the pool's domain "
            f"({len(account.key)} characters, at most {d.MAX_USER_CHARS})"
        )
    return account


class SessionChanges:
    conn: AsyncConnection  # given by SessionRepository

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
