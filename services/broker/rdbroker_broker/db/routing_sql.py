"""The Route hot path on PostgreSQL, in raw psycopg on an autocommit connection.

SQLAlchemy Core costs more Python time per statement than PostgreSQL takes to answer these, so the
one statement a common Route needs is plain SQL here (psycopg prepares it on the server after a few
uses). It reads the pool and the user's live session with its server, and then either stores the
reconnect answer or, when there is no live session, places the user: both in that one statement.

Who decides what: the rules live in `domain`; SQL restates three of them, each proven equal to the
domain by `tests/integration/broker/test_route_fast_path.py` over generated farms: eligibility
(`eligible_sql`, re-checked under the server's row lock), the ranking order (`rank_key_sql`) and
reconnect acceptance (`reconnects_sql` + expiry), each on the server as `domain.as_seen_at` the
statement's `now` sees it (`stale_sql`: a stale health result counts as none). A new placement is
decided by SQL alone (the best eligible server nobody else holds); a reconnect stored by SQL is
decided again in Python by the domain (`service`), which takes the answer back if they ever disagree.
A cookie that may name a session stored under another key (cut to 9 characters, or `DOMAIN\\user`
against a bare name) is placed only when the statement finds no such live session
(`placement_guard`). Anything unusual (tokens, retries, expired or stranded sessions, such a session
found, a lost race, no unlocked candidate) is left to the transactional path in `service`, which
handles every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from rdbroker_broker import domain as d

LIVE_SQL = "('pending', 'active', 'disconnected')"


def stale_sql(t: str) -> str:
    """`domain.result_is_stale` on the `servers` row `t` at the statement's `now`. NULL for a server
    never probed (no `fresh_until`): used only where NULL counts as false (WHERE, OR, CASE WHEN)."""
    return f"{t}.fresh_until <= %(now)s"


def eligible_sql(t: str) -> str:
    """`domain.takes_new_sessions` on `domain.as_seen_at` of the `servers` row `t`: not down, operator
    and agent both enabled, weight > 0, load < 100, under its limit of sessions holding capacity; a
    stale result's health, agent state and load do not count."""
    return (
        f"({t}.health <> 'down' AND {t}.agent_state NOT IN ('down', 'drain', 'maint') AND {t}.load < 100"
        f" OR {stale_sql(t)}) AND {t}.admin_state = 'enabled' AND {t}.weight > 0"
        f" AND ({t}.max_sessions <= 0 OR {t}.held_sessions < {t}.max_sessions)"
    )


def effective_load_sql(t: str) -> str:
    """`domain.effective_load` on `domain.as_seen_at` of the `servers` row `t`, with the same float
    operations in the same order (PostgreSQL's float8 is Python's float, so the values are equal to
    the bit)."""
    unit = f"(CASE WHEN {t}.max_sessions > 0 THEN 100.0::float8 / {t}.max_sessions ELSE 1.0::float8 END)"
    return (
        f"(CASE WHEN {t}.load < 0 OR {stale_sql(t)} THEN {t}.held_sessions * {unit}"
        f" ELSE {t}.load + {t}.placements_since_report * {unit} END) / GREATEST({t}.weight, 1)"
    )


def rank_key_sql(t: str) -> str:
    """`domain.rank_for_new_session`'s sort key on the `servers` row `t`: effective load, sessions
    holding capacity, then the address in code-point order (COLLATE "C", as Python compares strings)."""
    return f'{effective_load_sql(t)}, {t}.held_sessions, {t}.address COLLATE "C"'


# What the domain's rules read of a server (ranking, reconnects), in this order.
_RANK_FIELDS = (
    "address", "pool", "weight", "max_sessions", "admin_state", "health", "agent_state", "load",
    "placements_since_report", "live_sessions", "held_sessions", "fresh_until",
)  # fmt: skip
_SESSION_FIELDS = ("id", "user", "server_address", "state", "created_at", "updated_at", "expires_at")


def reconnects_sql(t: str) -> str:
    """`domain.takes_reconnects` on `domain.as_seen_at` of the `servers` row `t`: not down, not in
    maintenance (a stale result's health and agent state do not count)."""
    return (
        f"({t}.health <> 'down' AND {t}.agent_state NOT IN ('down', 'maint') OR {stale_sql(t)})"
        f" AND {t}.admin_state <> 'maintenance'"
    )


_CONNECTION_COLUMNS = (
    'connection_id, attempt, session_id, proxy_id, server_address, reason, "user", pool, '
    "client_address, created_at, bytes_from_client, bytes_from_server, duration_ms, end_reason"
)

