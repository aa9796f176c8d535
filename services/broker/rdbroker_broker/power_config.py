"""A pool's `power:` in the farm file (docs/power.md), read and checked with the farm's line numbers:

```yaml
power:
  start: {url: https://hooks.example/start, min_free_sessions: 10, timeout: 10m}
  stop: {url: https://hooks.example/stop, idle_for: 30m, keep_running: 2, timeout: 10m}
  start_wait: 20s
```
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Protocol

import yaml

from rdbroker_broker import pool_settings as ps
from rdbroker_broker import power_rules as rules
from rdbroker_common.power import MAX_START_WAIT_S
from rdbroker_common.settings import is_loopback

_POWER_KEYS = {"start", "stop", "start_wait"}
_START_KEYS = {"url", "min_free_sessions", "timeout"}
_STOP_KEYS = {"url", "idle_for", "keep_running", "timeout"}
MAX_COUNT = 1_000_000
MAX_URL_CHARS = 1024  # pool_power.start_url / stop_url
TIMEOUT_S = (1.0, 86400.0)
IDLE_FOR_S = (1.0, 366 * 86400.0)
START_WAIT_S = (1.0, MAX_START_WAIT_S)


class Reader(Protocol):
    """What of the farm file's reader this needs (farm.reader.Reader)."""

    def problem(self, node: yaml.Node, where: str, message: str) -> None: ...

    def value(self, node: yaml.Node) -> Any: ...

    def mapping(self, node: yaml.Node, where: str, allowed: set[str]) -> dict[str, yaml.Node] | None: ...


def check_url(value: Any) -> str:
    """An https:// URL, or http:// to a loopback address (a receiver on the broker's own host)."""
    if not isinstance(value, str) or not value.strip():
        raise ps.SettingError("expected an https:// URL")
    url = value.strip()
    if len(url) > MAX_URL_CHARS:
        raise ps.SettingError(f"at most {MAX_URL_CHARS} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ps.SettingError(f"not a URL ({exc})") from exc
    if parts.scheme not in ("https", "http") or not host:
        raise ps.SettingError("expected an https:// URL (or http:// to 127.0.0.1)")
    if parts.scheme == "http" and not is_loopback(host):
        raise ps.SettingError(
            "plain http:// only to a loopback address (the hook's answer and the server's address "
            "would cross the network in clear): use https://"
        )
    if parts.username is not None or parts.password is not None:
        raise ps.SettingError("no credentials in the URL: the receiver checks the request's signature")
    return url


def _count(value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_COUNT:
        raise ps.SettingError(f"expected an integer from {low} to {MAX_COUNT}")
    return value


def _seconds(value: Any, bounds: tuple[float, float]) -> float:
    low, high = bounds
    ms = ps.parse_duration_ms(value)
    if ms is None or not low * 1000 <= ms <= high * 1000:
        shown = f"{ps.format_ms(round(low * 1000))} to {ps.format_ms(round(high * 1000))}"
        raise ps.SettingError(f"expected a duration like 30s or 30m ({shown})")
    return ms / 1000


def read_power(reader: Reader, node: yaml.Node, where: str, pool: str) -> rules.PoolPower | None:
    """The pool's hooks, or None when `power:` is invalid (the problems told to `reader`)."""
    fields = reader.mapping(node, where, _POWER_KEYS)
    if fields is None:
        return None
    ok = True
    values: dict[str, Any] = {}

    def check(node: yaml.Node, at: str, key: str, parse: Any) -> None:
        nonlocal ok
        try:
            values[key] = parse(reader.value(node))
        except ps.SettingError as exc:
            reader.problem(node, at, str(exc))
            ok = False

    def hook(name: str, allowed: set[str], required: str, parsers: dict[str, tuple[str, Any]]) -> bool:
        nonlocal ok
        hook_node = fields.get(name)
        if hook_node is None:
            return False
        hook_fields = reader.mapping(hook_node, f"{where}.{name}", allowed)
        if hook_fields is None:
            ok = False
            return False
        for key in ("url", required):
            if key not in hook_fields:
                reader.problem(hook_node, f"{where}.{name}.{key}", "required")
                ok = False
        for key, (target, parse) in parsers.items():
            if key in hook_fields:
                check(hook_fields[key], f"{where}.{name}.{key}", target, parse)
        return True

    has_start = hook(
        "start",
        _START_KEYS,
        "min_free_sessions",
        {
            "url": ("start_url", check_url),
            "min_free_sessions": ("min_free_sessions", lambda v: _count(v, 1)),
            "timeout": ("start_timeout_s", lambda v: _seconds(v, TIMEOUT_S)),
        },
    )
    has_stop = hook(
        "stop",
        _STOP_KEYS,
        "idle_for",
        {
            "url": ("stop_url", check_url),
            "idle_for": ("idle_for_s", lambda v: _seconds(v, IDLE_FOR_S)),
            "keep_running": ("keep_running", lambda v: _count(v, 0)),
            "timeout": ("stop_timeout_s", lambda v: _seconds(v, TIMEOUT_S)),
        },
    )
    if "start_wait" in fields:
        node_wait = fields["start_wait"]
        check(node_wait, f"{where}.start_wait", "start_wait_s", lambda v: _seconds(v, START_WAIT_S))
        if not has_start and "start" not in fields:
            reader.problem(node_wait, f"{where}.start_wait", "needs a `start` hook (it waits for one)")
            ok = False
    if not has_start and not has_stop and ok and "start" not in fields and "stop" not in fields:
        reader.problem(node, where, "expected a `start` hook, a `stop` hook or both")
        ok = False
    if ok and has_stop and not has_start and values.get("keep_running", 0) < 1:
        reader.problem(
            fields["stop"],
            f"{where}.stop.keep_running",
            "a pool with a stop hook and no start hook must keep at least 1 server running "
            "(nothing would start one again)",
        )
        ok = False
    return rules.PoolPower(pool=pool, **values) if ok else None


def needs_limits(power: rules.PoolPower | None) -> bool:
    """Free capacity is counted in sessions: every server of a pool with a start hook needs a limit."""
    return power is not None and bool(power.start_url)
