"""The broker's use cases: routing, connection reports, lookups and operator actions.

Each public method owns one transaction (through `Store`) and retries it when a concurrent replica
wins a race on a unique index: the retry then sees the winner's rows and answers the same.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import psycopg
from sqlalchemy import Column, ColumnElement, String, func, select
from sqlalchemy.exc import IntegrityError

from rdbroker_broker import accounts, assignments, audit, metrics, pool_settings
from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import embedded_sql, report_sql, routing_sql
from rdbroker_broker.db.assignment_repository import AssignmentRepository
from rdbroker_broker.db.audit_repository import AuditFilter as AuditFilter  # for the REST routes
from rdbroker_broker.db.history_repository import purge_refusals
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.db.repositories import new_session_id, session_from_row
from rdbroker_broker.db.tables import connections, proxies, sessions
from rdbroker_broker.errors import (
    BrokerError,
    CapacityStarting,
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NoCapacity,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from rdbroker_broker.store import Repos, Retryable, Store
from rdbroker_common.rdp_probe import ProbeResult, probe_rdp

RouteContext = tuple[d.Pool, d.Session | None, d.Server | None]
RdpProbe = Callable[[str, float], Awaitable[ProbeResult]]
# Answers that placed a user afresh: nothing of theirs is on that server yet, so a retry moves them.
PLACED = (d.RouteReason.NEW, d.RouteReason.NO_IDENTITY)

log = logging.getLogger(__name__)

T = TypeVar("T")

PURGE_EVERY_S = 60.0
PURGE_BATCH = 10_000  # rows of each table per transaction
PURGE_MAX_BATCHES = 100  # per purge: a larger backlog goes on at the next one
# On SQLite a statement holds the event loop (and every proxied connection) for its time, and a
# deleted session costs ~90 µs (its indexes): batches of ~10 ms, the loop free between them.
SQLITE_PURGE_BATCH = 100
SQLITE_EXPIRE_BATCH = 200  # sessions of each state per transaction
SQLITE_PURGE_MAX_BATCHES = 1000
MAX_TX_ATTEMPTS = 5
# How many ranked servers a placement tries to lock before giving up on the pool.
MAX_LOCK_TRIES = 16
# How often the Route statement on PostgreSQL runs again when it placed nobody: under a logon storm
# every eligible server was locked by other placements at its snapshot for ~1 in 3 new users (64
# concurrent, 4 servers), each then costing the transactional path several times the statement.
LOCKED_RETRIES = 2
MAX_HEARTBEAT_CONNECTIONS = 30_000  # under SQLite's bound-parameter limit too
# A server that answered a failover probe this recently is not probed again (the proxy retries a
# Route that was answered Unavailable, up to its deadline).
PROBE_REUSE_S = 1.0


@dataclass(frozen=True)
class Opened:
    """A proxy connected a client to the session's server."""

    session_id: str
    connection_id: str
    proxy_id: str


@dataclass(frozen=True)
class Closed:
    """A proxied connection ended."""

    session_id: str
    connection_id: str
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    duration_ms: int = 0
    end_reason: str = ""


ConnectionEvent = Opened | Closed


@dataclass
class TokenNote:
    """What a Route made of its routing token: a `metrics.TOKEN_OUTCOMES` value and, for a token
    not followed, why (counted and logged once its transaction is over)."""

    outcome: str = ""
    why: str = ""


# Outcomes where the connection went where its token said.
TOKEN_FOLLOWED = frozenset({"honoured", "reconnect", "no_identity"})


