"""`apply_farm`: the database made to match a farm in one transaction, each change an audit record.

Runtime state (an operator's drain/maintenance, health, load) is never touched; only the declaration
is. Servers missing from the farm are reported, and deleted only with `prune`; one that still holds
live sessions is refused unless `force` (which ends those sessions first).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import accounts, audit, callers
from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.assignment_repository import AssignmentRepository
from rdbroker_broker.db.audit_repository import AuditRepository
from rdbroker_broker.db.engine import is_sqlite
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.db.repositories import LIVE, PoolRepository, ServerRepository, SessionRepository
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import Unavailable
from rdbroker_broker.farm.model import Farm
from rdbroker_broker.farm.plan import assignments_line, pool_changes, show_power

log = logging.getLogger(__name__)


def apply_caller() -> callers.Caller:
    """Who runs `rdbroker apply`, for the audit trail: `apply:<OS user>@<host>`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's arbitrary uid has no name
        user = f"uid{os.getuid()}"
    return callers.Caller(f"apply:{user}@{socket.gethostname()}")


async def apply_farm(
    engine: AsyncEngine, farm: Farm, *, dry_run: bool = False, prune: bool = False, force: bool = False
) -> d.FarmPlan:
    """Make the database match the file in one transaction; nothing is kept if anything is refused.

    Each change line of the plan is an audit record (written in that transaction) and an audit line,
    by the current caller (`apply_caller()` when there is none); a refusal is an audit line only. A
    dry run changes nothing and writes neither."""
    caller = callers.current.get()
    if caller == callers.UNKNOWN:
        caller = apply_caller()
    try:
        plan, applied, refused = await _apply(engine, farm, caller, dry_run=dry_run, prune=prune, force=force)
    except Exception as exc:
        if not dry_run:
            audit.refused("farm.apply", "", exc, caller)
        raise
    if not dry_run:
        for item in refused or applied:
            audit.write_log(item)
    return plan


async def _apply(
    engine: AsyncEngine, farm: Farm, caller: callers.Caller, *, dry_run: bool, prune: bool, force: bool
) -> tuple[d.FarmPlan, list[d.AuditEntry], list[d.AuditEntry]]:
    """`apply_farm`'s transaction: the plan, its changes' audit entries, and its refusals'."""
    if is_sqlite(str(engine.url)):
        await migrate.upgrade(engine)
    elif await migrate.current_revision(engine) != migrate.head_revision():
        raise Unavailable("the database schema is not at head: run `rdbroker migrate` first")
    plan = d.FarmPlan()
    applied: list[d.AuditEntry] = []
    refused: list[d.AuditEntry] = []

    def change(action: str, target: str, line: str) -> None:
        plan.changes.append(line)
        applied.append(audit.entry(action, target, audit.OK, line, caller))

    def refusal(action: str, target: str, line: str) -> None:
        plan.refusals.append(line)
        refused.append(audit.entry(action, target, audit.REFUSED, line, caller))

    now = datetime.now(UTC)
    async with engine.connect() as conn:
        tx = await conn.begin()
        pools, servers, live = PoolRepository(conn), ServerRepository(conn), SessionRepository(conn)
        old_pools = {p.name: p for p in await pools.list()}
        old_servers = {s.address: s for s in await servers.list()}
        new_default = next(p.name for p in farm.pools if p.is_default)
        await pools.clear_default(except_name=new_default)
        for pool in farm.pools:
            old = old_pools.get(pool.name)
            if old != pool:
                await pools.upsert(pool, now)
                if old:
                    change("pool.update", pool.name, f"update pool {pool.name} ({pool_changes(old, pool)})")
                else:
                    change("pool.create", pool.name, f"create pool {pool.name}")
            if old is not None and (old.domain, old.upn_suffixes) != (pool.domain, pool.upn_suffixes):
                rekeyed, kept = await rekey_pool(live, pool, now)
                if rekeyed:
                    change("pool.rekey", pool.name, rekeyed)
                if kept:
                    plan.changes.append(kept)
        await _apply_power(PowerRepository(conn), farm, change)
        for server in farm.servers:
            old_server = old_servers.get(server.address)
            if old_server is None or _declared(old_server) != _declared(server):
                await servers.upsert(server, now)
                verb, action = ("update", "server.update") if old_server else ("create", "server.add")
                change(action, server.address, f"{verb} server {server.address} ({server.pool})")
        declared = {s.address for s in farm.servers}
        depth = {p.name for p in farm.pools if p.placement is d.Placement.DEPTH}
        for address, old_server in sorted(old_servers.items()):
            if address in declared:
                continue
            if not prune:
                plan.changes.append(f"keep server {address}: not in the file (--prune deletes it)")
                if old_server.pool in depth and old_server.max_sessions <= 0:
                    refusal(
                        "pool.update",
                        old_server.pool,
                        f"pool {old_server.pool} places by depth, which fills each server up to its "
                        f"max_sessions, and server {address} (kept: not in the file) has none: declare it "
                        "with max_sessions, or delete it with --prune",
                    )
            elif old_server.live_sessions and not force:
                refusal(
                    "server.remove",
                    address,
                    f"server {address} holds {old_server.live_sessions} live sessions: not deleted "
                    "(drain it and wait, or add --force to end them)",
                )
            else:
                if old_server.live_sessions:
                    for session_id in await _live_session_ids(conn, address):
                        await live.end(session_id, "server_removed", now)
                    change(
                        "sessions.end", address, f"end {old_server.live_sessions} live sessions on {address}"
                    )
                await servers.delete(address)
                change("server.remove", address, f"delete server {address}")
        rules = AssignmentRepository(conn)
        if await rules.list() != farm.assignments:
            await rules.replace(farm.assignments, now)
            change("assignments.update", "assignments", assignments_line(farm.assignments))
        if prune:
            used = {s.pool for s in farm.servers}
            for name in sorted(set(old_pools) - {p.name for p in farm.pools}):
                if name in used:
                    continue
                await pools.delete(name)
                change("pool.delete", name, f"delete pool {name}")
        if dry_run or plan.refusals:
            await tx.rollback()
        else:
            await AuditRepository(conn).add(applied, now)
            await tx.commit()
    return plan, applied, refused


