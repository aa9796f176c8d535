"""The Route and the connection reports on the embedded SQLite store, in plain sqlite3 calls.

`rdbroker up` runs on SQLite, and there SQLAlchemy's Core costs several times what SQLite takes to
answer (about 100 µs of Python per statement against 10-30 µs in SQLite). The common cases are
therefore written here as plain statements on the store's one connection, inside one transaction
the caller holds (`Store.sqlite_transaction`: the gate makes the connection the caller's alone, so
nothing changes between a read and the write that follows it).

Who decides what: these functions read rows and write rows; the decisions are the domain's
(`domain.takes_reconnects`, `domain.is_junk_claim`, on the rows read here), made by the caller, but
for one: the best server for a new session is ranked in SQL (`BEST_SERVER`), by `routing_sql`'s
rules spelt for SQLite (the PostgreSQL path's own, held equal to `domain.rank_for_new_session` by
tests on both stores), so that a placement in a pool of 200 servers reads one row, not 200; the
caller checks that one with the domain. Anything unusual is left to
the transactional use case in `service`, which handles every case: the caller undoes what was written
and runs it (`NotHere`). The rows written are the use case's own, column for column; tests apply the
same requests and events both ways and compare the tables.

Times are stored as SQLAlchemy's SQLite dialect stores them (naive UTC, `YYYY-MM-DD HH:MM:SS.ffffff`),
so these rows and the ORM's read the same.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.db import routing_sql
from rdbroker_broker.db.report_sql import Outcome

LIVE = "('pending', 'active', 'disconnected')"


class NotHere(Exception):
    """This request needs the transactional use case: undo what was written here and run it."""


def stamp(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite DateTime stores it (naive UTC, microseconds always written)."""
    if value.tzinfo is UTC:  # the common case, in half the time: the offset cut off
        return value.isoformat(sep=" ", timespec="microseconds")[:26]
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ", timespec="microseconds")


def parse(value: str | None) -> datetime | None:
    """A stored time (`stamp`), aware in UTC."""
    return None if value is None else datetime.fromisoformat(value + "+00:00")


# --- Route -------------------------------------------------------------------------------------

_SERVER_COLUMNS = ", ".join(f"v.{name}" for name in routing_sql.RANK_FIELDS)  # as `server_of` reads them
_SESSION_FIELDS = (
    "id", "user", "server_address", "state", "created_at", "updated_at", "disconnected_at", "expires_at",
    "end_reason", "confirmed",
)  # fmt: skip
# The pool, the user's live session in it (by the live-user index: the condition is spelt as the
# index's, which SQLite needs to use a partial index) and that session's server.
_CONTEXT = f"""
SELECT p.name, p.is_default, p.disconnect_timeout_s, p.domain, p.upn_suffixes, p.honor_routing_tokens,
       p.placement, {", ".join(f"s.{name}" for name in _SESSION_FIELDS)}, {_SERVER_COLUMNS}
FROM pools p
LEFT JOIN sessions s ON s.pool = p.name AND s.user_key = :key AND s.state IN {LIVE} AND s.user_key IS NOT NULL
LEFT JOIN servers v ON v.address = s.server_address
WHERE {{where}}
"""
CONTEXT_DEFAULT = _CONTEXT.format(where="p.is_default = 1")
CONTEXT_NAMED = _CONTEXT.format(where="p.name_key = :pool_key")
# The best server of the pool for a new session: the rules of `routing_sql`, spelt for SQLite.
BEST_SERVER = (
    f"SELECT {_SERVER_COLUMNS} FROM servers v"
    f" WHERE v.pool = :pool AND {routing_sql.eligible_sql('v', routing_sql.SQLITE)}"
    f" ORDER BY {routing_sql.rank_key_sql('v', routing_sql.SQLITE)} LIMIT 1"
)
# One probe of a partial index per range: is any live session's key (or user part) in [lo, hi)?
# SQLite's default collation compares UTF-8 bytes, which is code-point order, as `accounts` needs.
_IN_RANGE = (
    "SELECT 1 FROM sessions WHERE pool = ? AND state IN " + LIVE + " AND {column} IS NOT NULL"
    " AND {column} >= ? AND {column} < ? LIMIT 1"
)
KEY_IN_RANGE = _IN_RANGE.format(column="user_key")
NAME_IN_RANGE = _IN_RANGE.format(column="account_name")
INSERT_SESSION = """
INSERT INTO sessions (id, pool, user, user_key, account_name, server_address, state, learnt_from,
                      origin_connection_id, connection_id, proxy_id, client_address, created_at,
                      updated_at, opened_at, disconnected_at, expires_at, ended_at, end_reason, confirmed)
VALUES (?, ?, ?, ?, ?, ?, 'pending', 'route', ?, NULL, ?, ?, ?, ?, NULL, NULL, ?, NULL, '', 0)
"""
INSERT_ANSWER = """
INSERT INTO connections (connection_id, attempt, session_id, proxy_id, server_address, reason, user,
                         pool, client_address, created_at, opened_at, closed_at, bytes_from_client,
                         bytes_from_server, duration_ms, end_reason)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 0, 0, 0, '')
ON CONFLICT (connection_id, attempt) DO NOTHING
"""
ANSWER = """
SELECT server_address, session_id, reason, user, pool FROM connections
WHERE connection_id = ? AND attempt = ?
"""


