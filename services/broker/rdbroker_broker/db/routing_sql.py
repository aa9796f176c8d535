"""The Route hot path on PostgreSQL, in raw psycopg on an autocommit connection.

SQLAlchemy Core costs more Python time per statement than PostgreSQL takes to answer these, so the
one or two statements a common Route needs are plain SQL here (psycopg prepares them on the server
after a few uses). One routing policy: eligibility and ranking stay in `domain`, which decides every
answer; SQL restates three rules, each proven equal to the domain by a test over generated farms:
eligibility under the row lock (`eligible_sql`), the pre-selection of the best candidates
(`rank_key_sql`) and reconnect acceptance (`reconnects_sql`). Anything unusual (tokens, retries,
expired or stranded sessions, a lost race, no unlocked candidate) is left to the transactional path
in `service`, which handles every case.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from rdbroker_broker import domain as d

LIVE_SQL = "('pending', 'active', 'disconnected')"


def eligible_sql(t: str) -> str:
    """`domain.takes_new_sessions` on the `servers` row `t`: not down, operator and agent both
    enabled, weight > 0, load < 100, under its session limit."""
    return (
        f"{t}.health <> 'down' AND {t}.admin_state = 'enabled'"
        f" AND {t}.agent_state NOT IN ('down', 'drain', 'maint') AND {t}.weight > 0 AND {t}.load < 100"
        f" AND ({t}.max_sessions <= 0 OR {t}.live_sessions < {t}.max_sessions)"
    )


def effective_load_sql(t: str) -> str:
    """`domain.effective_load` on the `servers` row `t`, with the same float operations in the same
    order (PostgreSQL's float8 is Python's float, so the values are equal to the bit)."""
    unit = f"(CASE WHEN {t}.max_sessions > 0 THEN 100.0::float8 / {t}.max_sessions ELSE 1.0::float8 END)"
    return (
        f"(CASE WHEN {t}.load >= 0 THEN {t}.load + {t}.placements_since_report * {unit}"
        f" ELSE {t}.live_sessions * {unit} END) / GREATEST({t}.weight, 1)"
    )


def rank_key_sql(t: str) -> str:
    """`domain.rank_for_new_session`'s sort key on the `servers` row `t`: effective load, live
    sessions, then the address in code-point order (COLLATE "C", as Python compares strings)."""
    return f'{effective_load_sql(t)}, {t}.live_sessions, {t}.address COLLATE "C"'


# What ranking reads of a server (`domain.rank_for_new_session`), in this order.
_RANK_FIELDS = (
    "address", "pool", "weight", "max_sessions", "admin_state", "health", "agent_state", "load",
    "placements_since_report", "live_sessions",
)  # fmt: skip
# A placement tries a bounded number of servers before the transactional path takes over, so only
# the best this many eligible servers are fetched (and ranked again in Python by the domain): a
# 200-server pool then costs no more per placement than a 32-server one.
MAX_CANDIDATES = 32
_CANDIDATES = f"""
    SELECT json_agg(json_build_array({", ".join(f"b.{name}" for name in _RANK_FIELDS)}))
    FROM (
        SELECT * FROM servers c
        WHERE c.pool = p.name AND {eligible_sql("c")}
        ORDER BY {rank_key_sql("c")}
        LIMIT {MAX_CANDIDATES}
    ) b
"""
_SESSION_FIELDS = ("id", "user", "server_address", "state", "created_at", "updated_at", "expires_at")


def reconnects_sql(t: str) -> str:
    """`domain.takes_reconnects` on the `servers` row `t`: not down, not in maintenance."""
    return (
        f"{t}.health <> 'down' AND {t}.agent_state NOT IN ('down', 'maint')"
        f" AND {t}.admin_state <> 'maintenance'"
    )


_CONNECTION_COLUMNS = (
    'connection_id, attempt, session_id, proxy_id, server_address, reason, "user", pool, '
    "client_address, created_at, bytes_from_client, bytes_from_server, duration_ms, end_reason"
)

# The pool, the user's live session in it with its server, and, when there is no live session,
# the pool's servers as ranking candidates (one JSON value: cheaper to decode than rows). When the
# live session takes this connection back (not expired, its server takes reconnects), the answer is
# stored in the same statement: a reconnect is one round trip. `domain` decides again in Python.
_CONTEXT = f"""
WITH ctx AS (
    SELECT p.name AS pool_name, p.is_default, p.disconnect_timeout_s,
           {", ".join(f's."{name}" AS s_{name}' for name in _SESSION_FIELDS)},
           {", ".join(f"v.{name} AS v_{name}" for name in _RANK_FIELDS)},
           CASE WHEN s.id IS NULL THEN
               ({_CANDIDATES})
           END AS candidates,
           (s.expires_at IS NULL OR s.expires_at > %(now)s) AND {reconnects_sql("v")} AS reconnects
    FROM pools p
    LEFT JOIN sessions s
        ON s.pool = p.name AND s.user_key = %(user_key)s AND s.state IN {LIVE_SQL}
    LEFT JOIN servers v ON v.address = s.server_address
    WHERE {{pool_filter}}
), answered AS (
    INSERT INTO connections ({_CONNECTION_COLUMNS})
    SELECT %(connection_id)s, %(attempt)s, s_id, %(proxy_id)s, v_address, 'reconnect', s_user, pool_name,
           %(client_address)s, %(now)s, 0, 0, 0, ''
    FROM ctx WHERE reconnects
    ON CONFLICT (connection_id, attempt) DO NOTHING
    RETURNING attempt
)
SELECT pool_name, is_default, disconnect_timeout_s,
       {", ".join(f"s_{name}" for name in _SESSION_FIELDS)},
       {", ".join(f"v_{name}" for name in _RANK_FIELDS)},
       candidates, EXISTS (SELECT FROM answered)
