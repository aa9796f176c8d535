"""SQLite for the async engine, run on the event loop's own thread.

The embedded store has one connection and one writer, serialised by the store's gate, and its
statements take microseconds (an index lookup, an append to the write-ahead log with no fsync at
commit). A driver that runs each statement on a worker thread (aiosqlite) costs more than the
statement: a queue hand-off and a loop wake-up per statement, the greater part of a Route's CPU on
SQLite. So SQLAlchemy's aiosqlite dialect is given (through `async_creator`) a connection shaped like
aiosqlite's whose coroutines run the sqlite3 call in place and return without suspending: the
asyncio layer, the dialect and the repositories stay as they are, and a statement blocks the loop for
its own time and no longer.

Two things could block the loop for longer, and are kept off it:
- a checkpoint (copying the WAL into the database, with an fsync): the connection does none itself
  (`wal_autocheckpoint=0`); `Checkpointer` runs them from a thread of its own;
- a lock held by another process on the same file: one process per file is the rule
  (docs/broker.md); `busy_timeout` bounds the wait if it is broken.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sqlalchemy.engine.url import URL

log = logging.getLogger(__name__)


def connector(url: URL) -> Callable[[], Awaitable[InlineConnection]]:
    """The `async_creator` for `create_async_engine` on a `sqlite+aiosqlite://` URL, with the
    arguments SQLAlchemy's dialect would give aiosqlite for that URL."""
    database = str(url.database or ":memory:")
    same_thread = database == ":memory:"  # as SQLAlchemy's dialect: a file may change threads

    async def connect() -> InlineConnection:
        return InlineConnection(sqlite3.connect(database, check_same_thread=same_thread))

    return connect


class InlineConnection:
    """What SQLAlchemy's aiosqlite dialect uses of an `aiosqlite.Connection`, run in place: each
    coroutine does its work and returns without suspending."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._connection: sqlite3.Connection | None = conn  # None once closed, as aiosqlite's
        self._tx = _RunNow()  # the dialect queues its isolation-level change here

    @property
    def sqlite(self) -> sqlite3.Connection:
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        return InlineCursor(self._conn.cursor())

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


class InlineCursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = ()) -> InlineCursor:
        self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _RunNow:
    """aiosqlite's request queue, answered at once: (future, function) -> the future resolved."""

    def put_nowait(self, item: tuple[Any, Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


class Checkpointer:
    """Copies the write-ahead log into the database file from a thread of its own, every
    `interval_s`, so no commit on the loop pays for it. PASSIVE: it never waits for the writer, and
    the writer never waits for it. Under a steady stream of writes a passive checkpoint never
    finds the log fully copied, so the log would only grow (and every page read looks it up):
    past `max_frames` the thread takes a TRUNCATE checkpoint, which waits for the transaction under
    way and holds the next one back while it copies the last frames (most are copied already), then
    empties the log file."""

    def __init__(self, path: str, interval_s: float = 1.0, max_frames: int = 4096) -> None:
        self.path = path
        self.interval_s = interval_s
        self.max_frames = max_frames
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread unless it runs (an engine used again after `dispose` starts it again)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="sqlite-checkpoint", daemon=True
            )
            self._thread.start()

    def stop_soon(self) -> None:
        """Ask the thread to make a last checkpoint and end (it is a daemon: exit never waits)."""
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=5.0)
        except sqlite3.Error as exc:
            log.warning("the SQLite checkpoint thread could not open %s: %s", self.path, exc)
            return
        try:
            while not stop.wait(self.interval_s):
                _, frames, _ = checkpoint(conn)
                if frames > self.max_frames:
                    checkpoint(conn, "TRUNCATE")
            checkpoint(conn, "TRUNCATE")  # leaves an empty log behind when nothing writes
        finally:
            conn.close()


def checkpoint(conn: sqlite3.Connection, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """(busy, frames in the log, frames copied); the next round tries again after an error (the log
    only grows meanwhile)."""
    try:
        busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(busy), int(frames), int(copied)
    except sqlite3.Error as exc:
        log.debug("SQLite checkpoint (%s) failed: %s", mode, exc)
        return 1, 0, 0


def file_of(url: URL) -> str | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database: Any = url.database
    if not database or database == ":memory:" or str(database).startswith("file::memory:"):
        return None
    return str(database)
