"""Connection reports on PostgreSQL: one statement each, a proxy's batch in one transaction.

A proxy reports every connection twice (opened, closed): at a few thousand connection set-ups per
second these are most of the broker's database work, and SQLAlchemy's transactional path costs
several times what PostgreSQL takes to apply them. Each statement here does what the use case in
`service` does, and says when it did not apply, so the use case runs instead: a session whose pool
cannot be found by name at its close.
A test applies the same event sequences both ways and compares the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any

import psycopg


class Outcome(Enum):
    APPLIED = "applied"
    ABANDONED = "abandoned"  # applied, and it ended the connection's claim as junk
    UNKNOWN_SESSION = "unknown_session"
    USE_CASE = "use_case"  # not applied here: the transactional use case decides
    NEWER_SESSION = "newer_session"  # an ended session not revived: its user has a newer one


# The session becomes active on this connection (from pending, disconnected, or active on another
# connection); the connection row records when it opened. An ended session (expired or ended while
# the proxy connected, a probe's claim abandoned while the user came back to it) is revived, unless
# its user has a newer live session (NEWER_SESSION, nothing written). One that became live after the
# statement's snapshot makes the live-user index refuse the revival: the statement fails, and the
# batch goes one event at a time (the use case tells the event so).
OPENED = """
WITH s AS (
    UPDATE sessions t
    SET state = 'active', connection_id = %(connection_id)s, proxy_id = %(proxy_id)s,
        opened_at = COALESCE(opened_at, %(now)s), disconnected_at = NULL, expires_at = NULL,
        ended_at = NULL, end_reason = '', updated_at = %(now)s
    WHERE id = %(session_id)s AND (state <> 'ended' OR NOT EXISTS (
        SELECT FROM sessions n WHERE n.pool = t.pool AND n.user_key = t.user_key
          AND n.state IN ('pending', 'active', 'disconnected') AND n.id <> t.id
    ))
    RETURNING 1
), c AS (
    UPDATE connections SET opened_at = %(now)s
    WHERE connection_id = %(connection_id)s AND opened_at IS NULL AND EXISTS (SELECT FROM s)
    RETURNING 1
)
SELECT EXISTS (SELECT FROM s), EXISTS (SELECT FROM sessions WHERE id = %(session_id)s)
"""

# The connection row records the close; a pending session whose first connection closed ends (it
# never reached the server); an unconfirmed claim whose own connection carried fewer than the pool's
# junk_bytes from the server ends `abandoned` (a scanner, a health check, a failed client: nothing to
# keep); any other active session whose current connection closed is disconnected until its pool's
# timeout. The three session updates exclude each other (pending; active junk; active not junk), and
# each states its condition on the row itself, so it is re-checked on the newest row under the lock.
# `(state = ...) IS TRUE` is never an index condition: the row is always found by its primary key.
# (With `state = ...` the planner may walk the state index instead, when its statistics saw few
# sessions in that state: at a logon storm's rate that walk costs more than the update.)
# `domain.is_junk_claim` on the session row: an unconfirmed claim of a route, closed by the connection that
# made it, that carried fewer than the pool's junk_bytes from the server.
# (`s`: the CTE with the session's pool settings.)
JUNK = (
    "learnt_from = 'route' AND NOT confirmed AND origin_connection_id = %(connection_id)s"
    " AND %(bytes_from_server)s < (SELECT junk_bytes FROM s)"
)
# The session's pool settings (none when the session is not found; NULLs when its pool is not).
POOL_OF_SESSION = """
    SELECT p.disconnect_timeout_s AS timeout_s, p.junk_bytes
    FROM sessions s LEFT JOIN pools p ON p.name = s.pool
    WHERE s.id = %(session_id)s"""
CLOSED = f"""
WITH s AS ({POOL_OF_SESSION}
), c AS (
    UPDATE connections
    SET closed_at = %(now)s, bytes_from_client = %(bytes_from_client)s,
        bytes_from_server = %(bytes_from_server)s, duration_ms = %(duration_ms)s,
        end_reason = %(end_reason)s
    WHERE connection_id = %(connection_id)s AND closed_at IS NULL AND EXISTS (SELECT FROM s)
    RETURNING 1
), ended AS (
    UPDATE sessions
    SET state = 'ended', end_reason = %(session_end_reason)s, ended_at = %(now)s,
        updated_at = %(now)s, expires_at = NULL
    WHERE id = %(session_id)s AND (state = 'pending') IS TRUE
      AND origin_connection_id = %(connection_id)s
    RETURNING 1
), abandoned AS (
    UPDATE sessions
    SET state = 'ended', end_reason = 'abandoned', ended_at = %(now)s, updated_at = %(now)s,
        expires_at = NULL
    WHERE id = %(session_id)s AND (state = 'active') IS TRUE AND connection_id = %(connection_id)s
      AND ({JUNK}) IS TRUE
    RETURNING 1
), disconnected AS (
    UPDATE sessions
    SET state = 'disconnected', disconnected_at = %(now)s, updated_at = %(now)s,
        expires_at = %(now)s + make_interval(secs => (SELECT timeout_s FROM s))
    WHERE id = %(session_id)s AND (state = 'active') IS TRUE AND connection_id = %(connection_id)s
      AND (SELECT timeout_s FROM s) IS NOT NULL AND ({JUNK}) IS NOT TRUE
    RETURNING 1
)
SELECT EXISTS (SELECT FROM s), (SELECT timeout_s FROM s) IS NOT NULL,
       EXISTS (SELECT FROM sessions WHERE id = %(session_id)s AND (state = 'active') IS TRUE
                                          AND connection_id = %(connection_id)s),
       EXISTS (SELECT FROM abandoned)