class _Undo(Exception):
    """Rolls a pipelined report batch back: one of its events needs the use case."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class BrokerService:
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        clock: Callable[[], datetime] = utcnow,
        probe: RdpProbe = probe_rdp,
    ) -> None:
        self.store = store
        self.settings = settings
        self.now = clock
        self.probe_rdp = probe
        self._probing: dict[str, asyncio.Future[ProbeResult | None]] = {}  # address -> the probe under way
        self._answered: dict[str, tuple[float, ProbeResult]] = {}  # address -> when it last answered one
        self._purged_at: datetime | None = None
        # Since when this broker's database calls have succeeded without interruption (None: not
        # since it started, or since the last failure). The sweep judges a proxy silent only over
        # time inside this span: a proxy cannot be heard while the broker cannot write.
        self.heard_since: datetime | None = None
        # Pools' account settings as last read, by the pool name a Route names ("" = the default):
        # the Route statement needs the canonical key before it reads the pool, and checks them.
        self._pool_accounts: dict[str, tuple[tuple[str, str], accounts.Rules]] = {}
        # The assignment rules, which pick the pool of a Route that names none.
        self.assignments = assignments.Cache(self._read_assignments, settings.assignments_refresh_ms / 1000)

    def _accounts_for(self, pool: str) -> tuple[tuple[str, str], accounts.Rules]:
        return self._pool_accounts.get(pool.casefold(), _NO_ACCOUNTS)

    def _remember_accounts(self, pool_asked: str, pool: d.Pool) -> bool:
        """Remember the pool's account settings; False when they differ from what was used."""
        stored = routing_sql.account_settings(pool)
        known = self._accounts_for(pool_asked)[0]
        if stored != known:
            self._pool_accounts[pool_asked.casefold()] = (stored, pool_rules(pool))
        return stored == known

    async def _read_assignments(self) -> assignments.RuleSet:
        """The assignment rules, read outside a transaction (reads only), again on a dead pooled
        connection."""

        async def read() -> assignments.RuleSet:
            async with self.store.autocommit() as r:
                return await AssignmentRepository(r.conn).rule_set()

        try:
            return await read()
        except Retryable:
            try:
                return await read()
            except Retryable as exc:
                raise DatabaseUnavailable("the database is unreachable") from exc

    def _heard(self) -> None:
        """A transaction committed (any path): the span of uninterrupted database calls goes on."""
        if self.heard_since is None:
            self.heard_since = self.now()

    async def run_tx(self, work: Callable[[Repos], Awaitable[T]]) -> T:
        """Run `work` in a transaction, again when it loses a race (it then sees the winner's rows)."""
        for attempt in range(MAX_TX_ATTEMPTS):
            try:
                async with self.store.transaction() as r:
                    result = await work(r)
                self._heard()
                return result
            except Retryable as exc:
                if exc.connectivity and attempt >= 1:
                    self.heard_since = None
                    unavailable = DatabaseUnavailable("the database is unreachable")
                    unavailable.__cause__ = exc
                    self.store.database.failed(unavailable)
                    raise unavailable from exc
                log.debug("transaction lost a race, retrying (%s): %s", attempt + 1, exc)
            except DatabaseUnavailable:
                self.heard_since = None
                raise
        raise Conflict("too many concurrent changes to the same rows; retry the call")

    # --- Route ---------------------------------------------------------------------------------

    async def route(self, request: d.RouteRequest) -> d.RouteDecision:
        d.validate_route_request(request)
        user = d.identity_from(request, self.settings.max_cookie_chars)
        if not request.pool and (assigned := await self.assignments.pool_for(user, request.client_address)):
            request = replace(request, pool=assigned)
        if len(user) > d.MAX_USER_CHARS // 2:  # only a long name may not fit once qualified
            self._check_qualified(request.pool, user)
        token_address = d.routing_token_address(request.routing_token)
        decision = None
        context: RouteContext | None = None
        probe: ProbeResult | None = None
        if request.attempt > 0 and request.failed_server_address:
            # Before the transaction: a probe may take its whole timeout, and holds no connection.
            probe = await self._probe_failed_server(request)
        # On SQLite the whole Route is one transaction on the store's one connection (the gate
        # makes it this call's alone): its first try reads the context in it, as below.
        in_one = request.attempt == 0 and not self.store.is_postgres
        if request.attempt == 0 and token_address is None and self.store.is_postgres:
            decision = await self._route_postgres(request, user)
        elif in_one and token_address is None:
            decision = await self._route_sqlite(request, user)
        elif request.attempt == 0 and self.store.is_postgres:
            # A routing token: the context is read outside the transaction (no BEGIN/COMMIT round
            # trips for it), and the transaction decides with this read.
            try:
                async with self.store.autocommit() as r:
                    context = await self._read_context(r, request.pool, user)
            except Retryable:
                context = None  # a dead pooled connection: the transactional path retries
        if decision is not None:
            return self._logged(request, decision)
        tries = 0
        token = TokenNote()

        async def work(r: Repos) -> d.RouteDecision:
            nonlocal tries
            tries += 1
            token.outcome = token.why = ""  # a transaction run again decides again
            ctx = context if tries == 1 else None
            if tries == 1 and in_one:
                ctx = await self._read_context(r, request.pool, user)
            if ctx is not None and token_address is None:
                # With the context just read (a first try at attempt 0), be optimistic: a repeated
                # (connection_id, attempt) loses on the connections primary key when its answer
                # is stored, and the next try (without a context) looks the first answer up.
                fast = await self._fast_reconnect(r, request, ctx)
                if fast is not None:
                    return fast
            return await self._route(r, request, user, token_address, ctx, probe, token)

        try:
            decision = await self.run_tx(work)
        except BrokerError:
            self._token_counted(request, token_address, token, None)
            raise
        self._token_counted(request, token_address, token, decision)
        return self._logged(request, decision)

    def _check_qualified(self, pool: str, user: str) -> None:
        key = accounts.key_of(user, self._accounts_for(pool)[1])
        if len(key) > d.MAX_USER_CHARS:
            raise InvalidInput(
                f"cookie is too long once qualified with the pool's domain ({len(key)} characters, "
                f"at most {d.MAX_USER_CHARS})"
            )

    def _token_counted(
        self, request: d.RouteRequest, address: str | None, token: TokenNote, decision: d.RouteDecision | None
    ) -> None:
        """Count what became of the routing token once its transaction is over (a transaction run
        again decides again), and say why a token was not followed."""
        if not token.outcome:
            return  # no token, or a retried call answered as before
        metrics.record_routing_token(token.outcome)
        if token.outcome in TOKEN_FOLLOWED:
            return
        placed = f"placed by policy on {decision.server_address}" if decision else "not placed"
        log.info(
            "routing token names %s, not followed (%s: %s): %s",
            address,
            token.outcome,
            token.why,
            placed,
            extra={"connection_id": request.connection_id, "server": address},
        )

    def _logged(self, request: d.RouteRequest, decision: d.RouteDecision) -> d.RouteDecision:
        if log.isEnabledFor(logging.DEBUG):  # the hot path: no record built unless asked for
            log.debug(
                "route %s: %s",
                decision.reason.value,
                decision.server_address,
                extra={"connection_id": request.connection_id, "session_id": decision.session_id},
            )
        if decision.reason is d.RouteReason.NO_IDENTITY:
            log.info(
                "no identity: placed without affinity",
                extra={"connection_id": request.connection_id, "server": decision.server_address},
            )
        return decision

    async def _read_context(self, r: Repos, pool: str, user: str) -> RouteContext:
        """The pool, the user's live session in it and that session's server: one round trip, a
        second when the pool's account settings changed (the key depends on them)."""
        _, rules = self._accounts_for(pool)
        context = await r.sessions.route_context(pool, accounts.key_of(user, rules) if user else "")
        if context is None:
            raise _unknown_pool(pool)
        found = context[0]
        if not self._remember_accounts(pool, found) and user:
            live = await r.sessions.live_for_user(found.name, accounts.key_of(user, pool_rules(found)))
            server = await r.servers.get(live.server_address) if live else None
            return found, live, server
        return context

    async def _route_postgres(self, request: d.RouteRequest, user: str) -> d.RouteDecision | None:
        """The common Route on PostgreSQL on one autocommit connection, in one statement: it reads
        the context and stores a reconnect answer, or places a user who has no live session. None
        leaves the call to the transactional path (anything unusual, or a race lost)."""
        try:
            async with self.store.raw_autocommit() as conn:
                now = self.now()
                stored, rules = self._accounts_for(request.pool)
                account = accounts.resolve(user, rules) if user else None
                key = account.key if account else ""
                # Another spelling of the account (a cut, a bare or qualified name) may name a
                # session stored under another key: this statement places it only when no such
                # session is live (else, or when a range cannot be written, the transactional path
                # tells them apart).
                expires_at = now + timedelta(seconds=self.settings.pending_timeout_s)
                guard = (
                    routing_sql.placement_guard(accounts.probes(account, rules))
                    if account
                    else routing_sql.NO_GUARD
                )
                placement = None
                if guard is not None:
                    name = account.name if account else ""
                    placement = routing_sql.NewSession(new_session_id(), user, expires_at, name, guard)
                for _ in range(1 + LOCKED_RETRIES):
                    try:
                        found = await routing_sql.route_context(conn, request, key, now, placement, stored)
                    except psycopg.errors.UniqueViolation as exc:
                        if not routing_sql.repeats_an_answer(exc):
                            raise
                        # A retried call whose session is no longer live: placing it again met the
                        # stored answer, and nothing of the statement remains. That answer is the reply.
                        return await routing_sql.stored_answer(conn, request)
                    if found is None:
                        raise _unknown_pool(request.pool)
                    if not self._remember_accounts(request.pool, found.pool):
                        return None  # the statement stored nothing: the transactional path, with them
                    if found.live is not None:  # (placed by another replica meanwhile, too)
                        return await self._fast_reconnect_postgres(conn, request, found, found.live, now)
                    if placement is None:
                        return None
                    if found.placed is not None:
                        reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
                        return d.RouteDecision(
                            found.placed, placement.session_id, reason, user, found.pool.name
                        )
                    # Nothing free, or every eligible server locked by other placements under way
                    # (SKIP LOCKED) for this one's snapshot: the statement wrote nothing. Those
                    # finish within a statement's time, so it runs again; the transactional path
                    # then decides and says why nothing takes the user.
                return None
        except Retryable as exc:
            log.debug("route fast path lost a race or its connection (%s): the transactional path", exc)
            return None

    async def _route_sqlite(self, request: d.RouteRequest, user: str) -> d.RouteDecision | None:
        """The common Route on SQLite in plain sqlite3 calls (`embedded_sql`), decided by the domain
        as the transactional path decides: a reconnect to the user's live session, or a new
        placement when the account has none. None leaves the call to the transactional path, with
        nothing written (anything unusual, or an answer stored for this connection before)."""
        try:
            async with self.store.sqlite_transaction() as conn:
                decision = self._route_embedded(conn, request, user)
            self._heard()
            return decision
        except embedded_sql.NotHere:
            return None
        except Retryable as exc:
            log.debug("route fast path lost a race (%s): the transactional path", exc)
            return None

    def _route_embedded(
        self, conn: sqlite3.Connection, request: d.RouteRequest, user: str
    ) -> d.RouteDecision:
        now = self.now()
        _, rules = self._accounts_for(request.pool)
        account = accounts.resolve(user, rules) if user else None
        if account is not None and len(account.key) > d.MAX_USER_CHARS:
            raise embedded_sql.NotHere  # the transactional path says why
        found = embedded_sql.route_context(conn, request.pool, account.key if account else "")
        if found is None:
            raise _unknown_pool(request.pool)
        pool, live, server = found.pool, found.live, found.server
        if not self._remember_accounts(request.pool, pool):
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
        ranked = d.rank_for_new_session(
            [d.as_seen_at(s, now) for s in embedded_sql.servers_in_pool(conn, pool.name)],
            placement=pool.placement,
        )
        if not ranked:
            raise embedded_sql.NotHere  # the transactional path says why no server takes it
        reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
        decision = d.RouteDecision(ranked[0].address, new_session_id(), reason, user, pool.name)
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
                expires_at=now + timedelta(seconds=self.settings.pending_timeout_s),
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

    async def _fast_reconnect_postgres(
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

    async def _fast_reconnect(
        self, r: Repos, request: d.RouteRequest, context: RouteContext
    ) -> d.RouteDecision | None:
        pool, live, server = context
        now = self.now()
        server = d.as_seen_at(server, now) if server is not None else None
        if live is None or server is None or not live.is_live_at(now) or not d.takes_reconnects(server):
            return None
        decision = d.RouteDecision(
            server.address, live.session_id, d.RouteReason.RECONNECT, live.user, pool.name
        )
        if await r.connections.record(request, decision, now):
            return decision
        # This (connection_id, attempt) was answered before: a retried call gets that answer.
        return (await r.connections.answers(request.connection_id)).get(request.attempt)

    async def _route(
        self,
        r: Repos,
        request: d.RouteRequest,
        user: str,
        token_address: str | None,
        context: RouteContext | None,
        probe: ProbeResult | None,
        token: TokenNote,
    ) -> d.RouteDecision:
        now = self.now()
        answers: dict[int, d.RouteDecision] = {}
        # With a context read just before (a first try at attempt 0), be optimistic: a repeated
        # (connection_id, attempt) loses on the connections primary key at the end, the transaction
        # runs again without a context, and this lookup returns the first answer.
        if context is None:
            answers = await r.connections.answers(request.connection_id)
            if request.attempt in answers:
                return answers[request.attempt]  # a retried call: same answer, nothing new
            context = await self._read_context(r, request.pool, user)
        pool, live, live_server = context
        exclude: list[str] = []
        if request.attempt > 0 and request.failed_server_address:
            exclude = await self._after_failure(r, request, answers, now, probe)

        if exclude and user:  # the failure handling may have ended the session read above
            live = await r.sessions.live_for_user(pool.name, accounts.key_of(user, pool_rules(pool)))
            live_server = await r.servers.get(live.server_address) if live else None

        decision = None
        if token_address is not None:
            decision = await self._route_token(
                r, request, pool, user, live, token_address, exclude, now, token
            )
        if decision is None and user:
            decision = await self._reconnect(r, pool, user, live, live_server, exclude, now)
        if decision is None:
            decision = await self._place_new(r, pool, user, exclude, request, now)
        if not await r.connections.record(request, decision, now):
            # A retried call raced its first try: roll this back and answer what the first try stored.
            raise Retryable("this connection attempt was answered concurrently")
        return decision

    async def _probe_failed_server(self, request: d.RouteRequest) -> ProbeResult | None:
        """Probe the server the proxy could not reach when the answer that named it was where the
        user's session is (a reconnect or a token target) and the directory still sends users there.
        None when no probe is needed; the transaction checks the same again and decides."""
        failed = request.failed_server_address
        try:
            async with self.store.autocommit() as r:
                answers = await r.connections.answers(request.connection_id)
                last = _last_answer(answers, request.attempt)
                if request.attempt in answers or last is None or last.server_address != failed:
                    return None  # answered before, or bad input the transaction refuses
                if last.reason in PLACED:
                    return None
                server = await r.servers.get(failed)
        except Retryable:
            return None  # a dead pooled connection: the transaction reads again and says what to do
        if server is None or not d.takes_reconnects(d.as_seen_at(server, self.now())):
            return None
        return await self._probe(failed)

    async def _probe(self, address: str) -> ProbeResult:
        """One RDP handshake with `address`; concurrent calls for one address share it (a dead server's
        users all fail over at once, and it needs probing only once)."""
        answered = self._answered.get(address)
        if answered is not None and time.monotonic() - answered[0] < PROBE_REUSE_S:
            return answered[1]  # the proxy retrying its call: the server answered a moment ago
        shared = self._probing.get(address)
        if shared is not None:
            result = await asyncio.shield(shared)
            return result if result is not None else await self._probe(address)
        shared = asyncio.get_running_loop().create_future()
        self._probing[address] = shared
        try:
            result = await self.probe_rdp(address, self.settings.failover_probe_timeout_ms / 1000)
        except BaseException:
            shared.set_result(None)  # cancelled: whoever waits probes for themselves
            raise
        finally:
            del self._probing[address]
        shared.set_result(result)
        metrics.record_failover_probe(result.ok)
        if result.ok:
            self._answered[address] = (time.monotonic(), result)
        else:
            self._answered.pop(address, None)
        return result

    async def _after_failure(
        self,
        r: Repos,
        request: d.RouteRequest,
        answers: dict[int, d.RouteDecision],
        now: datetime,
        probe: ProbeResult | None,
    ) -> list[str]:
        """The proxy could not reach the server of this connection's last answer.

        A user placed there afresh is placed elsewhere. A session the user has there (a reconnect, a
        token target) moves only when the broker's own probe of the server failed too: the server is
        then recorded down, as a health result would, and the session ends `server_down`. A server
        that answers the probe keeps the session (Unavailable: the client tries again).
        """
        failed = request.failed_server_address
        last = _last_answer(answers, request.attempt)
        if last is None or last.server_address != failed:
            if await r.servers.get(failed) is None:
                raise InvalidInput(f"failed_server_address {failed!r} is not a registered server")
            sent_to = f"it was sent to {last.server_address}" if last else "it has no earlier answer"
            raise InvalidInput(
                f"failed_server_address {failed!r} is not where this connection was sent ({sent_to})"
            )
        if last.reason in PLACED:
            # Nothing exists on that server yet: drop the pending session and place elsewhere.
            await r.sessions.end(last.session_id, "connect_failed", now)
            return [failed]
        server = await r.servers.get(failed)
        if server is None:
            await r.sessions.end(last.session_id, "server_removed", now)
            return [failed]
        seen = d.as_seen_at(server, now)
        reason = "server_down" if seen.is_down else "server_maintenance"
        if d.takes_reconnects(seen):
            if probe is None or probe.ok:
                # (No probe: the server was not routable when read before the transaction, and is now.)
                answers_probe = "answers the broker's probe" if probe else "is routable again"
                raise Unavailable(
                    f"server {failed} holds this user's session and {answers_probe}, but the proxy could "
                    "not reach it; not moving the session (the client should retry)"
                )
            await r.servers.record_down(
                failed, f"failover probe: {probe.detail}", now, now + await self._stale_after(r, server.pool)
            )
            log.warning(
                "server %s could not be reached by the proxy nor probed (%s): recorded down",
                failed,
                probe.detail,
                extra={"server": failed, "connection_id": request.connection_id},
            )
            reason = "server_down"
        await r.sessions.end(last.session_id, reason, now)
        return [failed]

    async def _stale_after(self, r: Repos, pool_name: str) -> timedelta:
        """How long a health result of the pool's servers counts (as for the replicas' results)."""
        pool = await r.pools.resolve(pool_name)
        return d.stale_after(pool, self.settings.probe_interval_ms, self.settings.lease_ms)

    async def _route_token(
        self,
        r: Repos,
        request: d.RouteRequest,
        pool: d.Pool,
        user: str,
        live: d.Session | None,
        address: str,
        exclude: list[str],
        now: datetime,
        note: TokenNote,
    ) -> d.RouteDecision | None:
        """Follow the routing token where policy would let this connection go; None (and `note`
        says why) places it by policy as if it carried none. A token is a client's word, and any
        client can write one: it never overrides the operator's drain, a server's capacity or the
        pool a connection belongs to, except to take a user back to their own session."""

        def ignored(outcome: str, why: str) -> d.RouteDecision | None:
            note.outcome, note.why = outcome, why
            return None

        if not pool.honor_routing_tokens:
            return ignored("ignored_disabled", f"pool {pool.name} ignores routing tokens")
        server = await r.servers.get(address)
        if server is None:
            note.outcome, note.why = "unknown_server", "not a registered server"
            # Routing to an arbitrary address would make the proxy an open relay.
            raise PermissionDenied(f"routing token names {address}, which is not a registered server")
        seen = d.as_seen_at(server, now)  # a stale health result counts as none, as for placements
        if seen.is_down or address in exclude:
            return ignored("refused_down", "the server is down")
        if seen.effective_admin_state is d.AdminState.MAINTENANCE:
            return ignored("refused_maintenance", "the server is in maintenance")
        home = pool if server.pool == pool.name else await r.pools.resolve(server.pool) or d.Pool(server.pool)
        if not home.honor_routing_tokens:
            return ignored("ignored_disabled", f"the server's pool {home.name} ignores routing tokens")
        mine = None
        if user:
            mine = live if home is pool else await self._live_session(r, home, user)
            if mine is None:  # another spelling of the account may hold it (the rule of `_reconnect`)
                mine = await self._account_match(r, home, user, now)
            if mine is not None and mine.server_address == address and mine.is_live_at(now):
                note.outcome = "reconnect"
                return d.RouteDecision(address, mine.session_id, d.RouteReason.TOKEN, mine.user, home.name)
            if mine is not None and mine.is_live_at(now):
                # Following the token would give the account a second session: policy sends the
                # user back to the one they have.
                return ignored("ignored_policy", f"the user's session is on {mine.server_address}")
        elif home is not pool or not d.takes_new_sessions(seen):
            # No identity to look up: the token is the connection's only route (a client sent back
            # to the server of its session carries the token, often without a cookie).
            note.outcome = "no_identity"
            session_id = await self._insert_pending(r, home, "", address, request, now)
            assert session_id is not None  # an anonymous session is never a duplicate
            return d.RouteDecision(address, session_id, d.RouteReason.TOKEN, "", home.name)
        if home is not pool:
            return ignored("ignored_policy", f"the server is in pool {home.name}, not {pool.name}")
        # The server's row locked, its capacity re-checked: what a placement there would check.
        locked = await r.servers.lock(address)
        if locked is None:
            return ignored("ignored_policy", "the server was removed meanwhile")
        why = _no_new_sessions(d.as_seen_at(locked, now))
        if why and user:
            return ignored("ignored_policy", f"the server takes no new sessions ({why})")
        note.outcome = "no_identity" if why else "honoured"  # (filled up meanwhile: as above)
        # One another replica placed meanwhile gets this server without affinity: one live session
        # per account stays true.
        owner = user
        session_id = await self._insert_pending(r, pool, owner, address, request, now)
        if session_id is None:
            owner = ""
            session_id = await self._insert_pending(r, pool, "", address, request, now)
        assert session_id is not None
        return d.RouteDecision(address, session_id, d.RouteReason.TOKEN, owner, pool.name)

    async def _live_session(self, r: Repos, pool: d.Pool, user: str) -> d.Session | None:
        return await r.sessions.live_for_user(pool.name, accounts.key_of(user, pool_rules(pool)))

    async def _reconnect(
        self,
        r: Repos,
        pool: d.Pool,
        user: str,
        live: d.Session | None,
        server: d.Server | None,
        exclude: list[str],
        now: datetime,
    ) -> d.RouteDecision | None:
        if live is None:
            live = await self._account_match(r, pool, user, now)
            server = await r.servers.get(live.server_address) if live else None
        if live is None:
            return None
        if not live.is_live_at(now):
            await r.sessions.end(live.session_id, "expired", now)
            return None
        if server is None:
            await r.sessions.end(live.session_id, "server_removed", now)
            return None
        server = d.as_seen_at(server, now)
        if not d.takes_reconnects(server) or server.address in exclude:
            reason = "server_maintenance" if not server.is_down else "server_down"
            log.info(
                "user's session is on %s, which takes no reconnects (%s): placing anew",
                server.address,
                reason,
            )
            await r.sessions.end(live.session_id, reason, now)
            return None
        return d.RouteDecision(server.address, live.session_id, d.RouteReason.RECONNECT, live.user, pool.name)

    async def _account_match(self, r: Repos, pool: d.Pool, user: str, now: datetime) -> d.Session | None:
        """The live session another spelling of this account is stored under (a cut, a bare or a
        qualified name: `accounts`), when exactly one live session may be it; relabelled to the
        most complete name of the two, so that the next Route finds it by its key."""
        rules = pool_rules(pool)
        found = await account_candidates(r, pool, user)
        if len(found) > 1:
            metrics.record_truncated_ambiguous("route")
            log.warning("%r may be %d accounts' live sessions: joining none", user, len(found))
            return None
        if not found:
            return None
        session = found[0]
        label = accounts.fuller(session.user, user, rules)
        if label != session.user:
            new_key = accounts.key_of(label, rules)
            if new_key == accounts.key_of(session.user, rules) or (
                await r.sessions.live_for_user(pool.name, new_key) is None
            ):
                await r.sessions.relabel(session.session_id, label, now, rules)
                session = replace(session, user=label)
        return session

    async def _place_new(
        self, r: Repos, pool: d.Pool, user: str, exclude: list[str], request: d.RouteRequest, now: datetime
    ) -> d.RouteDecision:
        # Routing sees each server as of now: a stale health result reads as no result.
        candidates = [d.as_seen_at(s, now) for s in await r.servers.list(pool.name)]
        ranked = [s.address for s in d.rank_for_new_session(candidates, exclude, pool.placement)]
        chosen = await self._lock_server(r, ranked, now) if ranked else None
        if chosen is None:
            # A server starting (or about to be) for this pool: the proxy holds the user (power.py).
            wait_s = await PowerRepository(r.conn).start_wait(pool.name)
            if wait_s:
                raise CapacityStarting(
                    f"no server in pool {pool.name!r} can take a new session yet: one is starting",
                    wait_s,
                )
            raise NoCapacity(
                f"no server in pool {pool.name!r} can take a new session ({_summary(candidates, now)})"
            )
        session_id = await self._insert_pending(r, pool, user, chosen.address, request, now)
        if session_id is None:
            # Another replica placed this user a moment ago: answer with its session.
            live = await r.sessions.live_for_user(pool.name, accounts.key_of(user, pool_rules(pool)))
            if live is None:
                raise Retryable("the competing session ended meanwhile")
            return d.RouteDecision(
                live.server_address, live.session_id, d.RouteReason.RECONNECT, live.user, pool.name
            )
        # The insert's trigger counted the session and the placement on the server's row.
        reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
        return d.RouteDecision(chosen.address, session_id, reason, user, pool.name)

    async def _lock_server(self, r: Repos, ranked: list[str], now: datetime) -> d.Server | None:
        """Lock the best server that still takes a new session, re-checked under its row lock."""
        remaining = list(ranked)
        for _ in range(MAX_LOCK_TRIES):
            if not remaining:
                return None
            server = await r.servers.lock_first(remaining)
            if server is None:  # every candidate is being placed on right now: queue for the best
                server = await r.servers.lock(remaining[0])
                if server is None:
                    remaining.pop(0)
                    continue
            # The row is locked and its live-session counter only changes under that lock (triggers):
            # what we read is exact until we commit.
            if d.takes_new_sessions(d.as_seen_at(server, now)):
                return server
            remaining.remove(server.address)
        return None

    async def _insert_pending(
        self, r: Repos, pool: d.Pool, user: str, address: str, request: d.RouteRequest, now: datetime
    ) -> str | None:
        return await r.sessions.insert(
            pool=pool.name,
            rules=pool_rules(pool),
            user=user,
            server_address=address,
            state=d.SessionState.PENDING,
            now=now,
            expires_at=now + timedelta(seconds=self.settings.pending_timeout_s),
            origin_connection_id=request.connection_id,
            proxy_id=request.proxy_id or None,
            client_address=request.client_address,
        )

    # --- connection reports --------------------------------------------------------------------

    async def connection_opened(self, session_id: str, connection_id: str, proxy_id: str) -> None:
        await self._one_report(Opened(session_id, connection_id, proxy_id))

    async def connection_closed(
        self,
        session_id: str,
        connection_id: str,
        *,
        bytes_from_client: int = 0,
        bytes_from_server: int = 0,
        duration_ms: int = 0,
        end_reason: str = "",
    ) -> None:
        await self._one_report(
            Closed(session_id, connection_id, bytes_from_client, bytes_from_server, duration_ms, end_reason)
        )

    async def _one_report(self, event: ConnectionEvent) -> None:
        (error,) = await self.report_connections([event])
        if error is not None:
            raise error

    async def report_connections(self, events: Sequence[ConnectionEvent]) -> list[Exception | None]:
        """Apply a proxy's connection reports in order: for each event, None or why it was refused
        (a `BrokerError`, or any other exception, already logged: one event's bug must not drop the
        rest). A database outage raises `Unavailable` for the whole batch; every event is
        idempotent, so the proxy sends the batch again.

        On PostgreSQL the common events are one statement each (`report_sql`), the whole batch sent
        at once in one transaction. When a statement does not settle its event, that transaction is
        undone and the batch goes one event at a time: such an event runs as the transactional use
        case, in its place in the order, and the rest go on. On SQLite the batch runs as the use
        cases in one transaction (`_reports_in_one`).
        """
        results: list[Exception | None] = [None] * len(events)
        if self.store.is_postgres and await self._reports_pipelined(events, results):
            return results
        if not self.store.is_postgres and (
            await self._reports_embedded(events, results)
            or (len(events) > 1 and await self._reports_in_one(events, results))
        ):
            return results
        index = 0
        while index < len(events):
            if self.store.is_postgres:
                index = await self._reports_fast(events, results, index)
                if index >= len(events):
                    break
            try:
                _validate_event(events[index])
                await self._report_use_case(events[index])
            except Unavailable:
                raise
            except BrokerError as exc:
                results[index] = exc
            except Exception as exc:
                log.exception("connection report %d failed: %s", index, events[index])
                results[index] = exc
            index += 1
        return results

    async def _reports_pipelined(
        self, events: Sequence[ConnectionEvent], results: list[Exception | None]
    ) -> bool:
        """The whole batch in one round trip and one transaction; False when it was undone (an event
        needs the use case, or the transaction failed) and nothing of it remains."""
        valid: list[int] = []
        for index, event in enumerate(events):
            try:
                _validate_event(event)
                valid.append(index)
            except BrokerError as exc:
                results[index] = exc
        if not valid:
            return True
        # In session order (each session's own events keep theirs): every batch then locks sessions
        # in the same order, so two proxies' batches never deadlock on them. Events of different
        # sessions commute here; the one case where they would not (reviving an ended session while
        # its user has a newer one) needs the use case, which undoes this and keeps the batch's order.
        valid.sort(key=lambda i: events[i].session_id)
        try:
            async with self.store.raw_autocommit() as conn, conn.transaction():
                outcomes = await report_sql.run_all(conn, [self._statement(events[i]) for i in valid])
                if report_sql.Outcome.USE_CASE in outcomes:
                    raise _Undo
        except (_Undo, Retryable) as exc:
            log.debug("connection reports: batch undone, applied one by one (%r)", exc)
            results[:] = [None] * len(events)
            return False
        for index, outcome in zip(valid, outcomes, strict=True):
            if outcome is report_sql.Outcome.UNKNOWN_SESSION:
                results[index] = NotFound(f"unknown session {events[index].session_id!r}")
        metrics.record_abandoned(outcomes.count(report_sql.Outcome.ABANDONED))
        return True

    def _statement(self, event: ConnectionEvent) -> report_sql.Statement:
        if isinstance(event, Opened):
            return report_sql.opened(event.session_id, event.connection_id, event.proxy_id, self.now())
        return report_sql.closed(
            event.session_id,
            event.connection_id,
            bytes_from_client=event.bytes_from_client,
            bytes_from_server=event.bytes_from_server,
            duration_ms=event.duration_ms,
            end_reason=event.end_reason,
            now=self.now(),
        )

    async def _reports_fast(
        self, events: Sequence[ConnectionEvent], results: list[Exception | None], start: int
    ) -> int:
        """Apply events from `start` on in one transaction (one commit for the lot, not one per
        event), until one needs the use case: answers its index, or the end. When the transaction
        fails (a dead connection, a deadlock with another proxy's batch), nothing of it remains
        and the answer is `start`: the use case applies that event and the rest come back here."""
        index = start
        abandoned = 0
        try:
            async with self.store.raw_autocommit() as conn, conn.transaction():
                await report_sql.lock_servers(conn, sorted({e.session_id for e in events[start:]}))
                while index < len(events):
                    event = events[index]
                    try:
                        _validate_event(event)
                    except BrokerError as exc:
                        results[index] = exc
                        index += 1
                        continue
                    outcome = await report_sql.run(conn, self._statement(event))
                    if outcome is report_sql.Outcome.USE_CASE:
                        break  # what came before commits first: the order holds
                    if outcome is report_sql.Outcome.UNKNOWN_SESSION:
                        results[index] = NotFound(f"unknown session {event.session_id!r}")
                    abandoned += outcome is report_sql.Outcome.ABANDONED
                    index += 1
        except Retryable as exc:
            log.debug("connection reports: batch transaction failed, applied one by one (%s)", exc)
            results[start:index] = [None] * (index - start)
            return start
        metrics.record_abandoned(abandoned)  # counted once committed
        return index

    async def _reports_embedded(
        self, events: Sequence[ConnectionEvent], results: list[Exception | None]
    ) -> bool:
        """SQLite: the whole batch in plain sqlite3 calls (`embedded_sql`) in one transaction. False
        when an event needs the use case: that transaction is undone and nothing of it remains."""
        abandoned = 0
        try:
            async with self.store.sqlite_transaction() as conn:
                for index, event in enumerate(events):
                    try:
                        _validate_event(event)
                    except BrokerError as exc:
                        results[index] = exc
                        continue
                    outcome = self._embedded_report(conn, event)
                    if outcome is report_sql.Outcome.USE_CASE:
                        raise embedded_sql.NotHere
                    if outcome is report_sql.Outcome.UNKNOWN_SESSION:
                        results[index] = NotFound(f"unknown session {event.session_id!r}")
                    elif outcome is report_sql.Outcome.NEWER_SESSION:
                        results[index] = _newer_session(event.session_id)
                    abandoned += outcome is report_sql.Outcome.ABANDONED
        except (embedded_sql.NotHere, Retryable) as exc:
            log.debug("connection reports: batch undone, applied as the use cases (%r)", exc)
            results[:] = [None] * len(events)
            return False
        self._heard()
        metrics.record_abandoned(abandoned)  # counted once committed
        return True

    def _embedded_report(self, conn: sqlite3.Connection, event: ConnectionEvent) -> report_sql.Outcome:
        now = self.now()
        if isinstance(event, Opened):
            return embedded_sql.opened(conn, event.session_id, event.connection_id, event.proxy_id, now)
        return embedded_sql.closed(
            conn,
            event.session_id,
            event.connection_id,
            bytes_from_client=event.bytes_from_client,
            bytes_from_server=event.bytes_from_server,
            duration_ms=event.duration_ms,
            end_reason=event.end_reason,
            now=now,
            disconnect_for=lambda seconds: now + timedelta(seconds=seconds),
        )

    async def _reports_in_one(
        self, events: Sequence[ConnectionEvent], results: list[Exception | None]
    ) -> bool:
        """SQLite: the whole batch as the use cases, in order, in one transaction (one commit for the
        lot). An event refused (a `BrokerError`) has written nothing (the use cases refuse before
        they write, or inside a savepoint), so the rest go on. False when an event failed otherwise:
        that transaction is undone, nothing of it remains, and the batch goes one event at a time."""

        async def work(r: Repos) -> int:
            results[:] = [None] * len(events)  # a transaction run again answers again
            abandoned = 0
            for index, event in enumerate(events):
                try:
                    _validate_event(event)
                    if isinstance(event, Opened):
                        await self._opened_work(r, event)
                    else:
                        abandoned += await self._closed_work(r, event)
                except Unavailable:
                    raise
                except BrokerError as exc:
                    results[index] = exc
            return abandoned

        try:
            abandoned = await self.run_tx(work)
        except Unavailable:
            raise
        except Exception as exc:  # a bug in one event: the one-by-one path isolates it
            log.debug("connection reports: batch undone, applied one by one (%r)", exc)
            results[:] = [None] * len(events)
            return False
        metrics.record_abandoned(abandoned)
        return True

    async def _report_use_case(self, event: ConnectionEvent) -> None:
        if isinstance(event, Opened):
            await self.run_tx(lambda r: self._opened_work(r, event))
        elif await self.run_tx(lambda r: self._closed_work(r, event)):
            metrics.record_abandoned()

    async def _opened_work(self, r: Repos, event: Opened) -> None:
        """Apply an open. A refusal writes nothing (`_reports_in_one` relies on it)."""
        session_id, connection_id, proxy_id = event.session_id, event.connection_id, event.proxy_id
        now = self.now()
        row = await r.sessions.field(session_id, "state")
        if row is None:
            raise NotFound(f"unknown session {session_id!r}")
        if row.state == d.SessionState.ENDED:
            # Ended meanwhile (expired while the proxy connected): revive it unless the user
            # already has a newer live session.
            try:
                async with r.conn.begin_nested():
                    await r.sessions.open(session_id, connection_id, proxy_id, now)
            except IntegrityError as exc:
                raise _newer_session(session_id) from exc
        else:
            await r.sessions.open(session_id, connection_id, proxy_id, now)
        await r.connections.opened(connection_id, now)

    async def _closed_work(self, r: Repos, event: Closed) -> bool:
        """Apply a close; True when it ended the session as abandoned (a probe that held nothing). A
        refusal writes nothing (`_reports_in_one` relies on it)."""
        session_id, connection_id = event.session_id, event.connection_id
        now = self.now()
        row = await r.sessions.field(
            session_id,
            "state",
            "pool",
            "connection_id",
            "origin_connection_id",
            "learnt_from",
            "confirmed",
        )
        if row is None:
            raise NotFound(f"unknown session {session_id!r}")
        await r.connections.closed(
            connection_id,
            bytes_from_client=event.bytes_from_client,
            bytes_from_server=event.bytes_from_server,
            duration_ms=event.duration_ms,
            end_reason=event.end_reason,
            now=now,
        )
        if row.state == d.SessionState.PENDING and row.origin_connection_id == connection_id:
            # Never reached the server: nothing to keep for the user.
            await r.sessions.end(session_id, event.end_reason or "closed_before_open", now)
        elif row.state == d.SessionState.ACTIVE and row.connection_id == connection_id:
            pool = await r.pools.resolve(row.pool) or d.Pool("")
            junk = d.is_junk_claim(
                pool,
                learnt_from=row.learnt_from,
                confirmed=bool(row.confirmed),
                origin_connection_id=row.origin_connection_id,
                connection_id=connection_id,
                bytes_from_server=event.bytes_from_server,
            )
            if junk:
                return await r.sessions.end(session_id, "abandoned", now)
            await r.sessions.disconnect(session_id, now, now + timedelta(seconds=pool.disconnect_timeout_s))
        return False

    async def proxy_heartbeat(
        self, proxy_id: str, active_connections: int, connection_ids: Sequence[str] | None = None
    ) -> int:
        """Record the proxy as alive; answers the interval (ms) the broker expects heartbeats at.

        When the heartbeat lists every open connection (the count matches), the proxy's active
        sessions on connections it no longer has become disconnected: their close report was lost.
        """
        _require("proxy_id", proxy_id, PROXY_ID_CHARS)
        ids = list(connection_ids or [])
        if len(ids) > MAX_HEARTBEAT_CONNECTIONS:
            raise InvalidInput(f"too many connection_ids (at most {MAX_HEARTBEAT_CONNECTIONS})")
        complete = len(ids) == active_connections

        async def work(r: Repos) -> tuple[int, int]:
            now = self.now()
            await r.proxies.heartbeat(proxy_id, active_connections, now)
            # The servers whose counters these updates may change, first and in address order (as
            # report batches take them): several session rows change here, in no particular order.
            await r.sessions.lock_proxy_servers(proxy_id)
            # A listed connection is open: its session, disconnected by a sweep or an earlier list
            # that could not see it, is active again (complete list or not).
            revived = await r.sessions.revive_listed(proxy_id, ids, now) if ids else 0
            lost = 0
            if complete:
                before = now - timedelta(seconds=self.settings.heartbeat_interval_s)
                for pool in await r.pools.list():
                    lost += await r.sessions.disconnect_unlisted(pool, proxy_id, ids, before, now)
            return revived, lost

        revived, lost = await self.run_tx(work)
        if revived:
            log.info("proxy %s still has %d sessions' connections: active again", proxy_id, revived)
        if lost:
            log.info("proxy %s no longer has %d sessions' connections: disconnected", proxy_id, lost)
        return int(self.settings.heartbeat_interval_s * 1000)

    # --- lookups and operator actions ----------------------------------------------------------

    async def lookup_user_sessions(
        self, user: str, pool: str = "", include_ended: bool = False
    ) -> list[d.Session]:
        _require("user", user)

        async def work(r: Repos) -> list[d.Session]:
            return await account_sessions(r, user, pool, include_ended, 100)

        return await self.run_tx(work)

    async def list_servers(self, pool: str = "") -> list[d.Server]:
        async def work(r: Repos) -> list[d.Server]:
            if not pool:
                return await r.servers.list()
            found = await r.pools.resolve(pool)
            if found is None:
                raise NotFound(f"unknown pool {pool!r}")
            return await r.servers.list(found.name)

        return await self.run_tx(work)

    async def list_pools(self) -> list[d.Pool]:
        async def work(r: Repos) -> list[d.Pool]:
            return await r.pools.list()

        return await self.run_tx(work)

    async def set_server_state(self, address: str, state: d.AdminState) -> d.Server:
        """Drain, maintenance or enable (audited as `server.<verb>`)."""

        async def work(r: Repos, change: Change) -> d.Server:
            _require("address", address)
            before = await r.servers.lock(address)
            if before is None:
                raise NotFound(f"unknown server {address!r}")
            await r.servers.set_admin_state(address, state, self.now())
            if before.admin_state is not state:
                await change.record(r, f"admin_state {before.admin_state.value} -> {state.value}")
            server = await r.servers.get(address)
            assert server is not None
            return server

        server = await audited(self, STATE_ACTIONS[state], address, work)
        log.info("server %s is now %s", address, state.value)
        return server

    async def end_session(self, session_id: str, reason: str = "operator") -> d.Session:
        """Forget a placement (audited as `session.end`); ending an ended session changes nothing."""

        async def work(r: Repos, change: Change) -> d.Session:
            _require("session_id", session_id)
            session = await r.sessions.get(session_id)
            if session is None:
                raise NotFound(f"unknown session {session_id!r}")
            if await r.sessions.end(session_id, reason, self.now()):
                where = f"on {session.server_address} (pool {session.pool}), reason {reason}"
                await change.record(r, where, private=f"user {session.user}" if session.user else "")
            ended = await r.sessions.get(session_id)
            assert ended is not None
            return ended

        return await audited(self, "session.end", session_id, work)

    # --- housekeeping --------------------------------------------------------------------------

    async def _purge_due(self, now: datetime) -> int:
        """History past `retention_s` (audit records past `audit_retention_s`) is deleted at most every
        PURGE_EVERY_S, in transactions of at most PURGE_BATCH rows of each table: finding it reads every
        ended session, and a backlog (a lowered retention) deleted in one transaction would hold its
        locks and WAL for as long."""
        if self._purged_at is not None and (now - self._purged_at).total_seconds() < PURGE_EVERY_S:
            return 0
        self._purged_at = now
        before = now - timedelta(seconds=self.settings.retention_s)
        audit_before = now - timedelta(seconds=self.settings.audit_retention_s)
        size, batches = (
            (PURGE_BATCH, PURGE_MAX_BATCHES)
            if self.store.is_postgres
            else (SQLITE_PURGE_BATCH, SQLITE_PURGE_MAX_BATCHES)
        )
        purged = 0
        for _ in range(batches):

            async def batch(r: Repos) -> int:
                n = await r.sessions.purge_ended(before, size)
                n += await r.audit.purge(audit_before, size)
                return n + await r.connections.purge(before, size)

            done = await self.run_tx(batch)
            purged += done
            if done == 0:
                break
            await asyncio.sleep(0)  # the loop's other work between batches

        async def proxies(r: Repos) -> None:
            await r.proxies.purge(before)
            await purge_refusals(r.conn, before)  # a row per minute and reason: few

        await self.run_tx(proxies)
        return purged

    async def sweep(self) -> dict[str, int]:
        """Expire sessions, disconnect silent proxies' sessions. Idempotent: every replica may run it.

        A proxy is silent when no heartbeat came for the silence window (`proxy_silence_s`). Only a
        window this broker spent hearing counts: after its start or a database outage it judges
        nobody until its database calls have succeeded for a whole window without interruption, so
        every proxy has had its full number of heartbeats to get through (another replica that heard
        them all along judges meanwhile).
        """

        expired = 0
        if not self.store.is_postgres:
            # A statement holds the loop on SQLite: sessions that expire together (a storm's
            # disconnects, one timeout later) end in small batches, the loop free between them.
            while (
                done := await self.run_tx(lambda r: r.sessions.expire(self.now(), SQLITE_EXPIRE_BATCH))
            ) > 0:
                expired += done
                await asyncio.sleep(0)

        async def work(r: Repos) -> dict[str, int]:
            now = self.now()
            ended = expired + (await r.sessions.expire(now) if self.store.is_postgres else 0)
            silent_since = now - timedelta(seconds=self.settings.proxy_silence_s)
            orphaned = 0
            heard = self.heard_since is not None and self.heard_since <= silent_since
            if heard:
                alive = r.proxies.alive_since(silent_since)
                for pool in await r.pools.list():
                    orphaned += await r.sessions.disconnect_orphans(pool, alive, silent_since, now)
            return {"expired": ended, "disconnected": orphaned, "judged_silence": int(heard)}

        counts = await self.run_tx(work)
        if counts["expired"] or counts["disconnected"]:  # said before a purge that may fail
            log.info(
                "sweep: %(expired)d sessions expired, %(disconnected)d disconnected (silent proxy)", counts
            )
        counts["purged"] = await self._purge_due(self.now())
        return counts


_no_new_sessions = d.why_no_new_sessions


def _last_answer(answers: dict[int, d.RouteDecision], attempt: int) -> d.RouteDecision | None:
    """The answer this connection was given last before `attempt`."""
    earlier = [a for a in answers if a < attempt]
    return answers[max(earlier)] if earlier else None


def pool_rules(pool: d.Pool) -> accounts.Rules:
    """The account rules of a pool's settings."""
    return accounts.Rules.of(pool.domain, pool.upn_suffixes)


_NO_ACCOUNTS: tuple[tuple[str, str], accounts.Rules] = (("", ""), accounts.NO_RULES)


def _newer_session(session_id: str) -> Conflict:
    return Conflict(f"session {session_id} has ended and its user has a newer session")


def _unknown_pool(pool: str) -> NotFound:
    return NotFound(
        f"unknown pool {pool!r}"
        if pool
        else "no default pool: apply a farm file with a pool marked `default: true`"
    )


def _column_chars(*columns: Column[str]) -> int:
    """The smallest VARCHAR size among the columns a value is stored in: taken from the tables so a
    check and its column cannot drift apart."""
    return min(cast(String, column.type).length or MAX_ID_CHARS for column in columns)


# Stored ids are bounded by their columns; ids that are only looked up (session ids) by MAX_ID_CHARS.
MAX_ID_CHARS = 256
CONNECTION_ID_CHARS = _column_chars(
    sessions.c.connection_id, sessions.c.origin_connection_id, connections.c.connection_id
)
PROXY_ID_CHARS = _column_chars(sessions.c.proxy_id, connections.c.proxy_id, proxies.c.proxy_id)


def _validate_event(event: ConnectionEvent) -> None:
    _require("session_id", event.session_id)
    _require("connection_id", event.connection_id, CONNECTION_ID_CHARS)
    if isinstance(event, Opened):
        _require("proxy_id", event.proxy_id, PROXY_ID_CHARS)
    elif len(event.end_reason) > 64:
        raise InvalidInput("end_reason is too long (at most 64 characters)")


def _require(name: str, value: str, limit: int = MAX_ID_CHARS) -> None:
    if not value:
        raise InvalidInput(f"{name} is required")
    if len(value) > limit:
        raise InvalidInput(f"{name} is too long ({len(value)} characters, at most {limit})")
    if any(ord(ch) < 0x20 for ch in value):
        raise InvalidInput(f"{name} contains control characters")


def _summary(servers: list[d.Server], now: datetime) -> str:
    """Why no server takes a new session, by the servers as routing sees them at `now`."""
    if not servers:
        return "the pool has no servers"
    states: dict[str, int] = {}
    for s in (d.as_seen_at(server, now) for server in servers):
        if s.is_down:
            key = "down"
        elif s.effective_admin_state is not d.AdminState.ENABLED:
            key = s.effective_admin_state.value
        elif s.load >= 100 or (s.max_sessions and s.held_sessions >= s.max_sessions):
            key = "full"
        else:
            key = "unavailable"
        states[key] = states.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(states.items()))


