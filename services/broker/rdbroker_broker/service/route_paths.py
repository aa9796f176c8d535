"""The store-specific first try of a Route: one round trip that reads the context and, in the common
cases (a reconnect to the user's live session, a new placement), decides as the transactional path
would and stores the answer. Anything unusual is left to that path (None) with nothing written.

One implementation per store behind `FastRoute`; the tests hold each one's answers equal to the
transactional path's (tests/integration/broker/test_fast_route_equivalence.py, test_route_fast_path.py,
test_embedded_sqlite.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from datetime import datetime, timedelta
from typing import Protocol

import psycopg

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db import embedded_sql, routing_sql
from rdbroker_broker.db.repositories import new_session_id
from rdbroker_broker.service.common import PoolAccounts, unknown_pool
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Retryable

log = logging.getLogger(__name__)

# The placing statement passes over servers other placements hold (SKIP LOCKED). When it found every
# eligible one held at its snapshot it placed nobody; it then runs again, and at last queues for the
# best one's lock, as the transactional path would. Under a logon storm on a small pool (bench/
# proxy_bench.py: 64 concurrent, 4 servers, each proxy report batch holding its servers for its
# transaction) 1 in 4 placing statements finds every server held; run again only without waiting,
# ~1 in 4 new users went on to the transactional path, at several times the statement's cost.
LOCK_TRIES = (False, False, True)  # (wait for the lock?) of each run of the placing statement


class FastRoute(Protocol):
    async def route(self, request: d.RouteRequest, user: str) -> d.RouteDecision | None:
        """The decision, stored; None leaves the call to the transactional path."""
        ...


def fast_route(core: Core, pool_accounts: PoolAccounts) -> FastRoute:
    """The store's own first try."""
    return PostgresRoute(core, pool_accounts) if core.store.is_postgres else SqliteRoute(core, pool_accounts)


class PostgresRoute:
    def __init__(self, core: Core, pool_accounts: PoolAccounts) -> None:
        self.core = core
        self.pool_accounts = pool_accounts
        # Placements that found every server held take turns, one per pool in this process: each
        # runs the statement again on a fresh snapshot (the one before it has just placed a user,
        # so the ranking moved on) before it queues for a lock. Queued at once they would all land
        # on the server that was best when they looked: 200 placements at once on 4 servers ended
        # 40/44/56/60 that way, and 38/38/39/85 through the transactional path.
        self._turns: dict[str, asyncio.Lock] = {}

    async def route(self, request: d.RouteRequest, user: str) -> d.RouteDecision | None:
        """The common Route on PostgreSQL on one autocommit connection, in one statement: it reads
        the context and stores a reconnect answer, or places a user who has no live session. None
        leaves the call to the transactional path (anything unusual, or a race lost)."""
        try:
            async with self.core.store.raw_autocommit() as conn:
                now = self.core.now()
                stored, rules = self.pool_accounts.for_pool(request.pool)
                account = accounts.resolve(user, rules) if user else None
                key = account.key if account else ""
                # Another spelling of the account (a cut, a bare or qualified name) may name a
                # session stored under another key: this statement places it only when no such
                # session is live (else, or when a range cannot be written, the transactional path
                # tells them apart).
                expires_at = now + timedelta(seconds=self.core.settings.pending_timeout_s)
                guard = (
                    routing_sql.placement_guard(accounts.probes(account, rules))
                    if account
                    else routing_sql.NO_GUARD
                )
                placement = None
                if guard is not None:
                    name = account.name if account else ""
                    placement = routing_sql.NewSession(new_session_id(), user, expires_at, name, guard)
                turn = contextlib.AsyncExitStack()
                async with turn:
                    return await self._place(conn, request, user, key, now, placement, stored, turn)
        except Retryable as exc:
            log.debug("route fast path lost a race or its connection (%s): the transactional path", exc)
            return None

    async def _place(
        self,
        conn: routing_sql.Connection,
        request: d.RouteRequest,
        user: str,
        key: str,
        now: datetime,
        placement: routing_sql.NewSession | None,
        stored: tuple[str, str],
        turn: contextlib.AsyncExitStack,
    ) -> d.RouteDecision | None:
        for n, wait in enumerate(LOCK_TRIES):
            if n == 1:
                await turn.enter_async_context(self._turns.setdefault(request.pool, asyncio.Lock()))
            try:
                found = await routing_sql.route_context(conn, request, key, now, placement, stored, wait=wait)
            except psycopg.errors.UniqueViolation as exc:
                if not routing_sql.repeats_an_answer(exc):
                    raise
                # A retried call whose session is no longer live: placing it again met the
                # stored answer, and nothing of the statement remains. That answer is the reply.
                return await routing_sql.stored_answer(conn, request)
            if found is None:
                raise unknown_pool(request.pool)
            if not self.pool_accounts.remember(request.pool, found.pool):
                return None  # the statement stored nothing: the transactional path, with them
            if found.live is not None:  # (placed by another replica meanwhile, too)
                return await self._reconnect(conn, request, found, found.live, now)
            if placement is None:
                return None
            if found.placed is not None:
                reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
                return d.RouteDecision(found.placed, placement.session_id, reason, user, found.pool.name)
            # Nothing free, or every eligible server locked by other placements under way
            # (SKIP LOCKED) for this one's snapshot: the statement wrote nothing. It runs
            # again, at last waiting for the best server's lock; when that places nobody
            # either, nothing takes the user and the transactional path says why.
        return None

    async def _reconnect(
        self,
        conn: routing_sql.Connection,
        request: d.RouteRequest,
        found: routing_sql.Context,
        live: d.Session,
        now: datetime,
    ) -> d.RouteDecision | None:
        """The context statement stored the reconnect answer when SQL's copy of the rules said so;
        the domain rules decide here, and the two are tested equal."""
        pool, answered = found.pool, found.answered
        server = d.as_seen_at(found.server, now) if found.server is not None else None
        if server is None or not live.is_live_at(now) or not d.takes_reconnects(server):
            if answered:  # never expected: undo, and let the transactional path decide
                log.error("reconnect rules in SQL and in the domain disagree on %s", server)
                await routing_sql.forget_answer(conn, request, live.session_id)
                return None
            # Ended and placed anew by the transactional path, unless this is a retried call whose
            # session has just expired (not yet swept): that call gets its answer.
            return await routing_sql.stored_answer(conn, request)
        if answered:
            return d.RouteDecision(
                server.address, live.session_id, d.RouteReason.RECONNECT, live.user, pool.name
            )
        # This (connection_id, attempt) was answered before: a retried call gets that answer.
        return await routing_sql.stored_answer(conn, request)


