"""Connection reports: a proxy tells the directory a connection opened or closed.

Every event is idempotent (the proxy sends a batch again after an outage). On PostgreSQL the common
events are one statement each (`report_sql`), on SQLite plain sqlite3 calls (`embedded_sql`); an
event those cannot settle runs as the transactional use case, in its place in the batch's order.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import IntegrityError

from rdbroker_broker import domain as d
from rdbroker_broker import metrics
from rdbroker_broker.db import embedded_sql, report_sql
from rdbroker_broker.errors import BrokerError, InvalidInput, NotFound, Unavailable
from rdbroker_broker.service.common import CONNECTION_ID_CHARS, PROXY_ID_CHARS, newer_session, require
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos, Retryable

log = logging.getLogger(__name__)


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


class _Undo(Exception):
    """Rolls a pipelined report batch back: one of its events needs the use case."""


def _validate_event(event: ConnectionEvent) -> None:
    require("session_id", event.session_id)
    require("connection_id", event.connection_id, CONNECTION_ID_CHARS)
    if isinstance(event, Opened):
        require("proxy_id", event.proxy_id, PROXY_ID_CHARS)
    elif len(event.end_reason) > 64:
        raise InvalidInput("end_reason is too long (at most 64 characters)")


class Reports:
    def __init__(self, core: Core) -> None:
        self.core = core

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
        if self.core.store.is_postgres and await self._reports_pipelined(events, results):
            return results
        if not self.core.store.is_postgres and (
            await self._reports_embedded(events, results)
            or (len(events) > 1 and await self._reports_in_one(events, results))
        ):
            return results
        index = 0
        while index < len(events):
            if self.core.store.is_postgres:
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
        valid = _valid(events, results)
        if not valid:
            return True
        # In the proxy's order, as the use cases would apply them: reviving an ended session
        # depends on whether its user has another live session, which an earlier event of the batch
        # may have ended. Two proxies' batches over the same session cannot deadlock on it: each
        # first locks the servers of its sessions in address order (`report_sql.LOCK_SERVERS`), and a
        # session never changes server, so such batches take their turns on that server's row.
        groups = _statement_groups(events, valid)
        statements = [self._group_statement(events, group) for group in groups]
        try:
            async with self.core.store.raw_autocommit() as conn, conn.transaction():
                found = await report_sql.run_all(conn, statements)
                outcomes = [outcome for each in found for outcome in each]
                if report_sql.Outcome.USE_CASE in outcomes:
                    raise _Undo
        except (_Undo, Retryable) as exc:
            log.debug("connection reports: batch undone, applied one by one (%r)", exc)
            results[:] = [None] * len(events)
            return False
        indexes = [index for group in groups for index in group]
        for index, outcome in zip(indexes, outcomes, strict=True):
            results[index] = _refusal(outcome, events[index])
        metrics.record_abandoned(outcomes.count(report_sql.Outcome.ABANDONED))
        return True

    def _group_statement(self, events: Sequence[ConnectionEvent], group: list[int]) -> report_sql.Statement:
        if len(group) == 1:
            return self._statement(events[group[0]])
        opened, closed = (self._statement(events[index]) for index in group)
        return report_sql.opened_closed(opened, closed)

    def _statement(self, event: ConnectionEvent) -> report_sql.Statement:
        if isinstance(event, Opened):
            return report_sql.opened(event.session_id, event.connection_id, event.proxy_id, self.core.now())
        return report_sql.closed(
            event.session_id,
            event.connection_id,
            bytes_from_client=event.bytes_from_client,
            bytes_from_server=event.bytes_from_server,
            duration_ms=event.duration_ms,
            end_reason=event.end_reason,
            now=self.core.now(),
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
            async with self.core.store.raw_autocommit() as conn, conn.transaction():
                await report_sql.lock_servers(conn, sorted({e.session_id for e in events[start:]}))
                while index < len(events):
                    event = events[index]
                    try:
                        _validate_event(event)
                    except BrokerError as exc:
                        results[index] = exc
                        index += 1
                        continue
                    (outcome,) = await report_sql.run(conn, self._statement(event))
                    if outcome is report_sql.Outcome.USE_CASE:
                        break  # what came before commits first: the order holds
                    results[index] = _refusal(outcome, event)
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
        valid = _valid(events, results)
        try:
            async with self.core.store.sqlite_transaction() as conn:
                for group in _statement_groups(events, valid):
                    outcomes = self._embedded_report(conn, [events[index] for index in group])
                    if report_sql.Outcome.USE_CASE in outcomes:
                        raise embedded_sql.NotHere
                    for index, outcome in zip(group, outcomes, strict=True):
                        results[index] = _refusal(outcome, events[index])
                        abandoned += outcome is report_sql.Outcome.ABANDONED
        except (embedded_sql.NotHere, Retryable) as exc:
            log.debug("connection reports: batch undone, applied as the use cases (%r)", exc)
            results[:] = [None] * len(events)
            return False
        self.core.heard()
        metrics.record_abandoned(abandoned)  # counted once committed
        return True

    def _embedded_report(
        self, conn: sqlite3.Connection, group: list[ConnectionEvent]
    ) -> tuple[report_sql.Outcome, ...]:
        """One event, or an Opened and its Closed (`_statement_groups`): their outcomes."""
        now = self.core.now()
        first, event = group[0], group[-1]
        if isinstance(event, Opened):
            return (embedded_sql.opened(conn, event.session_id, event.connection_id, event.proxy_id, now),)
        closing = embedded_sql.Closing(
            event.bytes_from_client,
            event.bytes_from_server,
            event.duration_ms,
            event.end_reason,
            now,
            lambda seconds: now + timedelta(seconds=seconds),
        )
        if len(group) == 2 and isinstance(first, Opened):
            return embedded_sql.opened_closed(
                conn, event.session_id, event.connection_id, first.proxy_id, closing
            )
        return (embedded_sql.closed(conn, event.session_id, event.connection_id, closing),)

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
            abandoned = await self.core.run_tx(work)
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
            await self.core.run_tx(lambda r: self._opened_work(r, event))
        elif await self.core.run_tx(lambda r: self._closed_work(r, event)):
            metrics.record_abandoned()

    async def _opened_work(self, r: Repos, event: Opened) -> None:
        """Apply an open. A refusal writes nothing (`_reports_in_one` relies on it)."""
        session_id, connection_id, proxy_id = event.session_id, event.connection_id, event.proxy_id
        now = self.core.now()
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
                raise newer_session(session_id) from exc
        else:
            await r.sessions.open(session_id, connection_id, proxy_id, now)
        await r.connections.opened(connection_id, now)

    async def _closed_work(self, r: Repos, event: Closed) -> bool:
        """Apply a close; True when it ended the session as abandoned (a probe that held nothing). A
        refusal writes nothing (`_reports_in_one` relies on it)."""
        session_id, connection_id = event.session_id, event.connection_id
        now = self.core.now()
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


def _valid(events: Sequence[ConnectionEvent], results: list[Exception | None]) -> list[int]:
    """The indexes of the events that pass validation; each other event's refusal in `results`."""
    valid: list[int] = []
    for index, event in enumerate(events):
        try:
            _validate_event(event)
            valid.append(index)
        except BrokerError as exc:
            results[index] = exc
    return valid