@dataclass(frozen=True, slots=True)
class Context:
    pool: d.Pool
    live: d.Session | None  # the user's live session in the pool (by its key)
    server: d.Server | None  # that session's server


def _server(values: Any) -> d.Server:
    return routing_sql.server_of(values, parse)


def route_context(conn: sqlite3.Connection, pool: str, key: str) -> Context | None:
    """The pool ("" = the default), the live session under `key` in it and its server; None for an
    unknown pool."""
    query = CONTEXT_NAMED if pool else CONTEXT_DEFAULT
    row = conn.execute(query, {"key": key or None, "pool_key": pool.casefold()}).fetchone()
    if row is None:
        return None
    name, is_default, timeout_s, domain, suffixes, honor, placement = row[:7]
    found = d.Pool(
        name,
        bool(is_default),
        timeout_s,
        domain=domain,
        upn_suffixes=tuple(x for x in suffixes.split(",") if x),
        honor_routing_tokens=bool(honor),
        placement=d.Placement(placement),
    )
    session_at, server_at = 7, 7 + len(_SESSION_FIELDS)
    if row[session_at] is None:
        return Context(found, None, None)
    sid, user, address, state, created, updated, disconnected, expires, end_reason, confirmed = row[
        session_at:server_at
    ]
    session = d.Session(
        session_id=sid,
        user=user,
        pool=found.name,
        server_address=address,
        state=d.SessionState(state),
        created_at=parse(created) or datetime.min.replace(tzinfo=UTC),
        updated_at=parse(updated) or datetime.min.replace(tzinfo=UTC),
        disconnected_at=parse(disconnected),
        expires_at=parse(expires),
        end_reason=end_reason,
        confirmed=bool(confirmed),
    )
    server = _server(row[server_at:]) if row[server_at] is not None else None
    return Context(found, session, server)


def best_server(conn: sqlite3.Connection, pool: d.Pool, now: datetime) -> d.Server | None:
    """The server `domain.rank_for_new_session` puts first among the pool's servers at `now`, as
    stored (None when none takes new sessions)."""
    params = {"pool": pool.name, "now": stamp(now), "order": routing_sql.sqlite_order(pool.placement)}
    row = conn.execute(BEST_SERVER, params).fetchone()
    return None if row is None else _server(row)


def any_live_in_ranges(conn: sqlite3.Connection, pool: str, probes: accounts.Probes) -> bool:
    """Whether a live session's key or user part falls in one of the ranges (`accounts.probes`)."""
    for query, ranges in ((KEY_IN_RANGE, probes.key_ranges), (NAME_IN_RANGE, probes.name_ranges)):
        for lo, hi in ranges:
            if conn.execute(query, (pool, lo, hi)).fetchone() is not None:
                return True
    return False


def insert_pending(
    conn: sqlite3.Connection,
    *,
    session_id: str,
    pool: str,
    user: str,
    account: accounts.Account | None,
    server_address: str,
    request: d.RouteRequest,
    now: datetime,
    expires_at: datetime,
) -> None:
    """A pending session of a new placement (its insert trigger counts it on the server's row).
    Raises sqlite3.IntegrityError when the account has a live session in the pool already."""
    at = stamp(now)
    conn.execute(
        INSERT_SESSION,
        (
            session_id,
            pool,
            user,
            account.key if account else None,
            account.name if account else None,
            server_address,
            request.connection_id,
            request.proxy_id or None,
            request.client_address,
            at,
            at,
            stamp(expires_at),
        ),
    )


def record_answer(
    conn: sqlite3.Connection, request: d.RouteRequest, decision: d.RouteDecision, now: datetime
) -> bool:
    """Store the answer; False when this (connection_id, attempt) has one already."""
    cursor = conn.execute(
        INSERT_ANSWER,
        (
            request.connection_id,
            request.attempt,
            decision.session_id,
            request.proxy_id,
            decision.server_address,
            decision.reason.value,
            decision.user,
            decision.pool,
            request.client_address,
            stamp(now),
        ),
    )
    return cursor.rowcount == 1