"""

# An open and the close of the same connection, one after the other (a scanner, a health check, a
# client that gave up: most of a storm's connections), as one statement: what OPENED then CLOSED
# leave, with one session update and one connection update instead of two of each. Once opened the
# session is active on this connection, so the close either ends it as junk or disconnects it; an
# ended session is revived only as OPENED would (the live-user index refuses a revival into a live
# state, as it refuses OPENED's). An ended session that ends again as junk never becomes live, so the
# index does not see it: when the user's newer live session committed after this statement's snapshot,
# the ended session takes this connection's open and close (it stays ended; the pair would otherwise
# have been refused). A session whose pool is not found by name is left to the use case.
# `s` here is the pool's settings, as in CLOSED; `o` the session's update.
OPENED_CLOSED = f"""
WITH s AS ({POOL_OF_SESSION}
), o AS (
    UPDATE sessions t
    SET state = CASE WHEN ({JUNK}) IS TRUE THEN 'ended' ELSE 'disconnected' END,
        connection_id = %(connection_id)s, proxy_id = %(proxy_id)s,
        opened_at = COALESCE(opened_at, %(now)s),
        disconnected_at = CASE WHEN ({JUNK}) IS TRUE THEN NULL ELSE %(now)s END,
        expires_at = CASE WHEN ({JUNK}) IS TRUE THEN NULL
                          ELSE %(now)s + make_interval(secs => (SELECT timeout_s FROM s)) END,
        ended_at = CASE WHEN ({JUNK}) IS TRUE THEN %(now)s END,
        end_reason = CASE WHEN ({JUNK}) IS TRUE THEN 'abandoned' ELSE '' END,
        updated_at = %(now)s
    WHERE id = %(session_id)s AND (SELECT timeout_s FROM s) IS NOT NULL AND (state <> 'ended' OR NOT EXISTS (
        SELECT FROM sessions n WHERE n.pool = t.pool AND n.user_key = t.user_key
          AND n.state IN ('pending', 'active', 'disconnected') AND n.id <> t.id
    ))
    RETURNING state = 'ended' AS abandoned
), c AS (
    UPDATE connections
    SET opened_at = CASE WHEN opened_at IS NULL AND EXISTS (SELECT FROM o) THEN %(now)s ELSE opened_at END,
        closed_at = COALESCE(closed_at, %(now)s),
        bytes_from_client = CASE WHEN closed_at IS NULL THEN %(bytes_from_client)s ELSE bytes_from_client END,
        bytes_from_server = CASE WHEN closed_at IS NULL THEN %(bytes_from_server)s ELSE bytes_from_server END,
        duration_ms = CASE WHEN closed_at IS NULL THEN %(duration_ms)s ELSE duration_ms END,
        end_reason = CASE WHEN closed_at IS NULL THEN %(end_reason)s ELSE end_reason END
    WHERE connection_id = %(connection_id)s AND EXISTS (SELECT FROM s)
      AND (closed_at IS NULL OR opened_at IS NULL AND EXISTS (SELECT FROM o))
    RETURNING 1
)
SELECT EXISTS (SELECT FROM s), (SELECT timeout_s FROM s) IS NOT NULL, EXISTS (SELECT FROM o),
       COALESCE((SELECT abandoned FROM o), false)
