"""Sessions: where a user is (whatever spelling of their account was recorded), listing the sessions
of the directory, and ending one."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories import session_from_row
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import InvalidInput, NotFound
from rdbroker_broker.service.changes import Change, audited
from rdbroker_broker.service.common import pool_named, pool_rules, require
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos


@dataclass(frozen=True)
class SessionFilter:
    pool: str = ""
    server: str = ""
    user: str = ""
    states: tuple[d.SessionState, ...] = d.LIVE_STATES


@dataclass(frozen=True)
class SessionPage:
    items: list[d.Session]
    total: int


def lookup_keys(user: str, rules: accounts.Rules = accounts.NO_RULES) -> list[str]:
    """The keys whose sessions a lookup of `user` lists, ended ones included: the account's key in
    the pool's rules, and the keys older directories stored its spellings under (the casefolded
    name, its 9-character cut, its user part)."""
    name = user.strip()
    forms = {name, name[: d.TRUNCATED_COOKIE_CHARS].rstrip()}
    if "\\" in name:
        short = name.split("\\", 1)[1]
        forms |= {short, short[: d.TRUNCATED_COOKIE_CHARS].rstrip()}
    keys = {d.user_key(form) for form in forms if form}
    keys.add(accounts.key_of(name, rules))
    return sorted(keys)


async def account_sessions(
    r: Repos, user: str, pool: str, include_ended: bool, limit: int
) -> list[d.Session]:
    """The sessions of the account `user` names, newest first, in one pool or in every pool (each
    under its own rules): those under its keys (`lookup_keys`), and the live session another
    spelling of it is stored under when exactly one may be it (the Route's rule)."""
    pools = [await pool_named(r, pool)] if pool else await r.pools.list()
    keys = {key for each in pools for key in lookup_keys(user, pool_rules(each))} or set(lookup_keys(user))
    # By key in every pool at once: a session keeps its pool's name as it was written.
    listed = await r.sessions.for_keys(sorted(keys), pools[0].name if pool else "", include_ended, limit)
    found = {s.session_id: s for s in listed}
    for each in pools:
        if any(s.state in d.LIVE_STATES and s.pool == each.name for s in found.values()):
            continue
        rules = pool_rules(each)
        account = accounts.resolve(user, rules)
        probes = accounts.probes(account, rules)
        if probes:
            others = [
                s
                for s in await r.sessions.live_in_ranges(each.name, probes)
                if s.user and accounts.compatible(account, accounts.resolve(s.user, rules), rules)
            ]
            if len(others) == 1:
                found.setdefault(others[0].session_id, others[0])
    ordered = sorted(found.values(), key=lambda s: (s.created_at, s.session_id), reverse=True)
    return ordered[:limit]


class Sessions:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def lookup_user_sessions(
        self, user: str, pool: str = "", include_ended: bool = False
    ) -> list[d.Session]:
        require("user", user)

        async def work(r: Repos) -> list[d.Session]:
            return await account_sessions(r, user, pool, include_ended, 100)

        return await self.core.run_tx(work)

    async def end_session(self, session_id: str, reason: str = "operator") -> d.Session:
        """Forget a placement (audited as `session.end`); ending an ended session changes nothing."""

        async def work(r: Repos, change: Change) -> d.Session:
            require("session_id", session_id)
            session = await r.sessions.get(session_id)
            if session is None:
                raise NotFound(f"unknown session {session_id!r}")
            if await r.sessions.end(session_id, reason, self.core.now()):
                where = f"on {session.server_address} (pool {session.pool}), reason {reason}"
                await change.record(r, where, private=f"user {session.user}" if session.user else "")
            ended = await r.sessions.get(session_id)
            assert ended is not None
            return ended

        return await audited(self.core, "session.end", session_id, work)

    async def find_user_sessions(
        self, user: str, pool: str = "", include_ended: bool = False, limit: int = 50
    ) -> list[d.Session]:
        """Where is this user? Their sessions, newest first, whatever spelling they were recorded under
        (`account_sessions`)."""
        require("user", user.strip())

        async def work(r: Repos) -> list[d.Session]:
            return await account_sessions(r, user, pool, include_ended, limit)

        return await self.core.run_tx(work)

    async def list_sessions(self, filters: SessionFilter, limit: int, offset: int) -> SessionPage:
        """One page of the sessions matching every filter, oldest first (stable across pages)."""
        if not filters.states:
            raise InvalidInput("state: at least one state is needed")

        async def work(r: Repos) -> SessionPage:
            where: list[ColumnElement[bool]] = [sessions.c.state.in_([s.value for s in filters.states])]
            if filters.pool:
                where.append(sessions.c.pool == (await pool_named(r, filters.pool)).name)
            if filters.server:
                where.append(sessions.c.server_address == filters.server)
            if filters.user:
                # The name's key in each pool's rules (one pool's, when filtered by pool).
                each = [await pool_named(r, filters.pool)] if filters.pool else await r.pools.list()
                keys = {d.user_key(filters.user.strip())} | {
                    accounts.key_of(filters.user, pool_rules(p)) for p in each
                }
                where.append(sessions.c.user_key.in_(sorted(keys)))
            total = (
                await r.conn.execute(select(func.count()).select_from(sessions).where(*where))
            ).scalar_one()
            query = select(sessions).where(*where).order_by(sessions.c.created_at, sessions.c.id)
            rows = await r.conn.execute(query.limit(limit).offset(offset))
            return SessionPage(items=[session_from_row(row) for row in rows], total=int(total))

        return await self.core.run_tx(work)
