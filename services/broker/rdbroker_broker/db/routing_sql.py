"""The Route hot path on PostgreSQL, in raw psycopg on an autocommit connection.

SQLAlchemy Core costs more Python time per statement than PostgreSQL takes to answer these, so the
one statement a common Route needs is plain SQL here (psycopg prepares it on the server after a few
uses). It reads the pool and the user's live session with its server, and then either stores the
reconnect answer or, when there is no live session, places the user: both in that one statement.

Who decides what: the rules live in `domain`; SQL restates three of them, each proven equal to the
domain by `tests/integration/broker/test_route_fast_path.py` over generated farms: eligibility
(`eligible_sql`, re-checked under the server's row lock), the ranking order of the pool's placement
mode (`rank_key_sql`) and
reconnect acceptance (`reconnects_sql` + expiry), each on the server as `domain.as_seen_at` the
statement's `now` sees it (`stale_sql`: a stale health result counts as none). A new placement is
decided by SQL alone (the best eligible server nobody else holds, or, when
another transaction holds every one, the best once its lock is granted); a reconnect stored by SQL is
decided again in Python by the domain (`service`), which takes the answer back if they ever disagree.
The key is the account's canonical key (`accounts`), made with the pool's account settings as the
caller last read them: the statement checks them (`rules_ok`) and does nothing when they changed. A
name whose account may have a session stored under another key (a cut, another spelling) is placed
only when the statement finds no such live session (`placement_guard`). Anything unusual (tokens,
retries, expired or stranded sessions, such a session found, a lost race, no unlocked candidate) is
left to the transactional path in `service`, which handles every case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from rdbroker_broker import accounts
from rdbroker_broker import domain as d

LIVE_SQL = "('pending', 'active', 'disconnected')"


@dataclass(frozen=True, slots=True)
class Dialect:
    """How the rules below are spelt for a store: PostgreSQL's (the default) or SQLite's (the
    embedded store's placement, `embedded_sql`). One text of each rule, held equal to the domain on
    both stores by tests."""

    now: str  # the statement's time
    greatest: str  # the larger of two values
    code_points: str  # a text column compared in code-point order (as Python compares strings)
    unit: str  # `domain.session_unit` of the servers row `{t}`
    order: str  # the pool's order (1 for breadth, -1 for depth)


POSTGRESQL = Dialect(
    now="%(now)s",
    greatest="GREATEST",
    code_points='{column} COLLATE "C"',
    unit="k.u",  # `rank_values_sql`
    order="k.s",
)
# SQLite compares text as UTF-8 bytes (code-point order); its MAX of two values is a scalar; `order`
# is the pool's, read before the statement (`sqlite_order`).
SQLITE = Dialect(
    now=":now",
    greatest="MAX",
    code_points="{column}",
    unit="COALESCE(100.0 / NULLIF(MAX({t}.max_sessions, 0), 0), 1.0)",
    order=":order",
)


def stale_sql(t: str, dialect: Dialect = POSTGRESQL) -> str:
    """`domain.result_is_stale` on the `servers` row `t` at the statement's `now`. NULL for a server
    never probed (no `fresh_until`): used only where NULL counts as false (WHERE, OR, CASE WHEN)."""
    return f"{t}.fresh_until <= {dialect.now}"


def eligible_sql(t: str, dialect: Dialect = POSTGRESQL) -> str:
    """`domain.takes_new_sessions` on `domain.as_seen_at` of the `servers` row `t`: not down, operator
    and agent both enabled, weight > 0, load < 100, under its limit of sessions holding capacity; a
    stale result's health, agent state and load do not count."""
    return (
        f"({t}.health <> 'down' AND {t}.agent_state NOT IN ('down', 'drain', 'maint') AND {t}.load < 100"
        f" OR {stale_sql(t, dialect)}) AND {t}.admin_state = 'enabled' AND {t}.weight > 0"
        f" AND ({t}.max_sessions <= 0 OR {t}.held_sessions < {t}.max_sessions)"
    )


def rank_values_sql(t: str) -> str:
    """PostgreSQL: a LATERAL item with what the ranking reads of the `servers` row `t` more than once:
    `u`, one session's share of the load (`domain.session_unit`), and from the server's pool `s`, the
    order of its placement mode: 1 for breadth (lowest first), -1 for depth (highest first). The
    expressions below read them as `k.u` and `k.s`. (A join: a statement locking rows must say `OF t`.)"""
    unit = f"COALESCE(100 / NULLIF(GREATEST({t}.max_sessions, 0), 0)::float8, 1)"
    order = "CASE placement WHEN 'depth' THEN -1 ELSE 1 END"
    return f"LATERAL (SELECT {unit} u, {order} s FROM pools WHERE name = {t}.pool) k"


def effective_load_sql(t: str, dialect: Dialect = POSTGRESQL) -> str:
    """`domain.effective_load` on `domain.as_seen_at` of the `servers` row `t`, with the same float
    operations in the same order (PostgreSQL's float8 and SQLite's REAL are Python's float, so the
    values are equal to the bit)."""
    unit = dialect.unit.format(t=t)
    return (
        f"(CASE WHEN {t}.load < 0 OR {stale_sql(t, dialect)} THEN {t}.held_sessions * {unit}"
        f" ELSE {t}.load + {t}.placements_since_report * {unit} END) / {dialect.greatest}({t}.weight, 1)"
    )


def rank_key_sql(t: str, dialect: Dialect = POSTGRESQL) -> str:
    """`domain.rank_key` on the `servers` row `t`: effective load, then sessions holding capacity,
    lowest first for breadth and highest first for depth (negated, as the domain negates them: to
    the bit), then the address in code-point order."""
    order, address = dialect.order, dialect.code_points.format(column=f"{t}.address")
    return f"{effective_load_sql(t, dialect)} * {order}, {t}.held_sessions * {order}, {address}"


def sqlite_order(placement: d.Placement) -> int:
    """`SQLITE.order` for a pool's placement mode."""
    return -1 if placement is d.Placement.DEPTH else 1


# What the domain's rules read of a server (ranking, reconnects), in this order.
RANK_FIELDS = (
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
    SELECT p.name AS pool_name, p.is_default, p.disconnect_timeout_s, p.domain, p.upn_suffixes,
           {", ".join(f's."{name}" AS s_{name}' for name in _SESSION_FIELDS)},
           {", ".join(f"v.{name} AS v_{name}" for name in RANK_FIELDS)},
           (s.expires_at IS NULL OR s.expires_at > %(now)s) AND {reconnects_sql("v")} AS reconnects,
           p.domain = %(domain)s AND p.upn_suffixes = %(upn_suffixes)s AS rules_ok
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
    FROM ctx WHERE reconnects AND rules_ok
    ON CONFLICT (connection_id, attempt) DO NOTHING
    RETURNING attempt
){{placement}}
SELECT ctx.*, EXISTS (SELECT FROM answered), {{placed}} FROM ctx
"""

# Without a live session, the same statement places the user (autocommit: one implicit transaction).
# The best-ranked eligible server nobody else holds is locked (SKIP LOCKED: concurrent placements fan
# out over the next-best servers instead of queueing on one row). When every eligible server was
# locked at the snapshot, the waiting variant (`wait`) queues for the best one instead, as the
# transactional path's `lock_server` does; a row that no longer takes the user once its lock is
# granted is passed over for the next in rank order. Either way, should the row have changed since
# the statement's snapshot, PostgreSQL re-checks the eligibility on its newest row under the lock (the
# session counters only change under that lock, by trigger), so a limit is never exceeded. The
# session insert loses quietly to another replica's placement of the same user (the unique index); the
# answer insert has no ON CONFLICT, so a repeated (connection_id, attempt) fails the statement and
# nothing of it remains.
_PLACEMENT = f"""
, chosen AS (
    SELECT c.address, c.pool FROM servers c, {rank_values_sql("c")}
    WHERE c.pool = (SELECT pool_name FROM ctx WHERE s_id IS NULL AND rules_ok{{prefix_guard}})
      AND {eligible_sql("c")}
    ORDER BY {rank_key_sql("c")}
    LIMIT 1
    FOR UPDATE OF c{{skip_locked}}
), placed AS (
    INSERT INTO sessions (id, pool, "user", user_key, account_name, server_address, state, learnt_from,
                          origin_connection_id, proxy_id, client_address, created_at, updated_at,
                          expires_at, end_reason)
    SELECT %(session_id)s, pool, %(user)s, %(user_key)s, %(account_name)s, address, 'pending', 'route',
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
# A name whose account's live session may be stored under another key (a cut, another spelling:
# `accounts.probes`) is placed here only when no live session's key (or user part) falls in any of
# its ranges, read on the byte-order indexes (uq_sessions_live_user, ix_sessions_live_account), one
# probe per range; otherwise the transactional path tells them apart.
# The pool comes from a scalar subquery, not from the outer ctx row: as a correlated column the
# planner left it out of the index condition (prepared, generic plans), and each probe walked every
# live key of every pool (a placement's cost grew with the number of live sessions).
# (The range implies `IS NOT NULL`, which the partial indexes need: a strict operator proves it.)
_RANGES_EMPTY = """
    AND NOT EXISTS (
        SELECT FROM unnest(%({name}f)s::text[], %({name}t)s::text[]) g(lo, hi), LATERAL (
            SELECT FROM sessions t WHERE t.pool = (SELECT pool_name FROM ctx) AND t.state IN {live}
              AND t.{column} ~>=~ lo AND t.{column} ~<~ hi LIMIT 1
        ) x
    )"""
# (LIMIT keeps the subquery LATERAL: one index probe per range, bounded by the range.)


def _guard(keys: bool, names: bool) -> str:
    """Only the probes a name needs: a statement without ranges reads no index for them."""
    key_guard = _RANGES_EMPTY.format(live=LIVE_SQL, name="k", column="user_key") if keys else ""
    name_guard = _RANGES_EMPTY.format(live=LIVE_SQL, name="n", column="account_name") if names else ""
    return key_guard + name_guard


_PLACED = "(SELECT server_address FROM placed_answer)"
_DEFAULT, _NAMED = "p.is_default", "p.name_key = %(pool_key)s"


def compact(sql: str) -> str:
    """One line, single spaces. psycopg parses a statement's placeholders once and caches the
    result only for statements up to 4 KiB; longer ones are parsed again on every call."""
    return " ".join(sql.split())


CONTEXT_DEFAULT = compact(_CONTEXT.format(pool_filter=_DEFAULT, placement="", placed="NULL"))
CONTEXT_NAMED = compact(_CONTEXT.format(pool_filter=_NAMED, placement="", placed="NULL"))
# (key ranges, name ranges, wait) -> the placing statement for the default pool and for a named one.
_PLACING = {
    (keys, names, wait): tuple(
        compact(
            _CONTEXT.format(
                pool_filter=f,
                placement=_PLACEMENT.format(
                    prefix_guard=_guard(keys, names), skip_locked="" if wait else " SKIP LOCKED"
                ),
                placed=_PLACED,
            )
        )
        for f in (_DEFAULT, _NAMED)
    )
    for keys in (False, True)
    for names in (False, True)
    for wait in (False, True)
}
# Named, so that the statement-size test reads every one of them.
CONTEXT_PLACE_DEFAULT, CONTEXT_PLACE_NAMED = _PLACING[(False, False, False)]
CONTEXT_PLACE_NAMES_DEFAULT, CONTEXT_PLACE_NAMES_NAMED = _PLACING[(False, True, False)]
CONTEXT_PLACE_KEYS_DEFAULT, CONTEXT_PLACE_KEYS_NAMED = _PLACING[(True, False, False)]
CONTEXT_PLACE_GUARDED_DEFAULT, CONTEXT_PLACE_GUARDED_NAMED = _PLACING[(True, True, False)]
CONTEXT_PLACE_WAIT_DEFAULT, CONTEXT_PLACE_WAIT_NAMED = _PLACING[(False, False, True)]
CONTEXT_PLACE_GUARDED_WAIT_DEFAULT, CONTEXT_PLACE_GUARDED_WAIT_NAMED = _PLACING[(True, True, True)]


# The ranges a placing statement must find empty: ([key from], [key to], [name from], [name to]).
Guard = tuple[list[str], list[str], list[str], list[str]]
NO_GUARD: Guard = ([], [], [], [])


def placement_guard(probes: accounts.Probes | None) -> Guard | None:
    """The ranges of `accounts.probes` as statement parameters (None stays None: no statement can
    guard the placement, the transactional path places)."""
    if probes is None:
        return None
    return (
        [lo for lo, _ in probes.key_ranges],
        [hi for _, hi in probes.key_ranges],
        [lo for lo, _ in probes.name_ranges],
        [hi for _, hi in probes.name_ranges],
    )


prefix_end = accounts.prefix_end


def _text_array(values: list[str]) -> str:
    """A `text[]` parameter as PostgreSQL's array literal (the statement casts it): psycopg adapts a
    Python list several times slower than a string, on every Route."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def account_settings(pool: d.Pool) -> tuple[str, str]:
    """A pool's account settings as its row stores them (what the context statement compares)."""
    return pool.domain, ",".join(s for s in pool.upn_suffixes if s)


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
    account_name: str = ""  # the user part (sessions.account_name)
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
    pool_accounts: tuple[str, str] = ("", ""),
    wait: bool = False,
) -> Context | None:
    """The pool ("" = the default), the user's live session and its server; the reconnect answer
    stored when SQL's rules take it; with `placement` and no live session, the user placed (with
    `wait`, queueing for the best server's lock rather than passing over locked servers). None for
    an unknown pool. Nothing is stored when the pool's account settings are not `pool_accounts`."""
    params: dict[str, Any] = {
        "user_key": key or None,
        "pool_key": request.pool.casefold(),
        "now": now,
        "connection_id": request.connection_id,
        "attempt": request.attempt,
        "proxy_id": request.proxy_id,
        "client_address": request.client_address,
        # The pool's account settings `key` was made with, as stored (`account_settings`): when the
        # pool's differ, the statement stores and places nothing and the caller reads them anew.
        "domain": pool_accounts[0],
        "upn_suffixes": pool_accounts[1],
    }
    if placement is None:
        query = CONTEXT_NAMED if request.pool else CONTEXT_DEFAULT
    else:
        key_from, key_to, name_from, name_to = placement.guard
        default, named = _PLACING[(bool(key_from), bool(name_from), wait)]
        query = named if request.pool else default
        params["kf"], params["kt"] = _text_array(key_from), _text_array(key_to)
        params["nf"], params["nt"] = _text_array(name_from), _text_array(name_to)
    if placement is not None:
        params["session_id"] = placement.session_id
        params["user"] = placement.user
        params["account_name"] = placement.account_name or None
        params["session_proxy_id"] = request.proxy_id or None
        params["expires_at"] = placement.expires_at
        params["reason"] = (d.RouteReason.NEW if placement.user else d.RouteReason.NO_IDENTITY).value
    row = await (await conn.execute(query, params)).fetchone()
    if row is None:
        return None
    suffixes = tuple(x for x in row[4].split(",") if x)
    found = d.Pool(row[0], row[1], row[2], domain=row[3], upn_suffixes=suffixes)
    session_at = 5
    server_at = session_at + len(_SESSION_FIELDS)
    answered_at = server_at + len(RANK_FIELDS) + 2  # after `reconnects` and `rules_ok`
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
    server = _server(row[server_at : answered_at - 2]) if row[server_at] is not None else None
    return Context(found, session, server, answered, placed)


async def forget_answer(conn: psycopg.AsyncConnection[Any], request: d.RouteRequest, session_id: str) -> None:
    await conn.execute(
        "DELETE FROM connections WHERE connection_id = %s AND attempt = %s AND session_id = %s",
        (request.connection_id, request.attempt, session_id),
    )


def server_of(values: Any, when: Callable[[Any], datetime | None] = lambda t: t) -> d.Server:
    """A server from its `RANK_FIELDS` in that order; `when` reads the store's time (fresh_until)."""
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
        fresh_until=when(fresh_until),
    )


def _server(values: Any) -> d.Server:
    return server_of(values, lambda t: t.astimezone(UTC) if t is not None else None)


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
