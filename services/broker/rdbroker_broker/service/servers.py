"""Servers and pools: listing, registering, changing and removing servers (audited), and pools'
summaries and settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings
from rdbroker_broker.errors import Conflict, InvalidInput, NotFound
from rdbroker_broker.service.changes import Change, audited, described, differences
from rdbroker_broker.service.common import pool_named, pool_rules, require
from rdbroker_broker.service.core import Core
from rdbroker_broker.store import Repos

log = logging.getLogger(__name__)

STATE_ACTIONS = {
    d.AdminState.DRAINING: "server.drain",
    d.AdminState.MAINTENANCE: "server.maintenance",
    d.AdminState.ENABLED: "server.enable",
}

_SERVER_FIELDS = ("pool", "weight", "max_sessions", "agent_url", "sessions_url", "admin_state")


@dataclass(frozen=True)
class PoolSummary:
    pool: d.Pool
    servers: int
    live_sessions: int


@dataclass(frozen=True)
class ServerChanges:
    """What PATCH may change; None leaves a field as it is."""

    weight: int | None = None
    max_sessions: int | None = None
    agent_url: str | None = None
    sessions_url: str | None = None
    admin_state: d.AdminState | None = None


def _check_placement(pool: d.Pool, server: d.Server) -> None:
    for problem in d.placement_problems(pool.placement, [server]):
        raise InvalidInput(f"pool {pool.name}: {problem}")


async def _summary_of(r: Repos, pool: d.Pool) -> PoolSummary:
    servers = await r.servers.list(pool.name)
    return PoolSummary(pool=pool, servers=len(servers), live_sessions=sum(s.live_sessions for s in servers))


class Servers:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def list_servers(self, pool: str = "") -> list[d.Server]:
        async def work(r: Repos) -> list[d.Server]:
            if not pool:
                return await r.servers.list()
            found = await r.pools.resolve(pool)
            if found is None:
                raise NotFound(f"unknown pool {pool!r}")
            return await r.servers.list(found.name)

        return await self.core.run_tx(work)

    async def list_pools(self) -> list[d.Pool]:
        async def work(r: Repos) -> list[d.Pool]:
            return await r.pools.list()

        return await self.core.run_tx(work)

    async def set_server_state(self, address: str, state: d.AdminState) -> d.Server:
        """Drain, maintenance or enable (audited as `server.<verb>`)."""

        async def work(r: Repos, change: Change) -> d.Server:
            require("address", address)
            before = await r.servers.lock(address)
            if before is None:
                raise NotFound(f"unknown server {address!r}")
            await r.servers.set_admin_state(address, state, self.core.now())
            if before.admin_state is not state:
                await change.record(r, f"admin_state {before.admin_state.value} -> {state.value}")
            server = await r.servers.get(address)
            assert server is not None
            return server

        server = await audited(self.core, STATE_ACTIONS[state], address, work)
        log.info("server %s is now %s", address, state.value)
        return server

    async def get_server(self, address: str) -> d.Server:
        async def work(r: Repos) -> d.Server:
            server = await r.servers.get(address)
            if server is None:
                raise NotFound(f"no server is registered at {address}")
            return server

        return await self.core.run_tx(work)

    async def add_server(self, server: d.Server) -> d.Server:
        """Register a server; `server.pool` "" means the default pool. Conflict if the address is taken."""

        async def work(r: Repos, change: Change) -> d.Server:
            if await r.servers.get(server.address) is not None:
                raise Conflict(f"a server is already registered at {server.address}")
            pool = await pool_named(r, server.pool)
            _check_placement(pool, server)
            now = self.core.now()
            await r.servers.upsert(replace(server, pool=pool.name), now)
            if server.admin_state is not d.AdminState.ENABLED:
                await r.servers.set_admin_state(server.address, server.admin_state, now)
            added = await r.servers.get(server.address)
            assert added is not None
            await change.record(r, described(added, _SERVER_FIELDS))
            return added

        added = await audited(self.core, "server.add", server.address, work)
        log.info("server %s registered in pool %s", added.address, added.pool)
        return added

    async def update_server(self, address: str, changes: ServerChanges) -> d.Server:
        async def work(r: Repos, change: Change) -> d.Server:
            server = await r.servers.lock(address)
            if server is None:
                raise NotFound(f"no server is registered at {address}")
            fields = {
                name: value
                for name in ("weight", "max_sessions", "agent_url", "sessions_url")
                if (value := getattr(changes, name)) is not None
            }
            now = self.core.now()
            if fields.get("max_sessions") == 0:
                _check_placement(await pool_named(r, server.pool), replace(server, max_sessions=0))
            if fields:
                await r.servers.upsert(replace(server, **fields), now)
            if changes.admin_state is not None and changes.admin_state is not server.admin_state:
                await r.servers.set_admin_state(address, changes.admin_state, now)
            updated = await r.servers.get(address)
            assert updated is not None
            difference = differences(server, updated, _SERVER_FIELDS)
            if difference:
                await change.record(r, difference)
            return updated

        return await audited(self.core, "server.update", address, work)

    async def remove_server(self, address: str, force: bool = False) -> int:
        """Unregister a server. Refused (Conflict) while it holds live sessions, unless `force`, which ends
        them first (end reason `server_removed`). Answers how many sessions were ended."""

        async def work(r: Repos, change: Change) -> int:
            server = await r.servers.lock(address)
            if server is None:
                raise NotFound(f"no server is registered at {address}")
            live = await r.sessions.live_on_server(address)
            if live and not force:
                raise Conflict(
                    f"{address} holds {len(live)} live session{'s' if len(live) != 1 else ''}: "
                    "drain it and wait, or remove it with force=true to end them"
                )
            now = self.core.now()
            for session, _ in live:
                await r.sessions.end(session.session_id, "server_removed", now)
            await r.servers.delete(address)
            ended = f", {len(live)} live sessions ended" if live else ""
            await change.record(r, f"pool {server.pool}{ended}")
            return len(live)

        ended = await audited(self.core, "server.remove", address, work)
        log.info("server %s removed (%d live sessions ended)", address, ended)
        return ended

    async def pool_summaries(self) -> list[PoolSummary]:
        """Every pool with how many servers it has and how many live sessions are on them."""

        async def work(r: Repos) -> list[PoolSummary]:
            servers_by_pool: dict[str, list[d.Server]] = {}
            for server in await r.servers.list():
                servers_by_pool.setdefault(server.pool, []).append(server)
            return [
                PoolSummary(
                    pool=pool,
                    servers=len(servers_by_pool.get(pool.name, [])),
                    live_sessions=sum(s.live_sessions for s in servers_by_pool.get(pool.name, [])),
                )
                for pool in await r.pools.list()
            ]

        return await self.core.run_tx(work)

    async def pool_summary(self, name: str) -> PoolSummary:
        """One pool (case-insensitively by name) with its server and live session counts."""

        async def work(r: Repos) -> PoolSummary:
            return await _summary_of(r, await pool_named(r, name))

        return await self.core.run_tx(work)

    async def update_pool(self, name: str, changes: dict[str, Any]) -> PoolSummary:
        """Change some of a pool's settings (domain.Pool fields, each already within its bounds); refused
        (InvalidInput) when the result breaks a rule across settings. The next farm `apply` sets them
        from the file again."""

        async def work(r: Repos, change: Change) -> PoolSummary:
            unknown = set(changes) - pool_settings.PATCHABLE
            if unknown:
                raise InvalidInput(f"not a pool setting: {', '.join(sorted(unknown))}")
            pool = await pool_named(r, name)
            changed = replace(pool, **changes)
            problems = pool_settings.pool_problems(changed, self.core.settings.probe_interval_ms)
            if changed.placement is not pool.placement:
                problems += [
                    ("placement", p)
                    for p in d.placement_problems(changed.placement, await r.servers.list(pool.name))
                ]
            if problems:
                raise InvalidInput("; ".join(f"{field}: {message}" for field, message in problems))
            if changed != pool:
                await r.pools.upsert(changed, self.core.now())
                await change.record(r, differences(pool, changed, sorted(changes)), target=pool.name)
            if (changed.domain, changed.upn_suffixes) != (pool.domain, pool.upn_suffixes):
                # Live sessions move to their accounts' keys under the new rules (docs/accounts.md).
                rekeyed, skipped = await r.sessions.rekey_pool(
                    changed.name, pool_rules(changed), self.core.now()
                )
                log.info(
                    "pool %s: %d live sessions re-keyed, %d kept (key taken)",
                    changed.name,
                    rekeyed,
                    len(skipped),
                )
            return await _summary_of(r, changed)

        summary = await audited(self.core, "pool.update", name, work)
        log.info("pool %s settings changed: %s", summary.pool.name, ", ".join(sorted(changes)) or "none")
        return summary