def stored_answer(conn: sqlite3.Connection, request: d.RouteRequest) -> d.RouteDecision | None:
    row = conn.execute(ANSWER, (request.connection_id, request.attempt)).fetchone()
    if row is None:
        return None
    address, session_id, reason, user, pool = row
    return d.RouteDecision(address, session_id, d.RouteReason(reason), user, pool)


# --- connection reports ------------------------------------------------------------------------

_SESSION_STATE = "SELECT state FROM sessions WHERE id = ?"
OPEN_SESSION = """
UPDATE sessions
SET state = 'active', connection_id = ?, proxy_id = ?, opened_at = coalesce(opened_at, ?),
    disconnected_at = NULL, expires_at = NULL, ended_at = NULL, end_reason = '', updated_at = ?
WHERE id = ?
"""
CONNECTION_OPENED = "UPDATE connections SET opened_at = ? WHERE connection_id = ? AND opened_at IS NULL"
_CLOSING = """
SELECT s.state, s.connection_id, s.origin_connection_id, s.learnt_from, s.confirmed,
       p.name, p.disconnect_timeout_s, p.junk_bytes
FROM sessions s LEFT JOIN pools p ON p.name = s.pool
WHERE s.id = ?
"""
CONNECTION_CLOSED = """
UPDATE connections
SET closed_at = ?, bytes_from_client = ?, bytes_from_server = ?, duration_ms = ?, end_reason = ?
WHERE connection_id = ? AND closed_at IS NULL
"""
END_SESSION = f"""
UPDATE sessions SET state = 'ended', end_reason = ?, ended_at = ?, updated_at = ?, expires_at = NULL
WHERE id = ? AND state IN {LIVE}
"""
DISCONNECT_SESSION = """
UPDATE sessions SET state = 'disconnected', disconnected_at = ?, expires_at = ?, updated_at = ?
WHERE id = ? AND state = 'active'
"""


def opened(
    conn: sqlite3.Connection, session_id: str, connection_id: str, proxy_id: str, now: datetime
) -> Outcome:
    """The session becomes active on this connection, as `Reports._opened_work` makes it: an ended
    session (expired while the proxy connected) is revived, unless its user has a newer live one
    (the live-user index refuses it: NEWER_SESSION, and nothing of the event is written)."""
    row = conn.execute(_SESSION_STATE, (session_id,)).fetchone()
    if row is None:
        return Outcome.UNKNOWN_SESSION
    at = stamp(now)
    if row[0] == d.SessionState.ENDED.value:
        conn.execute("SAVEPOINT revive")
        try:
            conn.execute(OPEN_SESSION, (connection_id, proxy_id, at, at, session_id))
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO revive")
            return Outcome.NEWER_SESSION
        finally:
            conn.execute("RELEASE revive")
    else:
        conn.execute(OPEN_SESSION, (connection_id, proxy_id, at, at, session_id))
    conn.execute(CONNECTION_OPENED, (at, connection_id))
    return Outcome.APPLIED


@dataclass(frozen=True, slots=True)
class Closing:
    """What a close reports, and `disconnect_for(seconds)`: the expiry of a session disconnected now,
    for its pool's timeout."""

    bytes_from_client: int
    bytes_from_server: int
    duration_ms: int
    end_reason: str
    now: datetime
    disconnect_for: Callable[[int], datetime]

    def connection_row(self, at: str, connection_id: str) -> tuple[Any, ...]:
        """CONNECTION_CLOSED's parameters."""
        reported = (self.bytes_from_client, self.bytes_from_server, self.duration_ms, self.end_reason)
        return (at, *reported, connection_id)


def _junk(
    pool: str,
    junk_bytes: int,
    learnt_from: str,
    confirmed: Any,
    origin: str,
    connection_id: str,
    closing: Closing,
) -> bool:
    """`domain.is_junk_claim` on a session row read here, for the close of `connection_id`."""
    return d.is_junk_claim(
        d.Pool(pool, junk_bytes=junk_bytes),
        learnt_from=learnt_from,
        confirmed=bool(confirmed),
        origin_connection_id=origin,
        connection_id=connection_id,
        bytes_from_server=closing.bytes_from_server,
    )


def closed(conn: sqlite3.Connection, session_id: str, connection_id: str, closing: Closing) -> Outcome:
    """The close as `Reports._closed_work` applies it; a session whose pool cannot be found by name
    is the use case's (it falls back to the defaults)."""
    row = conn.execute(_CLOSING, (session_id,)).fetchone()
    if row is None:
        return Outcome.UNKNOWN_SESSION
    state, current, origin, learnt_from, confirmed, pool_name, timeout_s, junk_bytes = row
    active_here = state == d.SessionState.ACTIVE.value and current == connection_id
    if active_here and pool_name is None:
        return Outcome.USE_CASE
    at = stamp(closing.now)
    conn.execute(CONNECTION_CLOSED, closing.connection_row(at, connection_id))
    if state == d.SessionState.PENDING.value and origin == connection_id:
        conn.execute(END_SESSION, (closing.end_reason or "closed_before_open", at, at, session_id))
    elif active_here:
        if _junk(pool_name, junk_bytes, learnt_from, confirmed, origin, connection_id, closing):
            conn.execute(END_SESSION, ("abandoned", at, at, session_id))
            return Outcome.ABANDONED
        conn.execute(DISCONNECT_SESSION, (at, stamp(closing.disconnect_for(timeout_s)), at, session_id))
    return Outcome.APPLIED


