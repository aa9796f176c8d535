"""Reading the audit trail back in tests: the log lines (pytest's caplog) and the `audit` rows."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.db.tables import audit

FIELDS = ("action", "target", "actor", "client", "outcome")


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Each audit line logged so far: its `extra` fields (as the JSON format writes them)."""
    return [
        {key: getattr(record, key) for key in (*FIELDS, "detail")}
        for record in caplog.records
        if getattr(record, "event", None) == "audit"
    ]


async def audit_rows(engine: AsyncEngine, **where: str) -> list[dict[str, Any]]:
    """The `audit` rows (oldest first), those whose columns equal `where`."""
    query = select(audit).order_by(audit.c.id)
    for column, value in where.items():
        query = query.where(audit.c[column] == value)
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


def fields(item: dict[str, Any]) -> tuple[str, ...]:
    """(action, target, actor, client, outcome) of a line or a row."""
    return tuple(item[key] for key in FIELDS)
