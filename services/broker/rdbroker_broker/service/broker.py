"""`BrokerService`: the one object the edges (gRPC, REST, CLI) and the broker's other parts hold.

Each use case lives with its concept (`routing`, `reports`, `sweeping`, `sessions`, `servers`,
`changes`); the methods here only hand the call over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db.audit_repository import AuditFilter
from rdbroker_broker.service.changes import AuditTrail
from rdbroker_broker.service.core import Core, RdpProbe, utcnow
from rdbroker_broker.service.reports import ConnectionEvent, Reports
from rdbroker_broker.service.routing import Routing
from rdbroker_broker.service.servers import PoolSummary, ServerChanges, Servers
from rdbroker_broker.service.sessions import SessionFilter, SessionPage, Sessions
from rdbroker_broker.service.sweeping import Sweeping
from rdbroker_broker.store import Store
from rdbroker_common.rdp_probe import probe_rdp


class BrokerService(Core):
    def __init__(
        self,
        store: Store,
        settings: BrokerSettings,
        clock: Callable[[], datetime] = utcnow,
        probe: RdpProbe = probe_rdp,
    ) -> None:
        super().__init__(store, settings, clock, probe)
        self.routing = Routing(self)
        self.reports = Reports(self)
        self.sweeping = Sweeping(self)
        self.sessions = Sessions(self)
        self.servers = Servers(self)
        self.trail = AuditTrail(self)

    # --- routing and what proxies report ---------------------------------------------------------

    async def route(self, request: d.RouteRequest) -> d.RouteDecision:
        return await self.routing.route(request)

    async def connection_opened(self, session_id: str, connection_id: str, proxy_id: str) -> None:
        await self.reports.connection_opened(session_id, connection_id, proxy_id)

    async def connection_closed(
        self,
        session_id: str,
        connection_id: str,
        *,
        bytes_from_client: int = 0,
        bytes_from_server: int = 0,
        duration_ms: int = 0,
        end_reason: str = "",
    ) -> None:
        await self.reports.connection_closed(
            session_id,
            connection_id,
            bytes_from_client=bytes_from_client,
            bytes_from_server=bytes_from_server,
            duration_ms=duration_ms,
            end_reason=end_reason,
        )

    async def report_connections(self, events: Sequence[ConnectionEvent]) -> list[Exception | None]:
        return await self.reports.report_connections(events)

    async def proxy_heartbeat(
        self, proxy_id: str, active_connections: int, connection_ids: Sequence[str] | None = None
    ) -> int:
        return await self.sweeping.proxy_heartbeat(proxy_id, active_connections, connection_ids)

    async def sweep(self) -> dict[str, int]:
        return await self.sweeping.sweep()

    # --- sessions --------------------------------------------------------------------------------

    async def lookup_user_sessions(
        self, user: str, pool: str = "", include_ended: bool = False
    ) -> list[d.Session]:
        return await self.sessions.lookup_user_sessions(user, pool, include_ended)

    async def find_user_sessions(
        self, user: str, pool: str = "", include_ended: bool = False, limit: int = 50
    ) -> list[d.Session]:
        return await self.sessions.find_user_sessions(user, pool, include_ended, limit)

    async def list_sessions(self, filters: SessionFilter, limit: int, offset: int) -> SessionPage:
        return await self.sessions.list_sessions(filters, limit, offset)

    async def end_session(self, session_id: str, reason: str = "operator") -> d.Session:
        return await self.sessions.end_session(session_id, reason)

    # --- servers and pools -----------------------------------------------------------------------

    async def list_servers(self, pool: str = "") -> list[d.Server]:
        return await self.servers.list_servers(pool)

    async def get_server(self, address: str) -> d.Server:
        return await self.servers.get_server(address)

    async def add_server(self, server: d.Server) -> d.Server:
        return await self.servers.add_server(server)

    async def update_server(self, address: str, changes: ServerChanges) -> d.Server:
        return await self.servers.update_server(address, changes)

    async def set_server_state(self, address: str, state: d.AdminState) -> d.Server:
        return await self.servers.set_server_state(address, state)

    async def remove_server(self, address: str, force: bool = False) -> int:
        return await self.servers.remove_server(address, force)

    async def list_pools(self) -> list[d.Pool]:
        return await self.servers.list_pools()

    async def pool_summaries(self) -> list[PoolSummary]:
        return await self.servers.pool_summaries()

    async def pool_summary(self, name: str) -> PoolSummary:
        return await self.servers.pool_summary(name)

    async def update_pool(self, name: str, changes: dict[str, Any]) -> PoolSummary:
        return await self.servers.update_pool(name, changes)

    # --- audit -----------------------------------------------------------------------------------

    async def audit_trail(
        self, filters: AuditFilter, limit: int, before: int | None = None
    ) -> list[d.AuditEntry]:
        return await self.trail.audit_trail(filters, limit, before)