# --- operator use cases of the REST API (listing, registering, removing) -------------------------
# Module functions over a BrokerService, so the class above stays the routing core. Queries the
# repositories have no method for are built here from `db.tables` (still service -> db).

STATE_ACTIONS = {
    d.AdminState.DRAINING: "server.drain",
    d.AdminState.MAINTENANCE: "server.maintenance",
    d.AdminState.ENABLED: "server.enable",
}


class Change:
    """An operator's change under way, by the caller of the request (`callers.current`). The use case
    calls `record` in its transaction once it has changed something; a call that changed nothing
    stays UNCHANGED (a log line, no record)."""

    def __init__(self, service: BrokerService, action: str, target: str) -> None:
        self.service = service
        self.asked = audit.entry(action, target, audit.UNCHANGED)
        self.entry = self.asked

    async def record(self, r: Repos, detail: str, private: str = "", target: str = "") -> None:
        """Write the record in the change's transaction. `target` names what was changed when the
        request named it otherwise (a pool's name in another case). `private` (a user name) goes in
        the record's detail only, not in the log line: logs are read more widely than this table."""
        self.entry = replace(
            self.entry,
            outcome=audit.OK,
            target=(target or self.entry.target)[: audit.TEXT_CHARS],
            detail=detail[: audit.DETAIL_CHARS],
        )
        stored = "; ".join(part for part in (detail, private) if part)
        await r.audit.add([replace(self.entry, detail=stored[: audit.DETAIL_CHARS])], self.service.now())


