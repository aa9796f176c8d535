"""Pools: find one by name (or the default), list, create or change, delete."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories.rows import pool_from_row, upsert
from rdbroker_broker.db.tables import pools


class PoolRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def resolve(self, name: str) -> d.Pool | None:
        """The pool named `name` (case-insensitively), or the default pool for ""."""
        query = select(pools)
        query = (
            query.where(pools.c.is_default) if not name else query.where(pools.c.name_key == name.casefold())
        )
        row = (await self.conn.execute(query)).first()
        return pool_from_row(row) if row else None

    async def list(self) -> list[d.Pool]:
        rows = await self.conn.execute(select(pools).order_by(pools.c.name))
        return [pool_from_row(r) for r in rows]

    async def upsert(self, pool: d.Pool, now: datetime) -> None:
        values = {
            "name": pool.name,
            "name_key": pool.name.casefold(),
            "is_default": pool.is_default,
            "disconnect_timeout_s": pool.disconnect_timeout_s,
            "probe_interval_ms": pool.probe_interval_ms,
            "probe_timeout_ms": pool.probe_timeout_ms,
            "probe_rise": pool.probe_rise,
            "probe_fall": pool.probe_fall,
            "domain": pool.domain,
            "upn_suffixes": ",".join(s for s in pool.upn_suffixes if s),  # as `pool_from_row` reads it
            "junk_bytes": pool.junk_bytes,
            "confirm_timeout_s": pool.confirm_timeout_s,
            "sessions_interval_ms": pool.sessions_interval_ms,
            "stale_after_ms": pool.stale_after_ms,
            "logon_lag_s": pool.logon_lag_s,
            "honor_routing_tokens": pool.honor_routing_tokens,
            "placement": pool.placement.value,
            "updated_at": now,
        }
        stmt = upsert(self.conn, pools).values(**values, created_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[pools.c.name], set_=values)
        await self.conn.execute(stmt)

    async def clear_default(self, except_name: str) -> None:
        await self.conn.execute(
            update(pools).where(pools.c.is_default, pools.c.name != except_name).values(is_default=False)
        )

    async def delete(self, name: str) -> None:
        await self.conn.execute(delete(pools).where(pools.c.name == name))
