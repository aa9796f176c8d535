"""How `rdbroker apply`'s plan shows what changes, in the farm file's words: pool settings (`2KiB`, `2m`),
assignment rules, and power hooks (their URLs without the query, which may hold a key)."""

from __future__ import annotations

from typing import Any

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker.power_rules import PoolPower

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
