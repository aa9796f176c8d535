"""Queries on drains (drains.py): a server's latest drain, the lease of the replica advancing it, and
what it did to each session. Like the other repositories: inside the caller's transaction, no commit.

One replica at a time advances a drain: `claim` is a conditional UPDATE that only succeeds while no
other replica holds an unexpired lease, and every write of a pass's outcome names the owner, so a
replica whose lease ran out (or whose drain was cancelled meanwhile) changes nothing.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories import session_from_row
from rdbroker_broker.db.tables import drain_sessions, drains, sessions

RUNNING = [s.value for s in d.DRAIN_RUNNING]
LIVE = [s.value for s in d.LIVE_STATES]
_COLUMNS = {f.name for f in fields(d.Drain)} - {"then_state", "step"}


def drain_from_row(row: Row[Any]) -> d.Drain:
    m = row._mapping
    values = {name: m[name] for name in _COLUMNS}
    return d.Drain(step=d.DrainStep(m["step"]), then_state=d.AdminState(m["then_state"]), **values)


class DrainRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def get(self, address: str) -> d.Drain | None:
        row = (await self.conn.execute(select(drains).where(drains.c.server_address == address))).first()
        return drain_from_row(row) if row else None

    async def all(self) -> dict[str, d.Drain]:
        return {row.server_address: drain_from_row(row) for row in await self.conn.execute(select(drains))}

    async def start(self, drain: d.Drain) -> None:
        """The server's new drain, in place of any finished one (and its per-session marks)."""
        await self.conn.execute(delete(drains).where(drains.c.server_address == drain.server_address))
        values = {name: getattr(drain, name) for name in _COLUMNS}
        await self.conn.execute(
            insert(drains).values(step=drain.step.value, then_state=drain.then_state.value, **values)
        )

    async def cancel(self, address: str, now: datetime, detail: str) -> bool:
        result = await self.conn.execute(
            update(drains)
            .where(drains.c.server_address == address, drains.c.step.in_(RUNNING))
            .values(
                step=d.DrainStep.CANCELLED.value,
                finished_at=now,
                updated_at=now,
                owner=None,
                lease_until=None,
                next_logoff_at=None,
                detail=detail[:1024],
            )
        )
        return bool(result.rowcount)

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Running drains whose next pass is due and that no replica holds."""
        query = (
            select(drains.c.server_address)
            .where(
                drains.c.step.in_(RUNNING),
                drains.c.next_at <= now,
                or_(drains.c.lease_until.is_(None), drains.c.lease_until < now),
            )
            .order_by(drains.c.next_at)
            .limit(limit)
        )
        return [row.server_address for row in await self.conn.execute(query)]

    async def claim(self, address: str, owner: str, now: datetime, until: datetime) -> bool:
        """Take the drain's lease unless another replica holds it (or it is not due, or over)."""
        result = await self.conn.execute(
            update(drains)
            .where(
                drains.c.server_address == address,
                drains.c.step.in_(RUNNING),
                drains.c.next_at <= now,
                or_(drains.c.lease_until.is_(None), drains.c.lease_until < now, drains.c.owner == owner),
            )
            .values(owner=owner, lease_until=until)
        )
        return bool(result.rowcount)

    async def renew(self, address: str, owner: str, until: datetime) -> bool:
        """Extend our lease; False when it is no longer ours or the drain is over."""
        result = await self.conn.execute(
            update(drains)
            .where(drains.c.server_address == address, drains.c.owner == owner, drains.c.step.in_(RUNNING))
            .values(lease_until=until)
        )
        return bool(result.rowcount)

    async def update_held(self, address: str, holder: str, release: bool = False, **values: Any) -> bool:
        """Write a pass's outcome while `holder` holds the lease of a running drain (and give the lease
        back when `release`)."""
        if release:
            values.update(owner=None, lease_until=None)
        if "step" in values:
            values["step"] = d.DrainStep(values["step"]).value
        result = await self.conn.execute(
            update(drains)
            .where(drains.c.server_address == address, drains.c.owner == holder, drains.c.step.in_(RUNNING))
            .values(**values)
        )
        return bool(result.rowcount)

    async def count(self, address: str, owner: str, column: str, error: str = "") -> bool:
        """One more message, logoff or error in the drain's counts (an error with its text)."""
        values: dict[str, Any] = {column: drains.c[column] + 1}
        if error:
            values["last_error"] = error[:1024]
        return await self.update_held(address, owner, **values)

    async def live_sessions(self, address: str) -> list[d.Session]:
        query = (
            select(sessions)
            .where(sessions.c.server_address == address, sessions.c.state.in_(LIVE))
            .order_by(sessions.c.created_at, sessions.c.id)
        )
        return [session_from_row(row) for row in await self.conn.execute(query)]

    async def marks(self, address: str) -> dict[str, tuple[datetime | None, datetime | None]]:
        """session id -> (messaged at, retry at) of what the drain did so far."""
        query = select(drain_sessions).where(drain_sessions.c.server_address == address)
        return {row.session_id: (row.messaged_at, row.retry_at) for row in await self.conn.execute(query)}

    async def mark(self, address: str, session_id: str, **values: Any) -> None:
        """Record what was done to a session (`messaged_at`, `retry_at`, `failures`)."""
        key = (drain_sessions.c.server_address == address, drain_sessions.c.session_id == session_id)
        if "failures" in values:
            values["failures"] = drain_sessions.c.failures + 1
        done = await self.conn.execute(update(drain_sessions).where(*key).values(**values))
        if not done.rowcount:
            if "failures" in values:
                values["failures"] = 1
            await self.conn.execute(
                insert(drain_sessions).values(server_address=address, session_id=session_id, **values)
            )
