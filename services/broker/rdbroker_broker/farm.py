"""The farm file (DESIGN §7): pools and servers, validated with line numbers, applied idempotently.

Runtime state (an operator's drain/maintenance, health, load) is never touched by `apply`; only the
declaration is. Servers missing from the file are reported, and deleted only with `prune`; one that
still holds live sessions is refused unless `force` (which ends those sessions first).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import accounts, audit, callers, power_config
from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker.db import migrate
from rdbroker_broker.db.assignment_repository import AssignmentRepository
from rdbroker_broker.db.audit_repository import AuditRepository
from rdbroker_broker.db.engine import is_sqlite
from rdbroker_broker.db.power_repository import PowerRepository
from rdbroker_broker.db.repositories import LIVE, PoolRepository, ServerRepository, SessionRepository
from rdbroker_broker.db.tables import sessions
from rdbroker_broker.errors import Unavailable
from rdbroker_broker.power_rules import PoolPower
from rdbroker_common.settings import join_host_port, split_host_port

log = logging.getLogger(__name__)

DEFAULT_DISCONNECT_TIMEOUT_S = 8 * 3600.0
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_POOL_KEYS = {
    "name",
    "default",
    "disconnect_timeout",
    "probe",
    "domain",
    "upn_suffixes",
    "junk_bytes",
    "confirm_timeout",
    "stale_after",
    "logon_lag",
    "honor_routing_tokens",
    "placement",
    "power",
}
_PROBE_KEYS = {"interval", "timeout", "rise", "fall", "sessions_interval"}
# The same bounds as the broker's RDBROKER_PROBE_* settings (config.py).
PROBE_MS_RANGE = (100, 3_600_000)
PROBE_COUNT_MAX = 100
_SERVER_KEYS = {"address", "pool", "weight", "max_sessions", "agent_url", "sessions_url"}
_ASSIGNMENT_KEYS = {"match", "pool"}
_MATCH_KEYS = {"user", "network"}


class FarmError(Exception):
    """The farm file is invalid; the message lists every problem as `file:line: field: problem`."""


@dataclass
class Farm:
    pools: list[d.Pool] = field(default_factory=list)
    servers: list[d.Server] = field(default_factory=list)
    assignments: list[a.Rule] = field(default_factory=list)
    power: dict[str, PoolPower] = field(default_factory=dict)  # by pool name: its `power:` hooks


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.loader = yaml.SafeLoader("")

    def problem(self, node: yaml.Node, where: str, message: str) -> None:
        self.problems.append(f"{self.source}:{node.start_mark.line + 1}: {where}: {message}")

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, where: str, allowed: set[str]) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, where, "expected a mapping")
            return None
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key not in allowed:
                self.problem(
                    key_node,
                    f"{where}.{key}",
                    f"unknown field (expected one of {', '.join(sorted(allowed))})",
                )
            elif key in out:
                self.problem(key_node, f"{where}.{key}", "given twice")
            else:
                out[key] = value_node
        return out

    def text(self, fields: dict[str, yaml.Node], key: str, where: str, *, required: bool = False) -> str:
        node = fields.get(key)
        if node is None:
            if required:
                self.problems.append(f"{self.source}: {where}.{key}: required")
            return ""
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            self.problem(node, f"{where}.{key}", "expected a non-empty string")
            return ""
        return value.strip()

    def integer(self, fields: dict[str, yaml.Node], key: str, where: str, default: int, high: int) -> int:
        node = fields.get(key)
        if node is None:
            return default
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            self.problem(node, f"{where}.{key}", f"expected an integer from 0 to {high}")
            return default
        return value


def parse_duration(value: Any) -> float | None:
    """`8h`, `30m`, `1h30m`, `90s`, `2d` or a number of seconds; None if not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    match = _DURATION.match(str(value).strip())
    if not match or not any(match.groups()):
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    return float(total) if total > 0 else None


