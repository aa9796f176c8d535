"""The `audit` table: operators' changes, written in each change's transaction, read newest first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import audit


@dataclass(frozen=True)
class AuditFilter:
    """Exact matches; "" matches anything."""

    action: str = ""
    target: str = ""
    actor: str = ""


def _values(entry: d.AuditEntry, at: datetime) -> dict[str, Any]:
    return {
        "at": entry.at or at,
        "actor": entry.actor,
        "client": entry.client,
        "action": entry.action,
        "target": entry.target,
        "outcome": entry.outcome,
        "detail": entry.detail,
    }


def _entry(row: Any) -> d.AuditEntry:
    m = row._mapping
    return d.AuditEntry(
        id=m["id"],
        at=m["at"],
        actor=m["actor"],
        client=m["client"],
        action=m["action"],
        target=m["target"],
        outcome=m["outcome"],
        detail=m["detail"],
    )


class AuditRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def add(self, entries: Sequence[d.AuditEntry], at: datetime) -> None:
        """Store the entries (those without a time at `at`), in the caller's transaction."""
        if entries:
            await self.conn.execute(insert(audit), [_values(e, at) for e in entries])

    async def page(self, filters: AuditFilter, limit: int, before: int | None = None) -> list[d.AuditEntry]:
        """At most `limit` entries, newest (highest id) first, with ids below `before` when given."""
        query = select(audit)
        if before is not None:
            query = query.where(audit.c.id < before)
        for column, value in (
            (audit.c.action, filters.action),
            (audit.c.target, filters.target),
            (audit.c.actor, filters.actor),
        ):
            if value:
                query = query.where(column == value)
        rows = await self.conn.execute(query.order_by(audit.c.id.desc()).limit(limit))
        return [_entry(row) for row in rows]

    async def purge(self, before: datetime, limit: int) -> int:
        """Delete at most `limit` entries older than `before` (a bounded transaction)."""
        some = select(audit.c.id).where(audit.c.at < before).limit(limit).scalar_subquery()
        result = await self.conn.execute(delete(audit).where(audit.c.id.in_(some)))
        return int(result.rowcount)