class SqliteRoute:
    def __init__(self, core: Core, pool_accounts: PoolAccounts) -> None:
        self.core = core
        self.pool_accounts = pool_accounts

    async def route(self, request: d.RouteRequest, user: str) -> d.RouteDecision | None:
        """The common Route on SQLite in plain sqlite3 calls (`embedded_sql`), decided by the domain
        as the transactional path decides: a reconnect to the user's live session, or a new
        placement when the account has none. None leaves the call to the transactional path, with
        nothing written (anything unusual, or an answer stored for this connection before)."""
        try:
            async with self.core.store.sqlite_transaction() as conn:
                decision = self._decide(conn, request, user)
            self.core.heard()
            return decision
        except embedded_sql.NotHere:
            return None
        except Retryable as exc:
            log.debug("route fast path lost a race (%s): the transactional path", exc)
            return None

    def _decide(self, conn: sqlite3.Connection, request: d.RouteRequest, user: str) -> d.RouteDecision:
        now = self.core.now()
        _, rules = self.pool_accounts.for_pool(request.pool)
        account = accounts.resolve(user, rules) if user else None
        if account is not None and len(account.key) > d.MAX_USER_CHARS:
            raise embedded_sql.NotHere  # the transactional path says why
        found = embedded_sql.route_context(conn, request.pool, account.key if account else "")
        if found is None:
            raise unknown_pool(request.pool)
        pool, live, server = found.pool, found.live, found.server
        if not self.pool_accounts.remember(request.pool, pool):
            raise embedded_sql.NotHere  # the key was made with settings since changed
        if live is not None:
            seen = d.as_seen_at(server, now) if server is not None else None
            if seen is None or not live.is_live_at(now) or not d.takes_reconnects(seen):
                raise embedded_sql.NotHere  # the session ends, and the user is placed anew
            decision = d.RouteDecision(
                seen.address, live.session_id, d.RouteReason.RECONNECT, live.user, pool.name
            )
            return self._store_answer(conn, request, decision, now)
        if account is not None:
            probes = accounts.probes(account, rules)
            if probes is None or (probes and embedded_sql.any_live_in_ranges(conn, pool.name, probes)):
                raise embedded_sql.NotHere  # another spelling of the account may have a session
        # SQL ranks the pool's servers (`routing_sql`'s rules, held equal to the domain's by tests);
        # the domain checks the one it chose.
        best = embedded_sql.best_server(conn, pool, now)
        if best is None or not d.takes_new_sessions(d.as_seen_at(best, now)):
            raise embedded_sql.NotHere  # the transactional path says why no server takes it
        reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
        decision = d.RouteDecision(best.address, new_session_id(), reason, user, pool.name)
        answered = self._store_answer(conn, request, decision, now)
        if answered is decision:
            embedded_sql.insert_pending(
                conn,
                session_id=decision.session_id,
                pool=pool.name,
                user=user,
                account=account,
                server_address=decision.server_address,
                request=request,
                now=now,
                expires_at=now + timedelta(seconds=self.core.settings.pending_timeout_s),
            )
        return answered

    @staticmethod
    def _store_answer(
        conn: sqlite3.Connection, request: d.RouteRequest, decision: d.RouteDecision, now: datetime
    ) -> d.RouteDecision:
        """`decision`, stored; or the answer this (connection_id, attempt) was given before (a
        retried call), with nothing written."""
        if embedded_sql.record_answer(conn, request, decision, now):
            return decision
        earlier = embedded_sql.stored_answer(conn, request)
        if earlier is None:
            raise embedded_sql.NotHere
        return earlier