# The pool, the user's live session in it and that session's server. When the live session takes
# this connection back (not expired, its server takes reconnects), the answer is stored in the same
# statement: a reconnect is one round trip. `domain` decides again in Python. The session is read
# LATERAL (OFFSET 0 keeps it so), by (pool, user_key): as a plain join the planner could hash-join
# on the pool and probe the live-user index by user_key alone, walking every key (with statistics
# older than the table's growth).
_CONTEXT = f"""
WITH ctx AS (
    SELECT p.name AS pool_name, p.is_default, p.disconnect_timeout_s,
           {", ".join(f's."{name}" AS s_{name}' for name in _SESSION_FIELDS)},
           {", ".join(f"v.{name} AS v_{name}" for name in _RANK_FIELDS)},
           (s.expires_at IS NULL OR s.expires_at > %(now)s) AND {reconnects_sql("v")} AS reconnects
    FROM pools p
    LEFT JOIN LATERAL (
        SELECT * FROM sessions l WHERE l.pool = p.name AND l.user_key = %(user_key)s AND l.state IN {LIVE_SQL}
        OFFSET 0
    ) s ON true
    LEFT JOIN servers v ON v.address = s.server_address
    WHERE {{pool_filter}}
), answered AS (
    INSERT INTO connections ({_CONNECTION_COLUMNS})
    SELECT %(connection_id)s, %(attempt)s, s_id, %(proxy_id)s, v_address, 'reconnect', s_user, pool_name,
           %(client_address)s, %(now)s, 0, 0, 0, ''
    FROM ctx WHERE reconnects
    ON CONFLICT (connection_id, attempt) DO NOTHING
    RETURNING attempt
){{placement}}
SELECT pool_name, is_default, disconnect_timeout_s,
       {", ".join(f"s_{name}" for name in _SESSION_FIELDS)},
       {", ".join(f"v_{name}" for name in _RANK_FIELDS)},
       EXISTS (SELECT FROM answered), {{placed}}
FROM ctx
"""

# Without a live session, the same statement places the user (autocommit: one implicit transaction).
# The best-ranked eligible server nobody else holds is locked; should it have changed since the
# statement's snapshot, PostgreSQL re-checks the eligibility on its newest row under the lock (the
# session counters only change under that lock, by trigger), so a limit is never exceeded. The
# session insert loses quietly to another replica's placement of the same user (the unique index); the
# answer insert has no ON CONFLICT, so a repeated (connection_id, attempt) fails the statement and
# nothing of it remains.
_PLACEMENT = f"""
, chosen AS (
    SELECT c.address, c.pool FROM servers c
    WHERE c.pool = (SELECT pool_name FROM ctx WHERE s_id IS NULL{{prefix_guard}}) AND {eligible_sql("c")}
    ORDER BY {rank_key_sql("c")}
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), placed AS (
    INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,
                          origin_connection_id, proxy_id, client_address, created_at, updated_at,
                          expires_at, end_reason)
    SELECT %(session_id)s, pool, %(user)s, %(user_key)s, address, 'pending', 'route',
           %(connection_id)s, %(session_proxy_id)s, %(client_address)s, %(now)s, %(now)s,
           %(expires_at)s, ''
    FROM chosen
    ON CONFLICT (pool, user_key) WHERE state IN {LIVE_SQL} AND user_key IS NOT NULL DO NOTHING
    RETURNING server_address, pool
), placed_answer AS (
    INSERT INTO connections ({_CONNECTION_COLUMNS})
    SELECT %(connection_id)s, %(attempt)s, %(session_id)s, %(proxy_id)s, server_address, %(reason)s,
           %(user)s, pool, %(client_address)s, %(now)s, 0, 0, 0, ''
    FROM placed
    RETURNING server_address
)"""
# A cookie whose live session may be stored under another key is placed here only when no live
# session's key falls in either range (what the live-user unique index, in byte order, serves): a 9-character
# cookie may be mstsc's cut of a longer user name the agent linked (keys starting with it), and a
# `DOMAIN\\user` cookie's session may be the one the server reported under the bare user name
# (quser prints none). Otherwise the transactional path tells them apart.
# The pool comes from a scalar subquery, not from the outer ctx row: as a correlated column the
# planner left it out of the index condition (prepared, generic plans), and each probe walked every
# live key of every pool (a placement's cost grew with the number of live sessions).
_KEY_RANGE_EMPTY = """
    AND NOT EXISTS (
        SELECT FROM sessions t
        WHERE t.pool = (SELECT pool_name FROM ctx) AND t.state IN {live} AND t.user_key IS NOT NULL
          AND t.user_key ~>=~ %({name}_from)s AND t.user_key ~<~ %({name}_to)s
    )"""