# An open and the close of the same connection as one update each of the session and the connection
# (`opened_closed`); the live-user check stands in for the live-user index, which would refuse the
# revival only into a live state, while OPENED passes through one.
_OPENING_AND_CLOSING = """
SELECT s.state, s.origin_connection_id, s.learnt_from, s.confirmed, p.name, p.disconnect_timeout_s,
       p.junk_bytes
FROM sessions s LEFT JOIN pools p ON p.name = s.pool
WHERE s.id = ?
"""
_NEWER_LIVE = f"""
SELECT 1 FROM sessions s JOIN sessions n ON n.pool = s.pool AND n.user_key = s.user_key
WHERE s.id = ? AND n.state IN {LIVE} AND n.user_key IS NOT NULL AND n.id <> s.id LIMIT 1
"""
OPEN_AND_CLOSE_SESSION = """
UPDATE sessions
SET state = ?, connection_id = ?, proxy_id = ?, opened_at = coalesce(opened_at, ?), disconnected_at = ?,
    expires_at = ?, ended_at = ?, end_reason = ?, updated_at = ?
WHERE id = ?
"""
CONNECTION_OPENED_CLOSED = """
UPDATE connections
SET opened_at = coalesce(opened_at, :at), closed_at = coalesce(closed_at, :at),
    bytes_from_client = CASE WHEN closed_at IS NULL THEN :bytes_from_client ELSE bytes_from_client END,
    bytes_from_server = CASE WHEN closed_at IS NULL THEN :bytes_from_server ELSE bytes_from_server END,
    duration_ms = CASE WHEN closed_at IS NULL THEN :duration_ms ELSE duration_ms END,
    end_reason = CASE WHEN closed_at IS NULL THEN :end_reason ELSE end_reason END
WHERE connection_id = :connection_id AND (opened_at IS NULL OR closed_at IS NULL)
"""


def opened_closed(
    conn: sqlite3.Connection, session_id: str, connection_id: str, proxy_id: str, closing: Closing
) -> tuple[Outcome, Outcome]:
    """`opened` and then `closed` of the same connection, as the two leave the rows, in one update
    of each: once opened the session is active on this connection, so the close ends it as junk or
    disconnects it. A session whose pool cannot be found by name is the use case's."""
    row = conn.execute(_OPENING_AND_CLOSING, (session_id,)).fetchone()
    if row is None:
        return Outcome.UNKNOWN_SESSION, Outcome.UNKNOWN_SESSION
    state, origin, learnt_from, confirmed, pool_name, timeout_s, junk_bytes = row
    if pool_name is None:
        return Outcome.USE_CASE, Outcome.USE_CASE
    at = stamp(closing.now)
    newer = state == d.SessionState.ENDED.value and conn.execute(_NEWER_LIVE, (session_id,)).fetchone()
    if newer:  # not revived; the close finds it ended
        conn.execute(CONNECTION_CLOSED, closing.connection_row(at, connection_id))
        return Outcome.NEWER_SESSION, Outcome.APPLIED
    junk = _junk(pool_name, junk_bytes, learnt_from, confirmed, origin, connection_id, closing)
    if junk:  # (state, disconnected_at, expires_at, ended_at, end_reason)
        after: tuple[str, str | None, str | None, str | None, str] = ("ended", None, None, at, "abandoned")
    else:
        after = ("disconnected", at, stamp(closing.disconnect_for(timeout_s)), None, "")
    new_state, disconnected_at, expires_at, ended_at, end_reason = after
    conn.execute(
        OPEN_AND_CLOSE_SESSION,
        (
            new_state,
            connection_id,
            proxy_id,
            at,
            disconnected_at,
            expires_at,
            ended_at,
            end_reason,
            at,
            session_id,
        ),
    )
    conn.execute(
        CONNECTION_OPENED_CLOSED,
        {
            "at": at,
            "bytes_from_client": closing.bytes_from_client,
            "bytes_from_server": closing.bytes_from_server,
            "duration_ms": closing.duration_ms,
            "end_reason": closing.end_reason,
            "connection_id": connection_id,
        },
    )
    return Outcome.APPLIED, Outcome.ABANDONED if junk else Outcome.APPLIED
