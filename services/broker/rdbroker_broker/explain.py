"""Route explain (`GET /v1/route/explain`, `rdbroker route explain`): which assignment rule a user's
connection meets, which pool it goes to, and which server the routing policy would pick now and why.

It reads what a Route reads, with the same rules (`assignments`, `domain`), and writes nothing: no
session, no answer, no placement counted, no relabelled session. A Route a moment later may still
answer otherwise (another user placed meanwhile, a load report, a broker still on the rules it read
before an `apply`: `assignments_refresh_ms`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from rdbroker_broker import accounts
from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker.db.assignment_repository import AssignmentRepository
from rdbroker_broker.errors import InvalidInput, NotFound
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.common import pool_rules
from rdbroker_broker.service.placement import account_candidates
from rdbroker_broker.store import Repos

TOP_CANDIDATES = 5
Decision = Literal["reconnect", "new", "none"]
RECONNECT: Decision = "reconnect"
NEW: Decision = "new"
NONE: Decision = "none"  # no server can take the user


@dataclass(frozen=True)
class Explanation:
    user: str
    client: str  # the client's IP address as read ("" for none)
    pool_asked: str  # the pool the client named (a `tsv://` collection); "" for none
    match: a.Match  # the assignment rule that picked the pool (position 0: none did, or none was read)
    rules: int  # how many assignment rules there are
    pool: d.Pool
    account_key: str  # the user's account key in that pool
    decision: Decision
    server: str  # where a Route would send the user now ("" for nowhere)
    why: str
    session: d.Session | None = None  # the user's live session in the pool, if any
    notes: list[str] = field(default_factory=list)
    candidates: list[tuple[d.Server, float]] = field(default_factory=list)  # best first, with effective load
    eligible: int = 0  # how many servers take new sessions
    unavailable: list[tuple[d.Server, str]] = field(default_factory=list)  # and why not


def parse_client(text: str) -> a.IpAddress | None:
    """An operator's client address: `10.20.1.5`, `10.20.1.5:50123`, `2001:db8::5` or
    `[2001:db8::5]:50123`; None for ""."""
    value = text.strip()
    if not value:
        return None
    host = value
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            host = ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
        if not port.isdigit():
            host = ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(
            f"client {value!r} is not an IP address "
            "(expected 10.20.1.5, 10.20.1.5:50123, 2001:db8::5 or [2001:db8::5]:50123)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def explain_route(service: BrokerService, user: str, client: str = "", pool: str = "") -> Explanation:
    """What a Route of `user` from `client` (naming `pool`, "" for none) would meet now; reads only."""
    request = d.RouteRequest(connection_id="explain", cookie=user, pool=pool, client_address=client)
    d.validate_route_request(request)
    name = d.identity_from(request, service.settings.max_cookie_chars)
    if not name:
        raise InvalidInput("user is required")
    ip = parse_client(client)

    async def work(r: Repos) -> Explanation:
        return await _explain(r, name, ip, pool.strip(), service.now())

    return await service.run_tx(work)


async def _explain(r: Repos, user: str, ip: a.IpAddress | None, asked: str, now: datetime) -> Explanation:
    rule_set = await AssignmentRepository(r.conn).rule_set()
    match = a.Match() if asked else rule_set.match(user, ip)
    found = await r.pools.resolve(asked or match.pool)
    if found is None:
        raise NotFound(
            f"unknown pool {asked!r}" if asked else "there is no default pool: apply a farm file first"
        )
    rules = pool_rules(found)
    key = accounts.key_of(user, rules)
    explained = Explanation(
        user=user,
        client=str(ip) if ip is not None else "",
        pool_asked=asked,
        match=match,
        rules=len(rule_set.rules),
        pool=found,
        account_key=key,
        decision=NONE,
        server="",
        why="",
    )
    notes = explained.notes
    live = await r.sessions.live_for_user(found.name, key)
    if live is None:
        live = await _account_match(r, found, user, notes)
    if live is not None:
        server = await r.servers.get(live.server_address)
        seen = d.as_seen_at(server, now) if server is not None else None
        where = f"the user's {live.state.value} session {live.session_id} is on {live.server_address}"
        if not live.is_live_at(now):
            notes.append(f"{where} but has expired: a Route ends it and places the user anew")
        elif seen is None:
            notes.append(f"{where}, which is no longer registered: a Route ends it and places the user anew")
        elif not d.takes_reconnects(seen):
            why = "down" if seen.is_down else "in maintenance"
            notes.append(f"{where}, which is {why}: a Route ends it and places the user anew")
        else:
            drain = (
                " (draining: it takes its own users back)"
                if d.why_no_new_sessions(seen) == "draining"
                else ""
            )
            why = f"reconnect: {where}{drain}"
            return replace(explained, decision=RECONNECT, server=live.server_address, why=why, session=live)
    return _placed(explained, [d.as_seen_at(s, now) for s in await r.servers.list(found.name)], live)


async def _account_match(r: Repos, pool: d.Pool, user: str, notes: list[str]) -> d.Session | None:
    """The live session another spelling of the account is stored under, as a Route finds it
    (`service.placement.account_match`), without relabelling it."""
    found = await account_candidates(r, pool, user)
    if len(found) > 1:
        notes.append(f"{user!r} may be any of {len(found)} accounts' live sessions: a Route joins none")
        return None
    return found[0] if found else None


def _placed(explained: Explanation, servers: list[d.Server], live: d.Session | None) -> Explanation:
    placement = explained.pool.placement
    ranked = d.rank_for_new_session(servers, placement=placement)
    shown = replace(
        explained,
        session=live,
        candidates=[(s, d.effective_load(s)) for s in ranked[:TOP_CANDIDATES]],
        eligible=len(ranked),
        unavailable=[(s, d.why_no_new_sessions(s)) for s in servers if not d.takes_new_sessions(s)],
    )
    if not ranked:
        why = "no server of the pool can take a new session" if servers else "the pool has no servers"
        return replace(shown, decision=NONE, why=f"{why}: a Route is refused (RESOURCE_EXHAUSTED)")
    best = ranked[0]
    if placement is d.Placement.DEPTH:
        how = "depth placement takes the highest effective load below its limit"
    else:
        how = "breadth placement takes the lowest effective load"
    why = (
        f"new session: {how} ({d.effective_load(best):.4g} here) among the {len(ranked)} "
        f"server{'' if len(ranked) == 1 else 's'} that take new sessions"
    )
    return replace(shown, decision=NEW, server=best.address, why=why)
