"""Route: where a client connection goes, and the answer stored for its (connection, attempt).

A Route validates its request, picks the pool (assignment rules when it names none), then decides in
one transaction: a retried call gets its first answer; after a failure the failover rules; then a
routing token, the user's live session, or a new placement (`placement`). The common first try
runs in the store's own statements (`route_paths`), which answer as this path would.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from rdbroker_broker import accounts, assignments, metrics
from rdbroker_broker import domain as d
from rdbroker_broker.db.assignment_repository import AssignmentRepository
from rdbroker_broker.errors import BrokerError, DatabaseUnavailable, InvalidInput
from rdbroker_broker.service import placement
from rdbroker_broker.service.common import PoolAccounts, pool_rules, unknown_pool
from rdbroker_broker.service.core import Core
from rdbroker_broker.service.failover import Failover
from rdbroker_broker.service.placement import TOKEN_FOLLOWED, TokenNote
from rdbroker_broker.service.route_paths import fast_route
from rdbroker_broker.store import Repos, Retryable
from rdbroker_common.rdp_probe import ProbeResult

RouteContext = tuple[d.Pool, d.Session | None, d.Server | None]

log = logging.getLogger(__name__)


class Routing:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.pool_accounts = PoolAccounts()
        self.failover = Failover(core)
        self.fast = fast_route(core, self.pool_accounts)
        # The assignment rules, which pick the pool of a Route that names none.
        self.assignments = assignments.Cache(
            self._read_assignments, core.settings.assignments_refresh_ms / 1000
        )

    async def _read_assignments(self) -> assignments.RuleSet:
        """The assignment rules, read outside a transaction (reads only), again on a dead pooled
        connection."""

        async def read() -> assignments.RuleSet:
            async with self.core.store.autocommit() as r:
                return await AssignmentRepository(r.conn).rule_set()

        try:
            return await read()
        except Retryable:
            try:
                return await read()
            except Retryable as exc:
                raise DatabaseUnavailable("the database is unreachable") from exc

    async def route(self, request: d.RouteRequest) -> d.RouteDecision:
        d.validate_route_request(request)
        user = d.identity_from(request, self.core.settings.max_cookie_chars)
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
            probe = await self.failover.probe_failed_server(request)
        # On SQLite the whole Route is one transaction on the store's one connection (the gate
        # makes it this call's alone): its first try reads the context in it, as below.
        in_one = request.attempt == 0 and not self.core.store.is_postgres
        if request.attempt == 0 and token_address is None:
            decision = await self.fast.route(request, user)  # the store's one round trip, or None
        elif request.attempt == 0 and self.core.store.is_postgres:
            # A routing token: the context is read outside the transaction (no BEGIN/COMMIT round
            # trips for it), and the transaction decides with this read.
            try:
                async with self.core.store.autocommit() as r:
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
            decision = await self.core.run_tx(work)
        except BrokerError:
            self._token_counted(request, token_address, token, None)
            raise
        self._token_counted(request, token_address, token, decision)
        return self._logged(request, decision)

    def _check_qualified(self, pool: str, user: str) -> None:
        key = accounts.key_of(user, self.pool_accounts.for_pool(pool)[1])
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
        _, rules = self.pool_accounts.for_pool(pool)
        context = await r.sessions.route_context(pool, accounts.key_of(user, rules) if user else "")
        if context is None:
            raise unknown_pool(pool)
        found = context[0]
        if not self.pool_accounts.remember(pool, found) and user:
            live = await r.sessions.live_for_user(found.name, accounts.key_of(user, pool_rules(found)))
            server = await r.servers.get(live.server_address) if live else None
            return found, live, server
        return context

    async def _fast_reconnect(
        self, r: Repos, request: d.RouteRequest, context: RouteContext
    ) -> d.RouteDecision | None:
        pool, live, server = context
        now = self.core.now()
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
        now = self.core.now()
        expires_at = now + timedelta(seconds=self.core.settings.pending_timeout_s)
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
            exclude = await self.failover.after_failure(r, request, answers, now, probe)

        if exclude and user:  # the failure handling may have ended the session read above
            live = await r.sessions.live_for_user(pool.name, accounts.key_of(user, pool_rules(pool)))
            live_server = await r.servers.get(live.server_address) if live else None

        decision = None
        if token_address is not None:
            decision = await placement.route_token(
                r, request, pool, user, live, token_address, exclude, now, expires_at, token
            )
        if decision is None and user:
            decision = await placement.reconnect(r, pool, user, live, live_server, exclude, now)
        if decision is None:
            decision = await placement.place_new(r, pool, user, exclude, request, now, expires_at)
        if not await r.connections.record(request, decision, now):
            # A retried call raced its first try: roll this back and answer what the first try stored.
            raise Retryable("this connection attempt was answered concurrently")
        return decision
