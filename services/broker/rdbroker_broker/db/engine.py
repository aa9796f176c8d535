"""The async engine for a database URL: PostgreSQL through psycopg 3, or an embedded SQLite file.

PostgreSQL URLs are handed to psycopg as libpq connection strings (through `async_creator`), so
multi-host DSNs such as `postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write` find the
promoted primary without reconfiguration; SQLAlchemy's own URL parser does not accept them.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rdbroker_broker.db import inline_sqlite
from rdbroker_broker.errors import InvalidInput
from rdbroker_common.redact import hide_url_secrets, redact

_PG_PREFIXES = ("postgresql+psycopg://", "postgresql+psycopg_async://", "postgresql://", "postgres://")
_SQLITE_PREFIXES = ("sqlite+aiosqlite://", "sqlite://")


def is_sqlite(url: str) -> bool:
    return url.startswith(_SQLITE_PREFIXES)


def libpq_dsn(url: str) -> str:
    """`postgresql+psycopg://...` (or `postgres://`) -> the `postgresql://...` string libpq understands."""
    for prefix in _PG_PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    raise InvalidInput(f"not a PostgreSQL URL: {redact(url)}")


def sqlite_url(url: str) -> str:
    for prefix in _SQLITE_PREFIXES:
        if url.startswith(prefix):
            return "sqlite+aiosqlite://" + url[len(prefix) :]
    raise InvalidInput(f"not a SQLite URL: {redact(url)}")


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    statement_timeout_ms: int = 0,
    lock_timeout_ms: int = 0,
    pool_timeout_s: float = 10.0,
) -> AsyncEngine:
    """The engine for `url`. The timeouts (PostgreSQL; 0 = none) bound every statement and lock wait,
    so a stuck database or a lock held by a dying peer turns into an error instead of a hung call;
    `pool_timeout_s` bounds a call's wait for a free pooled connection.

    The URL's password is masked in every log line of this process from here on (`redact.hide`),
    whatever message quotes it."""
    hide_url_secrets(url)
    if is_sqlite(url):
        return _sqlite_engine(sqlite_url(url))
    if url.startswith(_PG_PREFIXES):
        options = " ".join(
            f"-c {name}={value}"
            for name, value in (
                ("statement_timeout", statement_timeout_ms),
                ("lock_timeout", lock_timeout_ms),
            )
            if value
        )
        return _postgres_engine(libpq_dsn(url), pool_size, options, pool_timeout_s)
    raise InvalidInput(f"unsupported database URL {redact(url)!r}: use postgresql://... or sqlite:///file.db")


def _postgres_engine(dsn: str, pool_size: int, options: str, pool_timeout_s: float) -> AsyncEngine:
    async def connect() -> psycopg.AsyncConnection[Any]:
        if options:
            return await psycopg.AsyncConnection.connect(dsn, options=options)
        return await psycopg.AsyncConnection.connect(dsn)

    return create_async_engine(
        "postgresql+psycopg://",
        async_creator=connect,
        pool_size=pool_size,
        # No overflow: calls beyond the pool wait for a connection (up to pool_timeout). Overflow
        # connections are closed on return, so under load every call would open one, and the
        # server would plan every statement and compile the trigger again for each.
        max_overflow=0,
        pool_timeout=pool_timeout_s,
        pool_recycle=1800,
    )


# WAL with synchronous=NORMAL: a commit appends to the write-ahead log without an fsync (the WAL is
# synced at each checkpoint), so a Route's commit waits for no disk flush. The file stays consistent
# after a crash; a power loss (or OS crash) may lose the transactions committed since the last
# checkpoint, about a second's worth (docs/broker.md). wal_autocheckpoint=0: the statements run on the
# event loop's thread (`inline_sqlite`), so checkpoints run on a thread of their own instead.
# busy_timeout: a statement meeting another process's lock on the file waits for it (up to 1 s)
# instead of failing at once; the loop waits with it, so one process per file is the rule.
SQLITE_PRAGMAS = (
    "foreign_keys=ON",
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "wal_autocheckpoint=0",
    "busy_timeout=1000",
)
CHECKPOINT_INTERVAL_S = 1.0


def _sqlite_engine(url: str) -> AsyncEngine:
    # One connection: SQLite has one writer anyway, and sharing one connection serialises the
    # read-then-write transactions (so no "database is locked" upgrades). One process per file.
    # Its statements run on the event loop's thread (`inline_sqlite`).
    engine = create_async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=30,
        async_creator=inline_sqlite.connector(make_url(url)),
    )
    path = inline_sqlite.file_of(engine.url)
    checkpointer = inline_sqlite.Checkpointer(path, CHECKPOINT_INTERVAL_S) if path else None

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()
        if checkpointer is not None:
            checkpointer.start()

    @event.listens_for(engine.sync_engine, "engine_disposed")
    def _disposed(_engine: Any) -> None:
        if checkpointer is not None:
            checkpointer.stop_soon()

    return engine
