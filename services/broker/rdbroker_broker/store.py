"""The database as the use cases see it: one transaction at a time, with every repository on it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from rdbroker_broker.admission import Gate
from rdbroker_broker.database_state import DatabaseState
from rdbroker_broker.db import inline_sqlite
from rdbroker_broker.db.audit_repository import AuditRepository
from rdbroker_broker.db.health_repositories import LeaseRepository, ProxyRepository
from rdbroker_broker.db.repositories import (
    ConnectionRepository,
    PoolRepository,
    ServerRepository,
    SessionRepository,
)
from rdbroker_broker.errors import BrokerError, DatabaseUnavailable, Unavailable

# serialization_failure, deadlock_detected, lock_not_available (lock_timeout): run it again.
RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}
QUERY_CANCELED = "57014"  # statement_timeout


class Retryable(Exception):
    """A concurrent transaction won a race (unique index, deadlock), or a pooled connection was
    found dead (`connectivity`): run the use case again."""

    def __init__(self, message: str, *, connectivity: bool = False) -> None:
        super().__init__(message)
        self.connectivity = connectivity


@dataclass(frozen=True)
class Repos:
    conn: AsyncConnection
    pools: PoolRepository
    servers: ServerRepository
    sessions: SessionRepository
    connections: ConnectionRepository
    proxies: ProxyRepository
    leases: LeaseRepository
    audit: AuditRepository


class Store:
    """Every connection is taken through `gate` (as many slots as the pool has connections), which
    orders the waiting calls and refuses those that could not be answered in time. Each use's outcome
    feeds `database` (up or down, as the calls find it)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_waiting: int = 1000,
        on_refused: Callable[[str], None] = lambda reason: None,
        database: DatabaseState | None = None,
    ) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        pool: Any = engine.pool
        self.gate = Gate(pool.size(), max_waiting=max_waiting, wait_s=pool.timeout(), on_refused=on_refused)
        self.database = database or DatabaseState()
        self._inline: sqlite3.Connection | None = None  # the SQLite pool's one connection

    @contextmanager
    def _watched(self) -> Iterator[None]:
        """Database errors mapped, and the outcome told to `database`. A dead pooled connection
        (`Retryable`) is not news yet: the use case runs again and `BrokerService.run_tx` tells."""
        try:
            with _mapped_errors():
                yield
        except DatabaseUnavailable as exc:
            self.database.failed(exc)
            raise
        except BrokerError as exc:
            if not isinstance(exc, Unavailable):  # a refusal (not found, no capacity): the database answered
                self.database.succeeded()
            raise
        self.database.succeeded()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repos]:
        """Commit on exit, roll back on an exception; database trouble becomes `DatabaseUnavailable`."""
        async with self.gate.slot():
            with self._watched():
                async with self._connected() as conn, conn.begin():
                    yield _repos(conn)

    @asynccontextmanager
    async def _connected(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection, closed (returned to the pool) on exit. On SQLite the close runs in
        this task: SQLAlchemy's own exit runs it in a task of its own, so that a cancellation cannot
        stop it halfway, which costs a turn of the event loop with the gate held. Under a storm of
        thousands of connections a turn lasts hundreds of milliseconds; SQLite's gate has one slot,
        so every Route queued behind each transaction, handed on one per turn, and past their
        deadlines nearly all failed (docs/performance.md, "A storm"). The inline driver's close
        never suspends, so nothing can stop it halfway. PostgreSQL's close
        waits for the server (the pool's reset): it keeps SQLAlchemy's shielded exit."""
        if self.is_postgres:
            async with self.engine.connect() as conn:
                yield conn
            return
        conn = await self.engine.connect()
        try:
            yield conn
        finally:
            await conn.close()

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Repos]:
        """Each statement commits on its own: no BEGIN/COMMIT round trips, for reads and for a
        single idempotent write (the Route reconnect fast path).

        On SQLite this is a transaction: its one connection is this call's alone (the gate), a read
        starts none there, and switching the connection's isolation level runs a PRAGMA that makes
        SQLite prepare every cached statement again (~60 µs each, on every statement of the next
        transactions)."""
        if not self.is_postgres:
            async with self.transaction() as r:
                yield r
            return
        async with self.gate.slot():
            with self._watched():
                async with self.engine.connect() as conn:
                    yield _repos(await conn.execution_options(isolation_level="AUTOCOMMIT"))

    @asynccontextmanager
    async def sqlite_transaction(self) -> AsyncIterator[sqlite3.Connection]:
        """The SQLite store's one connection, as sqlite3 sees it, in a transaction: committed on
        exit, rolled back on an exception (the embedded hot path, `db.embedded_sql`). The gate makes
        it this call's alone: no other transaction of this process runs until it ends. The body
        must not await: the connection is used outside the engine's pool (checking it out and in
        costs more than the statements), so only the gate keeps others off it."""
        async with self.gate.slot():
            with self._watched():
                db = self._inline or await self._inline_connection()
                with _mapped_sqlite_errors():
                    try:
                        try:
                            yield db
                        except BaseException:
                            db.rollback()
                            raise
                        db.commit()
                    except sqlite3.ProgrammingError:  # closed by the pool (invalidated, disposed)
                        self._inline = None
                        raise

    async def _inline_connection(self) -> sqlite3.Connection:
        async with self._connected() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, inline_sqlite.InlineConnection)
        self._inline = driver.sqlite
        return driver.sqlite

    @asynccontextmanager
    async def raw_autocommit(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled psycopg connection in autocommit mode, for the Route hot path (PostgreSQL only).

        It comes from the engine's pool (same settings, same bound), bypassing SQLAlchemy's
        per-statement layers; errors are mapped as in `transaction`.
        """
        async with self.gate.slot(), self._raw_autocommit() as conn:
            yield conn

    @asynccontextmanager
    async def _raw_autocommit(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        with self._watched_raw(), _mapped_errors(), _mapped_psycopg_errors():  # connect is not wrapped
            pooled = await self.engine.raw_connection()
        conn: psycopg.AsyncConnection[Any] = pooled.driver_connection  # type: ignore[assignment]
        broken = False
        try:
            with self._watched_raw(), _mapped_psycopg_errors():
                await conn.set_autocommit(True)
                yield conn
            self.database.succeeded()
        except Retryable as exc:
            broken = exc.connectivity
            raise
        finally:
            if broken or conn.info.transaction_status is not psycopg.pq.TransactionStatus.IDLE:
                # Dead, or left mid-statement by a cancelled call: the pool opens a new one. Closing
                # it awaits the driver, so it runs in a greenlet like every other pool operation.
                await greenlet_spawn(pooled.invalidate)
            else:
                await conn.set_autocommit(False)  # as the pool's other users expect it
            await greenlet_spawn(pooled.close)

    @contextmanager
    def _watched_raw(self) -> Iterator[None]:
        try:
            yield
        except DatabaseUnavailable as exc:
            self.database.failed(exc)
            raise

    async def ping(self) -> None:
        """Raise `DatabaseUnavailable` unless the database answers; `database` learns either way. Not
        through the gate: the ping is for an idle broker (`app._watch_database`)."""
        for attempt in range(2):  # the first may meet a pooled connection the database closed
            try:
                with self._watched():
                    async with self.engine.begin() as conn:
                        await conn.exec_driver_sql("SELECT 1")
                return
            except Retryable as exc:
                if attempt:
                    unavailable = DatabaseUnavailable("the database is unreachable")
                    unavailable.__cause__ = exc
                    self.database.failed(unavailable)
                    raise unavailable from exc


def _repos(conn: AsyncConnection) -> Repos:
    return Repos(
        conn=conn,
        pools=PoolRepository(conn),
        servers=ServerRepository(conn),
        sessions=SessionRepository(conn),
        connections=ConnectionRepository(conn),
        proxies=ProxyRepository(conn),
        leases=LeaseRepository(conn),
        audit=AuditRepository(conn),
    )


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        raise Retryable(str(exc.orig)) from exc
    except DBAPIError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate in RETRYABLE_SQLSTATES:
            raise Retryable(str(exc.orig)) from exc
        if sqlstate == QUERY_CANCELED:
            raise DatabaseUnavailable("the database did not answer in time") from exc
        if exc.connection_invalidated or _is_connectivity(exc):
            # No pre-ping (a round trip per transaction): a dead pooled connection shows up
            # here instead, is discarded by the pool, and the use case runs once more.
            raise Retryable(str(exc.orig), connectivity=True) from exc
        raise
    except PoolTimeout as exc:
        # The database may be fine: every pooled connection stayed busy for the pool's timeout.
        raise DatabaseUnavailable(
            "the broker is overloaded: no database connection came free in time"
        ) from exc
    except OSError as exc:
        raise DatabaseUnavailable("the database is unreachable") from exc


@contextmanager
def _mapped_psycopg_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.IntegrityError as exc:
        raise Retryable(str(exc)) from exc
    except psycopg.Error as exc:
        sqlstate = exc.sqlstate
        if sqlstate in RETRYABLE_SQLSTATES:
            raise Retryable(str(exc)) from exc
        if sqlstate == QUERY_CANCELED:
            raise DatabaseUnavailable("the database did not answer in time") from exc
        if (
            (sqlstate or "").startswith(("08", "57P0"))
            or sqlstate == "25006"
            or (sqlstate is None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError))
        ):
            raise Retryable(str(exc), connectivity=True) from exc
        raise
    except OSError as exc:
        raise DatabaseUnavailable("the database is unreachable") from exc


@contextmanager
def _mapped_sqlite_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Retryable(str(exc)) from exc
    except sqlite3.ProgrammingError as exc:  # a closed connection: the caller takes another path
        raise Retryable(str(exc), connectivity=True) from exc
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O error
        raise DatabaseUnavailable(f"the database file cannot be used: {exc}") from exc


def _is_connectivity(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    # 08xxx connection exceptions, 57P0x admin shutdown / cannot connect now, 25006 read-only (a standby).
    if sqlstate is not None:
        return bool(sqlstate.startswith(("08", "57P0")) or sqlstate == "25006")
    return type(exc.orig).__name__ in ("OperationalError", "InterfaceError")
