"""The farm file's `pools:`: each pool's name, default, disconnect timeout, probe, account and claim
settings and `power:` hooks, each checked where it is written, then the rules across settings."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import yaml

from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker import power_config
from rdbroker_broker.farm.model import Farm
from rdbroker_broker.farm.reader import Reader, parse_duration, parse_probe_ms

DEFAULT_DISCONNECT_TIMEOUT_S = 8 * 3600.0
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")
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


def read_pools(reader: Reader, node: yaml.Node | None, farm: Farm, default_interval_ms: int) -> None:
    """`pools:` into `farm.pools` and `farm.power`; without it, one default pool."""
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


def _read_claim_settings(reader: Reader, fields: dict[str, yaml.Node], where: str, pool: d.Pool) -> d.Pool:
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


def _read_probe(reader: Reader, node: yaml.Node | None, where: str) -> tuple[int, int, int, int, int]:
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
