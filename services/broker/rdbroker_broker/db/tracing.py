"""A child span per database statement, so a traced Route shows its statements.

On PostgreSQL the spans come from the psycopg cursor (every connection of the engine's pool gets a
traced cursor class), so statements sent through SQLAlchemy and those the Route hot path sends on the
raw psycopg connection are traced alike. On SQLite they come from SQLAlchemy's cursor events.

Statements run outside a trace (the sweeper, migrations) are not traced: each would be a one-span
trace of its own, and the check is all they cost. The statement text is cut at `MAX_STATEMENT_CHARS`;
parameters are never recorded (they hold user names).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self, cast

import psycopg
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from psycopg import sql
from psycopg.abc import Params, Query
from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

MAX_STATEMENT_CHARS = 1000
_SPANS = "rdbroker_spans"
_tracer = trace.get_tracer("rdbroker.db")


def trace_statements(engine: AsyncEngine) -> None:
    """Trace `engine`'s statements while a trace is current."""
    if engine.dialect.name == "postgresql":
        _trace_psycopg(engine)
    else:
        _trace_sqlalchemy(engine, engine.dialect.name)


def _in_trace() -> bool:
    # A recording parent: statements outside a trace, or in one not sampled, cost only this check.
    return trace.get_current_span().is_recording()


def _start(system: str, statement: str) -> Span:
    text = statement.lstrip()
    operation = text.split(None, 1)[0].upper() if text else "SQL"
    return _tracer.start_span(
        operation,
        kind=SpanKind.CLIENT,
        attributes={"db.system": system, "db.statement": text[:MAX_STATEMENT_CHARS]},
    )


def _fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


# --- PostgreSQL: psycopg cursors -----------------------------------------------------------------


class TracedCursor(psycopg.AsyncCursor[Any]):
    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        if not _in_trace():
            return await super().execute(cast(Any, query), params, prepare=prepare, binary=binary)
        with trace.use_span(_start("postgresql", self._text(query)), end_on_exit=True) as span:
            try:
                return await super().execute(cast(Any, query), params, prepare=prepare, binary=binary)
            except BaseException as exc:
                _fail(span, exc)
                raise

    async def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        if not _in_trace():
            await super().executemany(query, params_seq, returning=returning)
            return
        with trace.use_span(_start("postgresql", self._text(query)), end_on_exit=True) as span:
            try:
                await super().executemany(query, params_seq, returning=returning)
            except BaseException as exc:
                _fail(span, exc)
                raise

    def _text(self, query: Query) -> str:
        if isinstance(query, str):
            return query
        if isinstance(query, bytes):
            return query.decode("utf-8", "replace")
        if isinstance(query, sql.Composable):
            return query.as_string(self.connection)
        return str(query)


def _trace_psycopg(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _traced_cursors(dbapi_conn: Any, _record: Any) -> None:
        driver = getattr(dbapi_conn, "driver_connection", None)
        if isinstance(driver, psycopg.AsyncConnection):
            driver.cursor_factory = TracedCursor


# --- SQLite (and anything else): SQLAlchemy cursor events ------------------------------------------


def _trace_sqlalchemy(engine: AsyncEngine, system: str) -> None:
    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _before(
        conn: Connection, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        if _in_trace():
            conn.info.setdefault(_SPANS, []).append(_start(system, statement))

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def _after(
        conn: Connection, _cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        spans = conn.info.get(_SPANS)
        if spans:
            spans.pop().end()

    @event.listens_for(engine.sync_engine, "handle_error")
    def _error(context: ExceptionContext) -> None:
        conn = context.connection
        try:
            spans = conn.info.get(_SPANS) if conn is not None else None
        except Exception:  # an invalidated connection has no info left: its span ends unrecorded
            return
        if spans:
            span = spans.pop()
            _fail(span, context.original_exception)
            span.end()