def load_farm(text: str, source: str = "farm.yaml", *, default_probe_interval_ms: int = 0) -> Farm:
    """Parse and check a farm file; `default_probe_interval_ms` (the broker's RDBROKER_PROBE_INTERVAL_MS,
    when known) is the interval of pools that set none, for the rules that compare with it."""
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise FarmError(f"{source}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        raise FarmError(f"{source}: the file is empty (expected `pools:` and `servers:`)")
    top = reader.mapping(root, "farm", {"pools", "servers", "assignments"})
    if top is None:
        raise FarmError("\n".join(reader.problems))
    farm = Farm()
    _read_pools(reader, top.get("pools"), farm, default_probe_interval_ms)
    _read_servers(reader, top.get("servers"), farm)
    _read_assignments(reader, top.get("assignments"), farm)
    if reader.problems:
        raise FarmError("\n".join(reader.problems))
    return farm


def _read_pools(reader: _Reader, node: yaml.Node | None, farm: Farm, default_interval_ms: int) -> None:
    if node is None:
        farm.pools.append(d.Pool("default", True, DEFAULT_DISCONNECT_TIMEOUT_S))
        return
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "pools", "expected a list")
        return
    seen: set[str] = set()
    for i, item in enumerate(node.value):
        where = f"pools[{i}]"
        fields = reader.mapping(item, where, _POOL_KEYS)
        if fields is None:
            continue
        name = reader.text(fields, "name", where, required=True)
        if name and not _POOL_NAME.match(name):
            reader.problem(
                fields["name"], f"{where}.name", "letters, digits, '.', '_', '-', ' ' only (128 at most)"
            )
        elif name.casefold() in seen:
            reader.problem(fields["name"], f"{where}.name", f"pool {name!r} is declared twice")
        seen.add(name.casefold())
        is_default = False
        if "default" in fields:
            is_default = reader.value(fields["default"])
            if not isinstance(is_default, bool):
                reader.problem(fields["default"], f"{where}.default", "expected true or false")
                is_default = False
        timeout = DEFAULT_DISCONNECT_TIMEOUT_S
        if "disconnect_timeout" in fields:
            parsed = parse_duration(reader.value(fields["disconnect_timeout"]))
            if parsed is None:
                reader.problem(
                    fields["disconnect_timeout"],
                    f"{where}.disconnect_timeout",
                    "expected a duration like 8h, 30m, 90s",
                )
            elif parsed > ps.BOUNDS["disconnect_timeout_s"].high:
                reader.problem(
                    fields["disconnect_timeout"],
                    f"{where}.disconnect_timeout",
                    ps.BOUNDS["disconnect_timeout_s"].expected(),
                )
            else:
                timeout = parsed
        before = len(reader.problems)
        probe = _read_probe(reader, fields.get("probe"), f"{where}.probe")
        pool = d.Pool(name, is_default, timeout, *probe[:4], sessions_interval_ms=probe[4])
        pool = _read_claim_settings(reader, fields, where, pool)
        if "power" in fields:
            power = power_config.read_power(reader, fields["power"], f"{where}.power", name)
            if power is not None:
                farm.power[name] = power
        # Rules across settings only once each setting is right (a bad domain is one problem, not two).
        problems = ps.pool_problems(pool, default_interval_ms) if len(reader.problems) == before else []
        for key, message in problems:
            # Say it where the operator wrote the setting in question.
            farm_key = _FARM_KEY.get(key, key)
            node = fields.get(farm_key, item)
            reader.problem(node, f"{where}.{farm_key}", message)
        farm.pools.append(pool)
    defaults = [p for p in farm.pools if p.is_default]
    if len(farm.pools) == 1 and not defaults:
        farm.pools[0] = replace(farm.pools[0], is_default=True)
    elif len(defaults) != 1 and farm.pools:
        reader.problem(node, "pools", f"exactly one pool must have `default: true` ({len(defaults)} do)")


# domain.Pool field -> the farm file's key, where they differ
_FARM_KEY = {
    "stale_after_ms": "stale_after",
    "confirm_timeout_s": "confirm_timeout",
    "logon_lag_s": "logon_lag",
}