async def audited(
    service: BrokerService, action: str, target: str, work: Callable[[Repos, Change], Awaitable[T]]
) -> T:
    """Run an operator's change in a transaction (`run_tx`) and write its audit line however it ends:
    its outcome and detail once committed, or why it was refused or failed (then nothing of it,
    its record included, was kept)."""
    change = Change(service, action, target)

    async def attempt(r: Repos) -> T:
        change.entry = change.asked  # a retried transaction starts over
        return await work(r, change)

    try:
        result = await service.run_tx(attempt)
    except Exception as exc:
        detail = audit.failure_detail(exc)[: audit.DETAIL_CHARS]
        audit.write_log(replace(change.asked, outcome=audit.outcome_of(exc), detail=detail))
        raise
    audit.write_log(change.entry)
    return result


_SERVER_FIELDS = ("pool", "weight", "max_sessions", "agent_url", "sessions_url", "admin_state")


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value) if value == "" else str(value)


def _described(thing: Any, names: Sequence[str]) -> str:
    """`pool default, weight 100, ...`: the fields of a new server, for its audit record."""
    return ", ".join(f"{name} {_shown(getattr(thing, name))}" for name in names)


def _differences(old: Any, new: Any, names: Sequence[str]) -> str:
    """`weight 100 -> 50, admin_state enabled -> draining`: what a change changed ("" for nothing)."""
    return ", ".join(
        f"{name} {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    )


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


@dataclass(frozen=True)
class PoolSummary:
    pool: d.Pool
    servers: int
    live_sessions: int


@dataclass(frozen=True)
class ServerChanges:
    """What PATCH may change; None leaves a field as it is."""

    weight: int | None = None
    max_sessions: int | None = None
    agent_url: str | None = None
    sessions_url: str | None = None
    admin_state: d.AdminState | None = None


async def _pool_named(r: Repos, name: str) -> d.Pool:
    """The pool called `name` (case-insensitively), or the default pool for ""."""
    found = await r.pools.resolve(name)
    if found is None:
        raise NotFound(
            f"unknown pool {name!r}" if name else "there is no default pool: apply a farm file first"
        )
    return found


async def account_candidates(r: Repos, pool: d.Pool, user: str) -> list[d.Session]:
    """The live sessions in the pool another spelling of `user`'s account may be stored under (a
    cut, a bare or a qualified name: `accounts`); more than one means none can be told apart."""
    rules = pool_rules(pool)
    account = accounts.resolve(user, rules)
    probes = accounts.probes(account, rules)
    if not probes:
        return []
    return [
        s
        for s in await r.sessions.live_in_ranges(pool.name, probes)
        if s.user and accounts.compatible(account, accounts.resolve(s.user, rules), rules)
    ]


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
    pools = [await _pool_named(r, pool)] if pool else await r.pools.list()
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


async def find_user_sessions(
    service: BrokerService, user: str, pool: str = "", include_ended: bool = False, limit: int = 50
) -> list[d.Session]:
    """Where is this user? Their sessions, newest first, whatever spelling they were recorded under
    (`account_sessions`)."""
    _require("user", user.strip())

    async def work(r: Repos) -> list[d.Session]:
        return await account_sessions(r, user, pool, include_ended, limit)

    return await service.run_tx(work)


async def list_sessions(
    service: BrokerService, filters: SessionFilter, limit: int, offset: int
) -> SessionPage:
    """One page of the sessions matching every filter, oldest first (stable across pages)."""
    if not filters.states:
        raise InvalidInput("state: at least one state is needed")

    async def work(r: Repos) -> SessionPage:
        where: list[ColumnElement[bool]] = [sessions.c.state.in_([s.value for s in filters.states])]
        if filters.pool:
            where.append(sessions.c.pool == (await _pool_named(r, filters.pool)).name)
        if filters.server:
            where.append(sessions.c.server_address == filters.server)
        if filters.user:
            # The name's key in each pool's rules (one pool's, when filtered by pool).
            each = [await _pool_named(r, filters.pool)] if filters.pool else await r.pools.list()
            keys = {d.user_key(filters.user.strip())} | {
                accounts.key_of(filters.user, pool_rules(p)) for p in each
            }
            where.append(sessions.c.user_key.in_(sorted(keys)))
        total = (await r.conn.execute(select(func.count()).select_from(sessions).where(*where))).scalar_one()
        query = select(sessions).where(*where).order_by(sessions.c.created_at, sessions.c.id)
        rows = await r.conn.execute(query.limit(limit).offset(offset))
        return SessionPage(items=[session_from_row(row) for row in rows], total=int(total))

    return await service.run_tx(work)


async def get_server(service: BrokerService, address: str) -> d.Server:
    async def work(r: Repos) -> d.Server:
        server = await r.servers.get(address)
        if server is None:
            raise NotFound(f"no server is registered at {address}")
        return server

    return await service.run_tx(work)


async def add_server(service: BrokerService, server: d.Server) -> d.Server:
    """Register a server; `server.pool` "" means the default pool. Conflict if the address is taken."""

    async def work(r: Repos, change: Change) -> d.Server:
        if await r.servers.get(server.address) is not None:
            raise Conflict(f"a server is already registered at {server.address}")
        pool = await _pool_named(r, server.pool)
        _check_placement(pool, server)
        now = service.now()
        await r.servers.upsert(replace(server, pool=pool.name), now)
        if server.admin_state is not d.AdminState.ENABLED:
            await r.servers.set_admin_state(server.address, server.admin_state, now)
        added = await r.servers.get(server.address)
        assert added is not None
        await change.record(r, _described(added, _SERVER_FIELDS))
        return added

    added = await audited(service, "server.add", server.address, work)
    log.info("server %s registered in pool %s", added.address, added.pool)
    return added


async def update_server(service: BrokerService, address: str, changes: ServerChanges) -> d.Server:
    async def work(r: Repos, change: Change) -> d.Server:
        server = await r.servers.lock(address)
        if server is None:
            raise NotFound(f"no server is registered at {address}")
        fields = {
            name: value
            for name in ("weight", "max_sessions", "agent_url", "sessions_url")
            if (value := getattr(changes, name)) is not None
        }
        now = service.now()
        if fields.get("max_sessions") == 0:
            _check_placement(await _pool_named(r, server.pool), replace(server, max_sessions=0))
        if fields:
            await r.servers.upsert(replace(server, **fields), now)
        if changes.admin_state is not None and changes.admin_state is not server.admin_state:
            await r.servers.set_admin_state(address, changes.admin_state, now)
        updated = await r.servers.get(address)
        assert updated is not None
        difference = _differences(server, updated, _SERVER_FIELDS)
        if difference:
            await change.record(r, difference)
        return updated

    return await audited(service, "server.update", address, work)


def _check_placement(pool: d.Pool, server: d.Server) -> None:
    for problem in d.placement_problems(pool.placement, [server]):
        raise InvalidInput(f"pool {pool.name}: {problem}")


async def remove_server(service: BrokerService, address: str, force: bool = False) -> int:
    """Unregister a server. Refused (Conflict) while it holds live sessions, unless `force`, which ends
    them first (end reason `server_removed`). Answers how many sessions were ended."""

    async def work(r: Repos, change: Change) -> int:
        server = await r.servers.lock(address)
        if server is None:
            raise NotFound(f"no server is registered at {address}")
        live = await r.sessions.live_on_server(address)
        if live and not force:
            raise Conflict(
                f"{address} holds {len(live)} live session{'s' if len(live) != 1 else ''}: "
                "drain it and wait, or remove it with force=true to end them"
            )
        now = service.now()
        for session, _ in live:
            await r.sessions.end(session.session_id, "server_removed", now)
        await r.servers.delete(address)
        ended = f", {len(live)} live sessions ended" if live else ""
        await change.record(r, f"pool {server.pool}{ended}")
        return len(live)

    ended = await audited(service, "server.remove", address, work)
    log.info("server %s removed (%d live sessions ended)", address, ended)
    return ended


async def pool_summaries(service: BrokerService) -> list[PoolSummary]:
    """Every pool with how many servers it has and how many live sessions are on them."""

    async def work(r: Repos) -> list[PoolSummary]:
        servers_by_pool: dict[str, list[d.Server]] = {}
        for server in await r.servers.list():
            servers_by_pool.setdefault(server.pool, []).append(server)
        return [
            PoolSummary(
                pool=pool,
                servers=len(servers_by_pool.get(pool.name, [])),
                live_sessions=sum(s.live_sessions for s in servers_by_pool.get(pool.name, [])),
            )
            for pool in await r.pools.list()
        ]

    return await service.run_tx(work)


async def _summary_of(r: Repos, pool: d.Pool) -> PoolSummary:
    servers = await r.servers.list(pool.name)
    return PoolSummary(pool=pool, servers=len(servers), live_sessions=sum(s.live_sessions for s in servers))


async def pool_summary(service: BrokerService, name: str) -> PoolSummary:
    """One pool (case-insensitively by name) with its server and live session counts."""

    async def work(r: Repos) -> PoolSummary:
        return await _summary_of(r, await _pool_named(r, name))

    return await service.run_tx(work)


async def update_pool(service: BrokerService, name: str, changes: dict[str, Any]) -> PoolSummary:
    """Change some of a pool's settings (domain.Pool fields, each already within its bounds); refused
    (InvalidInput) when the result breaks a rule across settings. The next farm `apply` sets them
    from the file again."""

    async def work(r: Repos, change: Change) -> PoolSummary:
        unknown = set(changes) - pool_settings.PATCHABLE
        if unknown:
            raise InvalidInput(f"not a pool setting: {', '.join(sorted(unknown))}")
        pool = await _pool_named(r, name)
        changed = replace(pool, **changes)
        problems = pool_settings.pool_problems(changed, service.settings.probe_interval_ms)
        if changed.placement is not pool.placement:
            problems += [
                ("placement", p)
                for p in d.placement_problems(changed.placement, await r.servers.list(pool.name))
            ]
        if problems:
            raise InvalidInput("; ".join(f"{field}: {message}" for field, message in problems))
        if changed != pool:
            await r.pools.upsert(changed, service.now())
            await change.record(r, _differences(pool, changed, sorted(changes)), target=pool.name)
        if (changed.domain, changed.upn_suffixes) != (pool.domain, pool.upn_suffixes):
            # Live sessions move to their accounts' keys under the new rules (docs/accounts.md).
            rekeyed, skipped = await r.sessions.rekey_pool(changed.name, pool_rules(changed), service.now())
            log.info(
                "pool %s: %d live sessions re-keyed, %d kept (key taken)", changed.name, rekeyed, len(skipped)
            )
        return await _summary_of(r, changed)

    summary = await audited(service, "pool.update", name, work)
    log.info("pool %s settings changed: %s", summary.pool.name, ", ".join(sorted(changes)) or "none")
    return summary


async def audit_trail(
    service: BrokerService, filters: AuditFilter, limit: int, before: int | None = None
) -> list[d.AuditEntry]:
    """Operators' changes, newest first: at most `limit`, with ids below `before` when given."""

    async def work(r: Repos) -> list[d.AuditEntry]:
        return await r.audit.page(filters, limit, before)

    return await service.run_tx(work)
