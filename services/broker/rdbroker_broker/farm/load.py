"""`load_farm`: a farm file parsed and checked, every problem at once: its pools (pools.py), its servers
and its assignment rules."""

from __future__ import annotations

import yaml

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker import power_config
from rdbroker_broker.farm.model import Farm, FarmError
from rdbroker_broker.farm.pools import read_pools
from rdbroker_broker.farm.reader import Reader
from rdbroker_common.settings import join_host_port, split_host_port

_SERVER_KEYS = {"address", "pool", "weight", "max_sessions", "agent_url", "sessions_url"}
_ASSIGNMENT_KEYS = {"match", "pool"}
_MATCH_KEYS = {"user", "network"}


def load_farm(text: str, source: str = "farm.yaml", *, default_probe_interval_ms: int = 0) -> Farm:
    """Parse and check a farm file; `default_probe_interval_ms` (the broker's RDBROKER_PROBE_INTERVAL_MS,
    when known) is the interval of pools that set none, for the rules that compare with it."""
    reader = Reader(source)
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
    read_pools(reader, top.get("pools"), farm, default_probe_interval_ms)
    _read_servers(reader, top.get("servers"), farm)
    _read_assignments(reader, top.get("assignments"), farm)
    if reader.problems:
        raise FarmError("\n".join(reader.problems))
    return farm


def _read_servers(reader: Reader, node: yaml.Node | None, farm: Farm) -> None:
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


def _read_assignments(reader: Reader, node: yaml.Node | None, farm: Farm) -> None:
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