def _read_claim_settings(reader: _Reader, fields: dict[str, yaml.Node], where: str, pool: d.Pool) -> d.Pool:
    """The account, claim and result-age settings of one pool; a key not given keeps the default."""
    changes: dict[str, Any] = {}

    def check(key: str, parse: Any) -> None:
        node = fields.get(key)
        if node is None:
            return
        try:
            changes.update(parse(reader.value(node)))
        except ps.SettingError as exc:
            reader.problem(node, f"{where}.{key}", str(exc))

    def domain(value: Any) -> dict[str, Any]:
        name = ps.check_domain(value)
        if not name:
            raise ps.SettingError("expected a NetBIOS domain name like CORP (leave the key out for none)")
        return {"domain": name}

    def upn_suffixes(value: Any) -> dict[str, Any]:
        if not isinstance(value, list):
            raise ps.SettingError("expected a list of DNS names, like [corp.example.com]")
        return {"upn_suffixes": ps.check_upn_suffixes(value)}

    def junk_bytes(value: Any) -> dict[str, Any]:
        size = ps.parse_size(value)
        if size is None:
            raise ps.SettingError("expected a number of bytes or a size like 2KiB")
        return {"junk_bytes": int(ps.check_number("junk_bytes", size))}

    def duration(name: str) -> Any:
        def parse(value: Any) -> dict[str, Any]:
            ms = ps.parse_duration_ms(value)
            if ms is None:
                raise ps.SettingError(f"expected a duration like 30s or 2m ({ps.BOUNDS[name].expected()})")
            if name.endswith("_ms"):
                return {name: int(ps.check_number(name, ms))}
            return {name: ps.check_number(name, ms / 1000)}

        return parse

    check("domain", domain)
    check("upn_suffixes", upn_suffixes)
    check("honor_routing_tokens", lambda value: {"honor_routing_tokens": ps.check_flag(value)})
    check("placement", lambda value: {"placement": ps.check_placement(value)})
    check("junk_bytes", junk_bytes)
    for name, key in _FARM_KEY.items():
        check(key, duration(name))
    return replace(pool, **changes)


def _read_probe(reader: _Reader, node: yaml.Node | None, where: str) -> tuple[int, int, int, int, int]:
    """A pool's `probe: {interval: 2s, timeout: 2s, rise: 2, fall: 3, sessions_interval: 5s}`, each
    optional: (interval_ms, timeout_ms, rise, fall, sessions_interval_ms), 0 where not given (the
    broker's RDBROKER_PROBE_* value, or its session-list default, then applies)."""
    if node is None:
        return 0, 0, 0, 0, 0
    fields = reader.mapping(node, where, _PROBE_KEYS)
    if fields is None:
        return 0, 0, 0, 0, 0
    low, high = PROBE_MS_RANGE
    times = []
    for key in ("interval", "timeout"):
        ms = 0
        if key in fields:
            ms = parse_probe_ms(reader.value(fields[key])) or 0
            if not low <= ms <= high:
                reader.problem(
                    fields[key], f"{where}.{key}", f"expected a duration from {low}ms to {high // 1000}s"
                )
                ms = 0
        times.append(ms)
    counts = []
    for key in ("rise", "fall"):
        count = 0
        if key in fields:
            count = reader.value(fields[key])
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= PROBE_COUNT_MAX:
                reader.problem(
                    fields[key], f"{where}.{key}", f"expected an integer from 1 to {PROBE_COUNT_MAX}"
                )
                count = 0
        counts.append(count)
    sessions_ms = 0
    if "sessions_interval" in fields:
        node = fields["sessions_interval"]
        parsed = parse_probe_ms(reader.value(node))
        bound = ps.BOUNDS["sessions_interval_ms"]
        if parsed is None or not bound.low <= parsed <= bound.high:
            reader.problem(
                node, f"{where}.sessions_interval", f"expected a duration from {low}ms to {high // 1000}s"
            )
        else:
            sessions_ms = parsed
    return times[0], times[1], counts[0], counts[1], sessions_ms


def parse_probe_ms(value: Any) -> int | None:
    """`500ms`, `2s`, `1m` or a number of seconds (1.5), in milliseconds; None if not a duration."""
    if isinstance(value, str) and value.strip().endswith("ms"):
        digits = value.strip()[:-2].strip()
        return int(digits) if digits.isdigit() else None
    if isinstance(value, float) and not isinstance(value, bool):
        return round(value * 1000) if value > 0 else None
    seconds = parse_duration(value)
    return round(seconds * 1000) if seconds is not None else None


