"""Pools' power hooks and servers' power state (power.py, docs/power.md).

Every change of a server's power state is a conditional UPDATE from the state it was read in: when
two brokers decide at once, one row changes and the other finds nothing to change. A pool's
decisions are taken under its `pool_power` row lock (SKIP LOCKED: another broker deciding for that
pool right now makes this one pass), so two brokers never start two servers for one shortfall.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, case, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from rdbroker_broker import domain as d
from rdbroker_broker import power_rules as rules
from rdbroker_broker.db.repositories import server_from_row, upsert
from rdbroker_broker.db.tables import pool_power, servers
from rdbroker_broker.power_rules import PoolPower, PowerServer

_FIELDS = (
    "start_url",
    "min_free_sessions",
    "start_timeout_s",
    "start_wait_s",
    "stop_url",
    "idle_for_s",
    "keep_running",
    "stop_timeout_s",
)
_DRAINING = d.AdminState.DRAINING.value
_ENABLED = d.AdminState.ENABLED.value
# Undo the loop's own drain (an operator's later change of admin_state stands).
_UNDRAINED = case(
    (servers.c.power_drained & (servers.c.admin_state == _DRAINING), _ENABLED), else_=servers.c.admin_state
)


def power_from_row(row: Row[Any]) -> PoolPower:
    m = row._mapping
    return PoolPower(pool=m["pool"], **{name: m[name] for name in _FIELDS})


def _power_server(row: Row[Any]) -> PowerServer:
    m = row._mapping
    return PowerServer(
        server=server_from_row(row),
        changed_at=m["power_changed_at"],
        deadline=m["power_deadline"],
        drained=bool(m["power_drained"]),
        idle_since=m["idle_since"],
    )


class PowerRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    # --- the pools' declarations ---------------------------------------------------------------

    async def all(self) -> list[PoolPower]:
        rows = await self.conn.execute(select(pool_power).order_by(pool_power.c.pool))
        return [power_from_row(r) for r in rows]

    async def get(self, pool: str) -> PoolPower | None:
        row = (await self.conn.execute(select(pool_power).where(pool_power.c.pool == pool))).first()
        return power_from_row(row) if row else None

    async def lock(self, pool: str) -> PoolPower | None:
        """The pool's hooks under its row lock; None when another broker holds it (or no hooks)."""
        query = select(pool_power).where(pool_power.c.pool == pool).with_for_update(skip_locked=True)
        row = (await self.conn.execute(query)).first()
        return power_from_row(row) if row else None

    async def put(self, power: PoolPower) -> None:
        values = {name: getattr(power, name) for name in _FIELDS}
        stmt = upsert(self.conn, pool_power).values(pool=power.pool, **values)
        await self.conn.execute(stmt.on_conflict_do_update(index_elements=[pool_power.c.pool], set_=values))

    async def delete(self, pool: str) -> None:
        await self.conn.execute(delete(pool_power).where(pool_power.c.pool == pool))

    async def start_wait(self, pool: str) -> float:
        """How long a new user nobody can take now waits for a start (0: refused at once)."""
        power = await self.get(pool)
        return rules.start_wait(await self.servers(pool), power) if power is not None else 0.0

    # --- servers' power state ------------------------------------------------------------------

    async def servers(self, pool: str) -> list[PowerServer]:
        query = select(servers).where(servers.c.pool == pool).order_by(servers.c.address)
        return [_power_server(r) for r in await self.conn.execute(query)]

    async def note_idle(self, pool: str, now: datetime) -> None:
        """Servers that hold no live session are idle since now (unless already); others are not."""
        in_pool = servers.c.pool == pool
        await self.conn.execute(
            update(servers)
            .where(in_pool, servers.c.live_sessions == 0, servers.c.idle_since.is_(None))
            .values(idle_since=now)
        )
        await self.conn.execute(
            update(servers)
            .where(in_pool, servers.c.live_sessions > 0, servers.c.idle_since.is_not(None))
            .values(idle_since=None)
        )

    async def move(self, address: str, before: d.PowerState, after: d.PowerState, now: datetime) -> bool:
        """What the probes say: `before` -> `after` (on, or off). Coming on undoes the loop's drain
        and starts the idle time afresh."""
        values: dict[str, Any] = {"power": after.value, "power_changed_at": now, "power_deadline": None}
        if after is d.PowerState.ON:
            values |= {"admin_state": _UNDRAINED, "power_drained": False, "idle_since": now}
        return await self._change(address, before, values)

    async def claim_start(self, address: str, now: datetime, deadline: datetime) -> bool:
        """off -> starting (undoing the loop's own drain, so the server takes users once it answers)."""
        values = {
            "power": d.PowerState.STARTING.value,
            "power_changed_at": now,
            "power_deadline": deadline,
            "admin_state": _UNDRAINED,
            "power_drained": False,
        }
        return await self._change(address, d.PowerState.OFF, values)

    async def claim_stop(self, address: str, now: datetime, deadline: datetime) -> bool:
        """on -> stopping, drained, if it still holds no live session (a placement that locked the row
        first wins: this then changes nothing)."""
        result = await self.conn.execute(
            update(servers)
            .where(
                servers.c.address == address,
                servers.c.power == d.PowerState.ON.value,
                servers.c.live_sessions == 0,
                servers.c.admin_state == _ENABLED,
            )
            .values(
                power=d.PowerState.STOPPING.value,
                power_changed_at=now,
                power_deadline=deadline,
                admin_state=_DRAINING,
                power_drained=True,
                updated_at=now,
            )
        )
        return bool(result.rowcount)

    async def give_up(self, address: str, state: d.PowerState, now: datetime) -> bool:
        """The hook failed: a start leaves the server off, a stop leaves it on (undrained, idle anew)."""
        if state is d.PowerState.STARTING:
            return await self.move(address, state, d.PowerState.OFF, now)
        return await self.move(address, state, d.PowerState.ON, now)

    async def _change(self, address: str, before: d.PowerState, values: dict[str, Any]) -> bool:
        result = await self.conn.execute(
            update(servers)
            .where(servers.c.address == address, servers.c.power == before.value)
            .values(**values)
        )
        return bool(result.rowcount)