FROM ctx
"""
CONTEXT_DEFAULT = _CONTEXT.format(pool_filter="p.is_default")
CONTEXT_NAMED = _CONTEXT.format(pool_filter="p.name_key = %(pool_key)s")

ANSWER = """
SELECT server_address, session_id, reason, "user", pool FROM connections
WHERE connection_id = %(connection_id)s AND attempt = %(attempt)s
"""

# A whole placement as one statement (autocommit: one implicit transaction). The best-ranked
# server nobody else holds is locked and re-checked under the lock (the live-session counter only
# changes under that lock, by trigger); the session insert loses quietly to another replica's
# placement of the same user (the unique index); the answer insert has no ON CONFLICT, so a repeated
# (connection_id, attempt) fails the statement and nothing of it remains.
PLACE = f"""
WITH chosen AS (
    SELECT address FROM servers
    WHERE address = ANY(%(ranked)s) AND {eligible_sql("servers")}
    ORDER BY array_position(%(ranked)s, address)
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), placed AS (
    INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,
                          origin_connection_id, proxy_id, client_address, created_at, updated_at,
                          expires_at, end_reason)
    SELECT %(session_id)s, %(pool)s, %(user)s, %(user_key)s, address, 'pending', 'route',
           %(connection_id)s, %(session_proxy_id)s, %(client_address)s, %(now)s, %(now)s,
           %(expires_at)s, ''
    FROM chosen
    ON CONFLICT (pool, user_key) WHERE state IN {LIVE_SQL} AND user_key IS NOT NULL DO NOTHING
    RETURNING server_address
), answered AS (
    INSERT INTO connections ({_CONNECTION_COLUMNS})
    SELECT %(connection_id)s, 0, %(session_id)s, %(proxy_id)s, server_address, %(reason)s,
           %(user)s, %(pool)s, %(client_address)s, %(now)s, 0, 0, 0, ''
    FROM placed
    RETURNING server_address
)
SELECT (SELECT server_address FROM answered)
"""

Connection = psycopg.AsyncConnection[Any]
RouteContext = tuple[d.Pool, d.Session | None, d.Server | None, list[d.Server]]


async def route_context(
    conn: psycopg.AsyncConnection[Any], request: d.RouteRequest, key: str, now: datetime
) -> tuple[RouteContext, bool] | None:
    """The pool ("" = the default), the user's live session and its server, else the candidates; and
    whether this connection's reconnect answer was stored. None for an unknown pool."""
    query = CONTEXT_NAMED if request.pool else CONTEXT_DEFAULT
    params = {
        "user_key": key or None,
        "pool_key": request.pool.casefold(),
        "now": now,
        "connection_id": request.connection_id,
        "attempt": request.attempt,
        "proxy_id": request.proxy_id,
        "client_address": request.client_address,
    }
    row = await (await conn.execute(query, params)).fetchone()
    if row is None:
        return None
    found = d.Pool(row[0], row[1], row[2])
    session_at, server_at, candidates_at = 3, 3 + len(_SESSION_FIELDS), 3 + len(_SESSION_FIELDS) + 10
    answered = bool(row[candidates_at + 1])
    if row[session_at] is None:
        return (found, None, None, [_server(c) for c in row[candidates_at] or ()]), answered
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
    server = _server(row[server_at:candidates_at]) if row[server_at] is not None else None
    return (found, session, server, []), answered


async def forget_answer(conn: psycopg.AsyncConnection[Any], request: d.RouteRequest, session_id: str) -> None:
    await conn.execute(
        "DELETE FROM connections WHERE connection_id = %s AND attempt = %s AND session_id = %s",
        (request.connection_id, request.attempt, session_id),
    )


def _server(values: Any) -> d.Server:
    address, pool, weight, max_sessions, admin, health, agent, load, placements, live = values
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
    )


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


async def place(
    conn: psycopg.AsyncConnection[Any],
    request: d.RouteRequest,
    *,
    pool: str,
    user: str,
    ranked: list[str],
    session_id: str,
    now: datetime,
    expires_at: datetime,
) -> str | None:
    """Place a new pending session on the best free ranked server and store the answer (attempt 0).

    The chosen server's address, or None when nothing was placed: every candidate is locked or no
    longer eligible, or the user was placed by another replica meanwhile.
    """
    reason = d.RouteReason.NEW if user else d.RouteReason.NO_IDENTITY
    cur = await conn.execute(
        PLACE,
        {
            "ranked": ranked,
            "session_id": session_id,
            "pool": pool,
            "user": user,
            "user_key": d.user_key(user) if user else None,
            "connection_id": request.connection_id,
            "proxy_id": request.proxy_id,
            "session_proxy_id": request.proxy_id or None,
            "client_address": request.client_address,
            "now": now,
            "expires_at": expires_at,
            "reason": reason.value,
        },
    )
    row = await cur.fetchone()
    return row[0] if row is not None else None