def _read_servers(reader: _Reader, node: yaml.Node | None, farm: Farm) -> None:
    if node is None:
        return
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "servers", "expected a list")
        return
    pools = {p.name.casefold(): p.name for p in farm.pools}
    default = next((p.name for p in farm.pools if p.is_default), "")
    depth = {p.name for p in farm.pools if p.placement is d.Placement.DEPTH}
    limited = {name for name, power in farm.power.items() if power_config.needs_limits(power)}
    seen: set[str] = set()
    for i, item in enumerate(node.value):
        where = f"servers[{i}]"
        fields = reader.mapping(item, where, _SERVER_KEYS)
        if fields is None:
            continue
        address = reader.text(fields, "address", where, required=True)
        if address:
            try:
                host, port = split_host_port(address, default_port=3389)
                if port == 0:
                    raise ValueError("port 0")
                address = join_host_port(host, port)
            except ValueError as exc:
                reader.problem(fields["address"], f"{where}.address", f"expected host:port ({exc})")
            if address in seen:
                reader.problem(fields["address"], f"{where}.address", f"server {address} is declared twice")
            seen.add(address)
        pool = reader.text(fields, "pool", where) or default
        if pool and pool.casefold() not in pools:
            reader.problem(fields["pool"], f"{where}.pool", f"unknown pool {pool!r} (declare it under pools)")
        pool = pools.get(pool.casefold(), pool)
        urls = {}
        for key in ("agent_url", "sessions_url"):
            url = reader.text(fields, key, where) if key in fields else ""
            if url and not url.startswith(("http://", "https://")):
                reader.problem(fields[key], f"{where}.{key}", "expected an http:// or https:// URL")
            urls[key] = url
        server = d.Server(
            address=address,
            pool=pool,
            weight=reader.integer(fields, "weight", where, 100, 1_000_000),
            max_sessions=reader.integer(fields, "max_sessions", where, 0, 1_000_000),
            agent_url=urls["agent_url"],
            sessions_url=urls["sessions_url"],
        )
        if server.max_sessions <= 0 and server.pool in depth:
            reader.problem(
                fields.get("max_sessions", item),
                f"{where}.max_sessions",
                f"pool {server.pool} places by depth, which fills each server up to its max_sessions: "
                "set one on this server",
            )
        if server.max_sessions == 0 and pool in limited:
            reader.problem(
                fields.get("max_sessions", item),
                f"{where}.max_sessions",
                f"pool {pool!r} has a power start hook: every server needs max_sessions "
                "(free capacity is counted in sessions)",
            )
        farm.servers.append(server)


def _read_assignments(reader: _Reader, node: yaml.Node | None, farm: Farm) -> None:
    """`assignments: [{match: {user: 'CORP\\fin-*', network: 10.20.0.0/16}, pool: finance}, ...]`:
    each rule names a declared pool and matches on something."""
    if node is None:
        return
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "assignments", "expected a list of rules (`- match: {user: ...}` and `pool:`)")
        return
    if len(node.value) > a.MAX_RULES:
        reader.problem(node, "assignments", f"at most {a.MAX_RULES} rules")
        return
    pools = {p.name.casefold(): p.name for p in farm.pools}
    for i, item in enumerate(node.value):
        where = f"assignments[{i}]"
        fields = reader.mapping(item, where, _ASSIGNMENT_KEYS)
        if fields is None:
            continue
        pool = reader.text(fields, "pool", where, required=True)
        if pool and pool.casefold() not in pools:
            reader.problem(fields["pool"], f"{where}.pool", f"unknown pool {pool!r} (declare it under pools)")
        match_node = fields.get("match")
        if match_node is None:
            reader.problems.append(f"{reader.source}: {where}.match: required (`user:` and/or `network:`)")
            continue
        match = reader.mapping(match_node, f"{where}.match", _MATCH_KEYS)
        if match is None:
            continue
        if not match:
            reader.problem(
                match_node,
                f"{where}.match",
                "matches nothing: give `user:` (an account glob) and/or `network:`",
            )
            continue
        rule = {}
        for key, check in (("user", a.check_user_glob), ("network", a.check_network)):
            if key in match:
                try:
                    rule[key] = check(reader.value(match[key]))
                except a.RuleError as exc:
                    reader.problem(match[key], f"{where}.match.{key}", str(exc))
        farm.assignments.append(a.Rule(pool=pools.get(pool.casefold(), pool), **rule))


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


