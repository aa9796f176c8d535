"""The `assignments` table: the farm file's assignment rules in order, replaced whole by `apply`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import assignments as a
from rdbroker_broker.db.repositories import PoolRepository
from rdbroker_broker.db.tables import assignments


class AssignmentRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def list(self) -> list[a.Rule]:
        rows = await self.conn.execute(select(assignments).order_by(assignments.c.position))
        return [a.Rule(pool=r.pool, user=r.user_glob, network=r.network) for r in rows]

    async def rule_set(self) -> a.RuleSet:
        """The rules, compiled, with the account settings of every pool."""
        rules = await self.list()
        return a.RuleSet.of(rules, await PoolRepository(self.conn).list()) if rules else a.EMPTY

    async def replace(self, rules: Sequence[a.Rule], now: datetime) -> None:
        await self.conn.execute(delete(assignments))
        if rules:
            await self.conn.execute(
                insert(assignments),
                [
                    {
                        "position": i,
                        "user_glob": r.user,
                        "network": r.network,
                        "pool": r.pool,
                        "updated_at": now,
                    }
                    for i, r in enumerate(rules, start=1)
                ],
            )