async def rekey_pool(live: SessionRepository, pool: d.Pool, now: datetime) -> tuple[str, str]:
    """The pool's account settings changed: its live sessions move to their accounts' new keys
    (docs/accounts.md). A session whose new key another live session holds keeps its key (two
    sessions of one account: the next Route of either spelling finds one, the other expires).
    Answers the plan's lines: what was re-keyed, what was kept ("" for none)."""
    rules = accounts.Rules.of(pool.domain, pool.upn_suffixes)
    rekeyed, skipped = await live.rekey_pool(pool.name, rules, now)
    for session_id in skipped:
        log.warning(
            "pool %s: session %s not re-keyed: another live session holds its account's new key",
            pool.name,
            session_id,
        )
    done = f"re-key {rekeyed} live sessions of pool {pool.name}" if rekeyed else ""
    kept = f"keep the key of {len(skipped)} live sessions of pool {pool.name} (taken)" if skipped else ""
    return done, kept


async def _apply_power(repo: PowerRepository, farm: Farm, change: Any) -> None:
    """Each pool of the file gets exactly its `power:` hooks (none when it declares none)."""
    old = {p.pool: p for p in await repo.all()}
    for pool in farm.pools:
        new, before = farm.power.get(pool.name), old.get(pool.name)
        if new == before:
            continue
        if new is None:
            await repo.delete(pool.name)
            change("pool.power", pool.name, f"remove the power hooks of pool {pool.name}")
            continue
        await repo.put(new)
        verb = "update" if before else "set"
        change("pool.power", pool.name, f"{verb} the power hooks of pool {pool.name} ({show_power(new)})")


def _declared(server: d.Server) -> tuple[str, int, int, str, str]:
    return (server.pool, server.weight, server.max_sessions, server.agent_url, server.sessions_url)


async def _live_session_ids(conn: Any, address: str) -> list[str]:
    query = select(sessions.c.id).where(sessions.c.server_address == address, sessions.c.state.in_(LIVE))
    return list((await conn.execute(query)).scalars())
