"""Proxies' heartbeats, health replicas and probe leases."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker.db.repositories import upsert
from rdbroker_broker.db.tables import health_replicas, probe_leases, proxies, servers


class ProxyRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def heartbeat(self, proxy_id: str, active_connections: int, now: datetime) -> None:
        stmt = upsert(self.conn, proxies).values(
            proxy_id=proxy_id, first_seen_at=now, last_heartbeat_at=now, active_connections=active_connections
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[proxies.c.proxy_id],
            set_={"last_heartbeat_at": now, "active_connections": active_connections},
        )
        await self.conn.execute(stmt)

    def alive_since(self, since: datetime) -> Any:
        """A subquery of proxies heard from since `since`."""
        return select(proxies.c.proxy_id).where(proxies.c.last_heartbeat_at >= since)

    async def purge(self, before: datetime) -> int:
        result = await self.conn.execute(delete(proxies).where(proxies.c.last_heartbeat_at < before))
        return int(result.rowcount)


class LeaseRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def seen(self, replica_id: str, lease_ms: int, now: datetime) -> None:
        stmt = upsert(self.conn, health_replicas).values(
            replica_id=replica_id, last_seen_at=now, lease_ms=lease_ms
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[health_replicas.c.replica_id], set_={"last_seen_at": now, "lease_ms": lease_ms}
        )
        await self.conn.execute(stmt)

    async def live_replicas(self, now: datetime) -> int:
        rows = await self.conn.execute(select(health_replicas.c.last_seen_at, health_replicas.c.lease_ms))
        return sum(1 for seen, lease_ms in rows if seen + timedelta(milliseconds=lease_ms) > now)

    async def fair_share(self, now: datetime) -> int:
        total = int((await self.conn.execute(select(func.count()).select_from(servers))).scalar_one())
        return math.ceil(total / max(await self.live_replicas(now), 1))

    async def held(self, replica_id: str) -> list[str]:
        query = (
            select(probe_leases.c.server_address)
            .where(probe_leases.c.replica_id == replica_id)
            .order_by(probe_leases.c.server_address)
        )
        return list((await self.conn.execute(query)).scalars())

    async def holder(self, address: str) -> str | None:
        query = select(probe_leases.c.replica_id).where(probe_leases.c.server_address == address)
        return (await self.conn.execute(query)).scalar_one_or_none()

    async def release(self, replica_id: str, addresses: list[str]) -> None:
        if addresses:
            await self.conn.execute(
                delete(probe_leases).where(
                    probe_leases.c.replica_id == replica_id, probe_leases.c.server_address.in_(addresses)
                )
            )

    async def renew(self, replica_id: str, expires_at: datetime) -> None:
        await self.conn.execute(
            update(probe_leases).where(probe_leases.c.replica_id == replica_id).values(expires_at=expires_at)
        )

    async def claimable(self, now: datetime, limit: int) -> list[str]:
        """Servers with no lease, or an expired one (a dead replica's)."""
        query = (
            select(servers.c.address)
            .outerjoin(probe_leases, probe_leases.c.server_address == servers.c.address)
            .where((probe_leases.c.server_address.is_(None)) | (probe_leases.c.expires_at < now))
            .order_by(servers.c.address)
            .limit(limit)
        )
        return list((await self.conn.execute(query)).scalars())

    async def claim(self, replica_id: str, address: str, now: datetime, expires_at: datetime) -> None:
        """Take the lease unless another replica took it first (the conflict guard re-checks expiry)."""
        stmt = upsert(self.conn, probe_leases).values(
            server_address=address, replica_id=replica_id, expires_at=expires_at
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[probe_leases.c.server_address],
            set_={"replica_id": replica_id, "expires_at": expires_at},
            where=(probe_leases.c.expires_at < now) | (probe_leases.c.replica_id == replica_id),
        )
        await self.conn.execute(stmt)

    async def purge_replicas(self, before: datetime) -> None:
        await self.conn.execute(delete(health_replicas).where(health_replicas.c.last_seen_at < before))