def _statement_groups(events: Sequence[ConnectionEvent], valid: list[int]) -> list[list[int]]:
    """The events at `valid` as the statements that apply them, in order: each alone, except an
    Opened and the Closed of the same session and connection with no other event of either between
    them, which apply as one (`report_sql.OPENED_CLOSED`, `embedded_sql.opened_closed`) in the
    Opened's place. The close moves up past events of other sessions and connections only, and
    their statements do not read this session, but for one: an open of the same user's ended
    session between them, which revives it when the user has no other live session, now sees this
    session as its close left it (ended, when it was junk) rather than live. Both are orders the
    proxy's events could have come in."""
    groups: list[list[int]] = []
    by_session: dict[str, int] = {}  # an Opened that may still pair: its session -> its group
    by_connection: dict[str, int] = {}  # the same, by its connection
    for index in valid:
        event = events[index]
        group = by_session.pop(event.session_id, None)
        if group is not None:  # an open of this session waits: this event pairs with it or ends it
            opened = events[groups[group][0]]
            del by_connection[opened.connection_id]
            if isinstance(event, Closed) and event.connection_id == opened.connection_id:
                groups[group].append(index)
                continue
        group = by_connection.pop(event.connection_id, None)
        if group is not None:  # an open of another session on this connection: no longer pairs
            del by_session[events[groups[group][0]].session_id]
        groups.append([index])
        if isinstance(event, Opened):
            by_session[event.session_id] = by_connection[event.connection_id] = len(groups) - 1
    return groups


def _refusal(outcome: report_sql.Outcome, event: ConnectionEvent) -> Exception | None:
    """What the use case would have refused the event with, for a statement's outcome."""
    if outcome is report_sql.Outcome.UNKNOWN_SESSION:
        return NotFound(f"unknown session {event.session_id!r}")
    if outcome is report_sql.Outcome.NEWER_SESSION:
        return newer_session(event.session_id)
    return None