"""


# A statement, its parameters, and what its one result row means: the outcome of each event it
# applies, in their order.
Statement = tuple[str, dict[str, Any], Callable[[tuple[Any, ...]], tuple[Outcome, ...]]]


def opened(session_id: str, connection_id: str, proxy_id: str, now: datetime) -> Statement:
    params = {"session_id": session_id, "connection_id": connection_id, "proxy_id": proxy_id, "now": now}
    return OPENED, params, _opened_outcome


def _opened_outcome(row: tuple[Any, ...]) -> tuple[Outcome]:
    applied, exists = row
    if applied:
        return (Outcome.APPLIED,)
    return (Outcome.NEWER_SESSION if exists else Outcome.UNKNOWN_SESSION,)


def closed(
    session_id: str,
    connection_id: str,
    *,
    bytes_from_client: int,
    bytes_from_server: int,
    duration_ms: int,
    end_reason: str,
    now: datetime,
) -> Statement:
    params = {
        "session_id": session_id,
        "connection_id": connection_id,
        "bytes_from_client": bytes_from_client,
        "bytes_from_server": bytes_from_server,
        "duration_ms": duration_ms,
        "end_reason": end_reason,
        "session_end_reason": end_reason or "closed_before_open",
        "now": now,
    }
    return CLOSED, params, _closed_outcome


def _closed_outcome(row: tuple[Any, ...]) -> tuple[Outcome]:
    exists, pool_found, active_here, abandoned = row
    if not exists:
        return (Outcome.UNKNOWN_SESSION,)
    # The snapshot saw it active on this connection but its pool is gone by that name: the use
    # case resolves the pool (or its defaults) and disconnects or abandons it.
    if active_here and not pool_found:
        return (Outcome.USE_CASE,)
    return (Outcome.ABANDONED if abandoned else Outcome.APPLIED,)


def opened_closed(opened_: Statement, closed_: Statement) -> Statement:
    """OPENED_CLOSED for an `opened` statement and the `closed` one of the same connection and
    session: their outcomes, in that order."""
    return OPENED_CLOSED, {**closed_[1], "proxy_id": opened_[1]["proxy_id"]}, _opened_closed_outcome


def _opened_closed_outcome(row: tuple[Any, ...]) -> tuple[Outcome, Outcome]:
    exists, pool_found, opened_, abandoned = row
    if not exists:
        return Outcome.UNKNOWN_SESSION, Outcome.UNKNOWN_SESSION
    if not pool_found:
        return Outcome.USE_CASE, Outcome.USE_CASE
    return (
        Outcome.APPLIED if opened_ else Outcome.NEWER_SESSION,
        Outcome.ABANDONED if abandoned else Outcome.APPLIED,
    )


async def run(conn: psycopg.AsyncConnection[Any], statement: Statement) -> tuple[Outcome, ...]:
    sql, params, outcome = statement
    row = await (await conn.execute(sql, params)).fetchone()
    assert row is not None  # a SELECT without FROM: always one row
    return outcome(row)


# The server rows a batch's session updates may change (their counters, by trigger), locked first and
# in address order. The statements then find them held: without this two proxies' batches (or a batch
# and a health replica's results, also in address order) could take them in opposite orders and
# deadlock, each deadlock costing PostgreSQL's deadlock_timeout and a replay one event at a time.
LOCK_SERVERS = """
SELECT address FROM servers
WHERE address IN (SELECT server_address FROM sessions WHERE id = ANY(%(ids)s))
ORDER BY address FOR UPDATE
"""


async def lock_servers(conn: psycopg.AsyncConnection[Any], session_ids: list[str]) -> None:
    """Lock the servers of these sessions (LOCK_SERVERS), in a transaction the caller holds."""
    await conn.execute(LOCK_SERVERS, {"ids": session_ids})


async def run_all(
    conn: psycopg.AsyncConnection[Any], statements: list[Statement]
) -> list[tuple[Outcome, ...]]:
    """Every statement sent at once (pipeline mode: one round trip, not one per statement), in
    order, after the servers of their sessions are locked (LOCK_SERVERS); their outcomes in the
    same order. Consecutive statements of one kind go as one `executemany` (each still its own
    execution, in order): psycopg's per-call work is half the client's CPU per statement."""
    session_ids = sorted({params["session_id"] for _, params, _ in statements})
    rows: list[Any] = []
    async with conn.pipeline() as pipeline:
        await conn.execute(LOCK_SERVERS, {"ids": session_ids})
        cursors = []
        for sql, run_ in _runs(statements):
            cursor = conn.cursor()
            await cursor.executemany(sql, run_, returning=True)
            cursors.append(cursor)
        await pipeline.sync()
        for cursor in cursors:
            while True:
                rows.append(await cursor.fetchone())
                if not cursor.nextset():
                    break
    outcomes = []
    for row, (_, _, outcome) in zip(rows, statements, strict=True):
        assert row is not None
        outcomes.append(outcome(row))
    return outcomes


def _runs(statements: list[Statement]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The statements as runs of one SQL text each, in order, with their parameters."""
    runs: list[tuple[str, list[dict[str, Any]]]] = []
    for sql, params, _ in statements:
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params]))
    return runs