# Every setting of a pool as the farm file spells it, for the plan's `update pool` lines.
_SHOWN: list[tuple[str, str]] = [
    ("is_default", "default"),
    ("disconnect_timeout_s", "disconnect_timeout"),
    ("probe_interval_ms", "probe.interval"),
    ("probe_timeout_ms", "probe.timeout"),
    ("probe_rise", "probe.rise"),
    ("probe_fall", "probe.fall"),
    ("sessions_interval_ms", "probe.sessions_interval"),
    ("domain", "domain"),
    ("upn_suffixes", "upn_suffixes"),
    ("junk_bytes", "junk_bytes"),
    ("confirm_timeout_s", "confirm_timeout"),
    ("stale_after_ms", "stale_after"),
    ("logon_lag_s", "logon_lag"),
    ("honor_routing_tokens", "honor_routing_tokens"),
    ("placement", "placement"),
]


def assignments_line(rules: list[a.Rule]) -> str:
    """The plan's line for new assignment rules: `set 2 assignment rules: 1. user CORP\\fin-* ->
    finance, 2. network 10.20.0.0/16 -> lab`."""
    if not rules:
        return "clear the assignment rules (every connection that names no pool goes to the default pool)"
    shown = ", ".join(f"{i}. {rule.describe()} -> {rule.pool}" for i, rule in enumerate(rules, start=1))
    return f"set {len(rules)} assignment rule{'' if len(rules) == 1 else 's'}: {shown}"


def show_setting(field_name: str, value: Any) -> str:
    """One pool setting as an operator writes it: `2m`, `2KiB`, `[corp.example.com]`, `default`."""
    if field_name == "upn_suffixes":
        return f"[{', '.join(value)}]"
    if field_name == "domain":
        return value or "none"
    if field_name in ("is_default", "honor_routing_tokens"):
        return "true" if value else "false"
    if field_name == "junk_bytes":
        return ps.format_size(value)
    if field_name.endswith(("_ms", "_s")) or field_name in ("probe_rise", "probe_fall"):
        if not value and field_name not in ("logon_lag_s",):
            return "default"
        if field_name.endswith("_s"):
            return ps.format_ms(round(value * 1000))
        if field_name.endswith("_ms"):
            return ps.format_ms(value)
    return str(value)


def pool_changes(old: d.Pool, new: d.Pool) -> str:
    """`junk_bytes 2KiB -> 4KiB, domain none -> CORP`: what differs, in the farm file's words."""
    return ", ".join(
        f"{shown} {show_setting(name, getattr(old, name))} -> {show_setting(name, getattr(new, name))}"
        for name, shown in _SHOWN
        if getattr(old, name) != getattr(new, name)
    )


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


def show_power(power: PoolPower) -> str:
    """The hooks as a plan line shows them: no URL query (it may hold a key, e.g. Azure's `?code=`)."""
    parts = []
    if power.start_url:
        parts.append(
            f"start {_bare(power.start_url)} below {power.min_free_sessions} free sessions, "
            f"users wait {ps.format_ms(round(power.start_wait_s * 1000))}"
        )
    if power.stop_url:
        parts.append(
            f"stop {_bare(power.stop_url)} after {ps.format_ms(round(power.idle_for_s * 1000))} idle, "
            f"keeping {power.keep_running}"
        )
    return "; ".join(parts)


def _bare(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


def _declared(server: d.Server) -> tuple[str, int, int, str, str]:
    return (server.pool, server.weight, server.max_sessions, server.agent_url, server.sessions_url)


async def _live_session_ids(conn: Any, address: str) -> list[str]:
    query = select(sessions.c.id).where(sessions.c.server_address == address, sessions.c.state.in_(LIVE))
    return list((await conn.execute(query)).scalars())