def _key_guard(*names: str) -> str:
    """One subquery per range, not one with OR: each is then one probe of the index. Only the ranges
    a cookie needs: an empty range ('' to '') would walk every live key of the pool."""
    return "".join(_KEY_RANGE_EMPTY.format(live=LIVE_SQL, name=name) for name in names)


_PLACED = "(SELECT server_address FROM placed_answer)"
_DEFAULT, _NAMED = "p.is_default", "p.name_key = %(pool_key)s"
_PLAIN = _PLACEMENT.format(prefix_guard="")
_OWN = _PLACEMENT.format(prefix_guard=_key_guard("own"))
_BARE = _PLACEMENT.format(prefix_guard=_key_guard("bare"))
_GUARDED = _PLACEMENT.format(prefix_guard=_key_guard("own", "bare"))


def compact(sql: str) -> str:
    """One line, single spaces. psycopg parses a statement's placeholders once and caches the
    result only for statements up to 4 KiB; longer ones are parsed again on every call."""
    return " ".join(sql.split())


CONTEXT_DEFAULT = compact(_CONTEXT.format(pool_filter=_DEFAULT, placement="", placed="NULL"))
CONTEXT_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement="", placed="NULL"))
CONTEXT_PLACE_DEFAULT = compact(_CONTEXT.format(pool_filter=_DEFAULT, placement=_PLAIN, placed=_PLACED))
CONTEXT_PLACE_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement=_PLAIN, placed=_PLACED))
CONTEXT_PLACE_OWN_DEFAULT = compact(_CONTEXT.format(pool_filter=_DEFAULT, placement=_OWN, placed=_PLACED))
CONTEXT_PLACE_OWN_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement=_OWN, placed=_PLACED))
CONTEXT_PLACE_BARE_DEFAULT = compact(_CONTEXT.format(pool_filter=_DEFAULT, placement=_BARE, placed=_PLACED))
CONTEXT_PLACE_BARE_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement=_BARE, placed=_PLACED))
CONTEXT_PLACE_GUARDED_DEFAULT = compact(
    _CONTEXT.format(pool_filter=_DEFAULT, placement=_GUARDED, placed=_PLACED)
)
CONTEXT_PLACE_GUARDED_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement=_GUARDED, placed=_PLACED))
# (own range, bare range) -> the placing statement for the default pool and for a named one.
_PLACING = {
    (False, False): (CONTEXT_PLACE_DEFAULT, CONTEXT_PLACE_NAMED),
    (True, False): (CONTEXT_PLACE_OWN_DEFAULT, CONTEXT_PLACE_OWN_NAMED),
    (False, True): (CONTEXT_PLACE_BARE_DEFAULT, CONTEXT_PLACE_BARE_NAMED),
    (True, True): (CONTEXT_PLACE_GUARDED_DEFAULT, CONTEXT_PLACE_GUARDED_NAMED),
}


Guard = tuple[str, str, str, str]  # [own_from, own_to) and [bare_from, bare_to); ("", "") is empty
NO_GUARD: Guard = ("", "", "", "")


def placement_guard(user: str, key: str) -> Guard | None:
    """The key ranges a placing statement must find empty before placing `user` (NO_GUARD when
    its own key is the only one it can be stored under); None when a range cannot be written."""
    own_from = own_to = bare_from = bare_to = ""
    truncated = d.looks_truncated(user)
    if truncated:
        end = prefix_end(key)
        if end is None:
            return None
        own_from, own_to = key, end
    bare = d.bare_user_key(user)
    if bare and truncated:
        end = prefix_end(bare)
        if end is None:
            return None
        bare_from, bare_to = bare, end
    elif bare:
        bare_from, bare_to = bare, bare + "\x01"  # the bare key alone: no key holds a control character
    return own_from, own_to, bare_from, bare_to


def prefix_end(key: str) -> str | None:
    """The least string above every string starting with `key`, in byte (UTF-8: code point)
    order; None when there is none to write (the key ends in the last code point)."""
    last = ord(key[-1]) + 1
    if last > 0x10FFFF:
        return None
    if 0xD800 <= last <= 0xDFFF:  # surrogates are not characters: the next one is U+E000
        last = 0xE000
    return key[:-1] + chr(last)


