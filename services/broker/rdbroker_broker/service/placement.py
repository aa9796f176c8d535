"""The steps of a Route inside its transaction: follow a routing token, join the user's live
session, or place them anew on the best server that takes them. Each step takes the transaction's
repositories and decides by the domain's rules."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from rdbroker_broker import accounts, metrics
from rdbroker_broker import domain as d
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.errors import CapacityStarting, NoCapacity, PermissionDenied
from rdbroker_broker.service.common import pool_rules
from rdbroker_broker.store import Repos, Retryable

log = logging.getLogger(__name__)

# How many ranked servers a placement tries to lock before giving up on the pool.
MAX_LOCK_TRIES = 16


@dataclass
class TokenNote:
    """What a Route made of its routing token: a `metrics.TOKEN_OUTCOMES` value and, for a token
    not followed, why (counted and logged once its transaction is over)."""

    outcome: str = ""
    why: str = ""


# Outcomes where the connection went where its token said.
TOKEN_FOLLOWED = frozenset({"honoured", "reconnect", "no_identity"})


async def route_token(
    r: Repos,
    request: d.RouteRequest,
    pool: d.Pool,
    user: str,
    live: d.Session | None,
    address: str,
    exclude: list[str],
    now: datetime,
    expires_at: datetime,
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
        mine = live if home is pool else await live_session(r, home, user)
        if mine is None:  # another spelling of the account may hold it (the rule of `_reconnect`)
            mine = await account_match(r, home, user, now)
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
        session_id = await insert_pending(r, home, "", address, request, now, expires_at)
        assert session_id is not None  # an anonymous session is never a duplicate
        return d.RouteDecision(address, session_id, d.RouteReason.TOKEN, "", home.name)
    if home is not pool:
        return ignored("ignored_policy", f"the server is in pool {home.name}, not {pool.name}")
    # The server's row locked, its capacity re-checked: what a placement there would check.
    locked = await r.servers.lock(address)
    if locked is None:
        return ignored("ignored_policy", "the server was removed meanwhile")
    why = d.why_no_new_sessions(d.as_seen_at(locked, now))
    if why and user:
        return ignored("ignored_policy", f"the server takes no new sessions ({why})")
    note.outcome = "no_identity" if why else "honoured"  # (filled up meanwhile: as above)
    # One another replica placed meanwhile gets this server without affinity: one live session
    # per account stays true.
    owner = user
    session_id = await insert_pending(r, pool, owner, address, request, now, expires_at)
    if session_id is None:
        owner = ""
        session_id = await insert_pending(r, pool, "", address, request, now, expires_at)
    assert session_id is not None
    return d.RouteDecision(address, session_id, d.RouteReason.TOKEN, owner, pool.name)


async def live_session(r: Repos, pool: d.Pool, user: str) -> d.Session | None:
    return await r.sessions.live_for_user(pool.name, accounts.key_of(user, pool_rules(pool)))


async def reconnect(
    r: Repos,
    pool: d.Pool,
    user: str,
    live: d.Session | None,
    server: d.Server | None,
    exclude: list[str],
    now: datetime,
) -> d.RouteDecision | None:
    if live is None:
        live = await account_match(r, pool, user, now)
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


async def account_match(r: Repos, pool: d.Pool, user: str, now: datetime) -> d.Session | None:
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


async def place_new(
    r: Repos,
    pool: d.Pool,
    user: str,
    exclude: list[str],
    request: d.RouteRequest,
    now: datetime,
    expires_at: datetime,
) -> d.RouteDecision:
    # Routing sees each server as of now: a stale health result reads as no result.
    candidates = [d.as_seen_at(s, now) for s in await r.servers.list(pool.name)]
    ranked = [s.address for s in d.rank_for_new_session(candidates, exclude, pool.placement)]
    chosen = await lock_server(r, ranked, now) if ranked else None
    if chosen is None:
        # A server starting (or about to be) for this pool: the proxy holds the user (power.py).
        wait_s = await PowerRepository(r.conn).start_wait(pool.name)
        if wait_s:
            raise CapacityStarting(
                f"no server in pool {pool.name!r} can take a new session yet: one is starting",
                wait_s,
            )
        raise NoCapacity(
            f"no server in pool {pool.name!r} can take a new session ({summary(candidates, now)})"
        )
    session_id = await insert_pending(r, pool, user, chosen.address, request, now, expires_at)
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


async def lock_server(r: Repos, ranked: list[str], now: datetime) -> d.Server | None:
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


async def insert_pending(
    r: Repos,
    pool: d.Pool,
    user: str,
    address: str,
    request: d.RouteRequest,
    now: datetime,
    expires_at: datetime,
) -> str | None:
    return await r.sessions.insert(
        pool=pool.name,
        rules=pool_rules(pool),
        user=user,
        server_address=address,
        state=d.SessionState.PENDING,
        now=now,
        expires_at=expires_at,
        origin_connection_id=request.connection_id,
        proxy_id=request.proxy_id or None,
        client_address=request.client_address,
    )


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


def summary(servers: list[d.Server], now: datetime) -> str:
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
