"""Servers: read and list them, lock the best-ranked free one for a placement, store health
results (with the placements a load figure cannot show yet), register, change and remove them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, case, delete, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker.db.repositories.rows import SERVER_COLUMNS, server_from_row, upsert
from rdbroker_broker.db.tables import servers, sessions

# Prebuilt, as the Route's other statements (see `sessions`).
_SERVERS_IN_POOL = (
    select(*SERVER_COLUMNS).where(servers.c.pool == bindparam("pool")).order_by(servers.c.address)
)
# The best-ranked server no other transaction holds, in one statement (PostgreSQL arrays).
_RANKED = bindparam("ranked", type_=ARRAY(String))
_LOCK_BEST_SERVER = (
    select(*SERVER_COLUMNS)
    .where(servers.c.address == func.any(_RANKED))
    .order_by(func.array_position(_RANKED, servers.c.address))
    .limit(1)
    .with_for_update(skip_locked=True)
)
_SERVER = select(*SERVER_COLUMNS).where(servers.c.address == bindparam("address"))
_LOCK_SERVER_WAIT = select(*SERVER_COLUMNS).where(servers.c.address == bindparam("address")).with_for_update()
# Claims that never became sessions on their server: ended before the proxy reported them open,
# or ended for carrying next to nothing (`abandoned`) or a failed connect. They never show in a load.
NEVER_SESSIONS = ("abandoned", "connect_failed", "closed_before_open", "pending_expired")


def _unseen_placements(address: str, since: datetime) -> Any:
    """How many Route placements on `address` were made after `since` (ix_sessions_server_created)."""
    never = and_(
        sessions.c.state == "ended",
        sessions.c.opened_at.is_(None) | sessions.c.end_reason.in_(NEVER_SESSIONS),
    )
    return (
        select(func.count())
        .select_from(sessions)
        .where(
            sessions.c.server_address == address,
            sessions.c.created_at > since,
            sessions.c.learnt_from == "route",
            ~never,
        )
        .scalar_subquery()
    )


class ServerRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def get(self, address: str) -> d.Server | None:
        row = (await self.conn.execute(select(servers).where(servers.c.address == address))).first()
        return server_from_row(row) if row else None

    async def list(self, pool: str = "") -> list[d.Server]:
        if pool:
            return [server_from_row(r) for r in await self.conn.execute(_SERVERS_IN_POOL, {"pool": pool})]
        query = select(servers).order_by(servers.c.pool, servers.c.address)
        return [server_from_row(r) for r in await self.conn.execute(query)]

    async def lock_first(self, ranked: Sequence[str]) -> d.Server | None:
        """Lock the best-ranked server no other transaction holds (SKIP LOCKED), fresh from the table.

        Concurrent placements then fan out over the next-best servers instead of queueing on one
        row. SQLite has no row locks; its single connection serialises transactions instead.
        """
        if self.conn.dialect.name != "postgresql":
            row = (await self.conn.execute(_SERVER, {"address": ranked[0]})).first()
        else:
            row = (await self.conn.execute(_LOCK_BEST_SERVER, {"ranked": list(ranked)})).first()
        return server_from_row(row) if row else None

    async def lock(self, address: str) -> d.Server | None:
        """Wait for the row lock on one server (when every candidate is momentarily locked)."""
        row = (await self.conn.execute(_LOCK_SERVER_WAIT, {"address": address})).first()
        return server_from_row(row) if row else None

    async def set_admin_state(self, address: str, state: d.AdminState, now: datetime) -> bool:
        result = await self.conn.execute(
            update(servers)
            .where(servers.c.address == address)
            .values(admin_state=state.value, updated_at=now)
        )
        return bool(result.rowcount)

    async def record_probe(
        self, result: d.ProbeResult, now: datetime, stale_after: timedelta, logon_lag: timedelta
    ) -> None:
        """Store a health result; it counts until its time plus `stale_after` (`fresh_until`).

        With a load figure, `placements_since_report` becomes the server's placements that figure
        cannot show yet: made by Route after the result's time less `logon_lag` (users still logging
        on), claims that never became sessions left out. The insert trigger adds each later one.
        """
        # The result's time, never later than the broker's own: a replica's clock running ahead
        # must not keep its results fresh for longer.
        at = min(result.probed_at or now, now)
        detail = result.rdp_detail[:255]
        values: dict[str, Any] = {
            "health": result.health.value,
            "health_changed_at": case(
                (servers.c.health != result.health.value, now), else_=servers.c.health_changed_at
            ),
            "health_detail": detail,
            "agent_state": result.agent_state.value,
            "agent_detail": result.agent_detail[:255],
            "load": result.load,
            "probed_at": result.probed_at or now,
            "fresh_until": at + stale_after,
        }
        if not result.rdp_ok and result.health is not d.Health.DOWN:
            # A failed probe never proves a server up: a server recorded down (by the broker's own
            # failover probe, before the replica's fall count got there) stays down.
            kept = servers.c.health == d.Health.DOWN.value
            values["health"] = case((kept, servers.c.health), else_=result.health.value)
            values["health_changed_at"] = case(
                (kept | (servers.c.health == result.health.value), servers.c.health_changed_at), else_=now
            )
            values["health_detail"] = case((kept, servers.c.health_detail), else_=detail)
        if result.load >= 0:
            values["load_reported_at"] = at
            values["placements_since_report"] = _unseen_placements(result.address, at - logon_lag)
            if self.conn.dialect.name == "postgresql":
                # Lock the row before counting: a placement committing meanwhile (its trigger holds
                # this lock) is then seen by the count (READ COMMITTED: a new snapshot per
                # statement), and a later one adds itself to the count after this update.
                await self.conn.execute(_LOCK_SERVER_WAIT, {"address": result.address})
        await self.conn.execute(update(servers).where(servers.c.address == result.address).values(**values))

    async def record_down(self, address: str, detail: str, now: datetime, fresh_until: datetime) -> None:
        """The broker's own probe failed: the server is down from now, as a health result says it."""
        await self.conn.execute(
            update(servers)
            .where(servers.c.address == address)
            .values(
                health=d.Health.DOWN.value,
                health_changed_at=case(
                    (servers.c.health != d.Health.DOWN.value, now), else_=servers.c.health_changed_at
                ),
                health_detail=detail[:255],
                probed_at=now,
                fresh_until=fresh_until,
            )
        )

    async def upsert(self, server: d.Server, now: datetime) -> None:
        values = {
            "pool": server.pool,
            "weight": server.weight,
            "max_sessions": server.max_sessions,
            "agent_url": server.agent_url,
            "sessions_url": server.sessions_url,
            "updated_at": now,
        }
        stmt = upsert(self.conn, servers).values(address=server.address, created_at=now, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[servers.c.address], set_=values)
        await self.conn.execute(stmt)

    async def delete(self, address: str) -> None:
        await self.conn.execute(delete(servers).where(servers.c.address == address))