ANSWER = """
SELECT server_address, session_id, reason, "user", pool FROM connections
WHERE connection_id = %(connection_id)s AND attempt = %(attempt)s
"""

Connection = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class NewSession:
    """The pending session a placing context statement creates when the user has no live session."""

    session_id: str
    user: str
    expires_at: datetime
    # Key ranges that must hold no live session for the statement to place (`placement_guard`).
    guard: Guard = NO_GUARD


@dataclass(frozen=True, slots=True)
class Context:
    """What the context statement found and did."""

    pool: d.Pool
    live: d.Session | None  # the user's live session in the pool
    server: d.Server | None  # that session's server
    answered: bool  # the reconnect answer for this connection was stored
    placed: str | None  # the server the new session was placed on (a placing statement only)


async def route_context(
    conn: psycopg.AsyncConnection[Any],
    request: d.RouteRequest,
    key: str,
    now: datetime,
    placement: NewSession | None = None,
) -> Context | None:
    """The pool ("" = the default), the user's live session and its server; the reconnect answer
    stored when SQL's rules take it; with `placement` and no live session, the user placed. None for
    an unknown pool."""
    params: dict[str, Any] = {
        "user_key": key or None,
        "pool_key": request.pool.casefold(),
        "now": now,
        "connection_id": request.connection_id,
        "attempt": request.attempt,
        "proxy_id": request.proxy_id,
        "client_address": request.client_address,
    }
    if placement is None:
        query = CONTEXT_NAMED if request.pool else CONTEXT_DEFAULT
    else:
        own_from, own_to, bare_from, bare_to = placement.guard
        default, named = _PLACING[(bool(own_to), bool(bare_to))]
        query = named if request.pool else default
        params.update(own_from=own_from, own_to=own_to, bare_from=bare_from, bare_to=bare_to)
    if placement is not None:
        params["session_id"] = placement.session_id
        params["user"] = placement.user
        params["session_proxy_id"] = request.proxy_id or None
        params["expires_at"] = placement.expires_at
        params["reason"] = (d.RouteReason.NEW if placement.user else d.RouteReason.NO_IDENTITY).value
    row = await (await conn.execute(query, params)).fetchone()
    if row is None:
        return None
    found = d.Pool(row[0], row[1], row[2])
    session_at = 3
    server_at = session_at + len(_SESSION_FIELDS)
    answered_at = server_at + len(_RANK_FIELDS)
    answered, placed = bool(row[answered_at]), row[answered_at + 1]
    if row[session_at] is None:
        return Context(found, None, None, answered, placed)
    sid, user, address, state, created, updated, expires = row[session_at:server_at]
    session = d.Session(
        session_id=sid,
        user=user,
        pool=found.name,
        server_address=address,
        state=d.SessionState(state),
        created_at=created,
        updated_at=updated,
        expires_at=expires.astimezone(UTC) if expires is not None else None,
    )
    server = _server(row[server_at:answered_at]) if row[server_at] is not None else None
    return Context(found, session, server, answered, placed)


async def forget_answer(conn: psycopg.AsyncConnection[Any], request: d.RouteRequest, session_id: str) -> None:
    await conn.execute(
        "DELETE FROM connections WHERE connection_id = %s AND attempt = %s AND session_id = %s",
        (request.connection_id, request.attempt, session_id),
    )


def _server(values: Any) -> d.Server:
    address, pool, weight, max_sessions, admin, health, agent, load, placements, live, held, fresh_until = (
        values
    )
    return d.Server(
        address=address,
        pool=pool,
        weight=weight,
        max_sessions=max_sessions,
        admin_state=d.AdminState(admin),
        health=d.Health(health),
        agent_state=d.AgentState(agent),
        load=load,
        placements_since_report=placements,
        live_sessions=live,
        held_sessions=held,
        fresh_until=fresh_until.astimezone(UTC) if fresh_until is not None else None,
    )


def repeats_an_answer(exc: psycopg.errors.UniqueViolation) -> bool:
    """The placing statement failed because this (connection_id, attempt) has an answer already."""
    return exc.diag.constraint_name == "pk_connections"


async def stored_answer(
    conn: psycopg.AsyncConnection[Any], request: d.RouteRequest
) -> d.RouteDecision | None:
    """The answer already given to this (connection_id, attempt), if any: a retried call gets it."""
    cur = await conn.execute(ANSWER, {"connection_id": request.connection_id, "attempt": request.attempt})
    row = await cur.fetchone()
    if row is None:
        return None
    address, session_id, reason, user, pool = row
    return d.RouteDecision(address, session_id, d.RouteReason(reason), user, pool)
