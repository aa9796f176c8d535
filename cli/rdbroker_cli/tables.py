"""Plain-text tables for people (`--json` is for scripts)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

# (heading, how to show the row's value)
Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Left-aligned columns two spaces apart, one heading line; trailing spaces stripped."""
    cells = [[heading for heading, _ in columns]]
    cells += [[_one_line(show(row)) for _, show in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _one_line(text: str) -> str:
    # A value from the network must not break the table's layout (or the terminal).
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def field(name: str, default: str = "") -> Callable[[Mapping[str, Any]], str]:
    def show(row: Mapping[str, Any]) -> str:
        value = row.get(name)
        return default if value is None or value == "" else str(value)

    return show


def when(name: str) -> Callable[[Mapping[str, Any]], str]:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` UTC, or `-`."""

    def show(row: Mapping[str, Any]) -> str:
        value = row.get(name)
        if not value:
            return "-"
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S")

    return show


def load(row: Mapping[str, Any]) -> str:
    value = row.get("load")
    return "-" if value is None or (isinstance(value, int) and value < 0) else str(value)


def health(row: Mapping[str, Any]) -> str:
    """`up`, or `unknown (last result 09:41:12)` when that result is too old to count (UTC; the date
    too when it was not today)."""
    value = str(row.get("health") or "")
    if not row.get("stale"):
        return value
    shown = when("probed_at")(row)
    if shown == "-":
        return value
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    return f"{value} (last result {shown[11:] if shown.startswith(today) else shown})"


def confirmed(row: Mapping[str, Any]) -> str:
    """`yes` when the server's agent listed the session; a live one it has not is a `claim`."""
    if row.get("confirmed"):
        return "yes"
    return "no" if row.get("state") == "ended" else "claim"


def state(row: Mapping[str, Any]) -> str:
    """The operator's state, and the agent's tightening of it when they differ; a drain until empty
    under way with its sessions left."""
    admin = str(row.get("admin_state") or "")
    effective = str(row.get("effective_admin_state") or admin)
    shown = admin if effective == admin else f"{admin} ({effective} by agent)"
    drain = row.get("drain")
    if isinstance(drain, Mapping) and drain.get("running"):
        shown += f" (until empty: {drain.get('sessions_left', '?')} left)"
    return shown


SERVER_COLUMNS: list[Column] = [
    ("POOL", field("pool")),
    ("ADDRESS", field("address")),
    ("STATE", state),
    ("HEALTH", health),
    ("POWER", field("power", "on")),
    ("LOAD", load),
    ("SESSIONS", field("live_sessions", "0")),
    ("HELD", field("held_sessions", "0")),
    ("WEIGHT", field("weight")),
    ("MAX", field("max_sessions", "0")),
]

SESSION_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("USER", field("user", "-")),
    ("POOL", field("pool")),
    ("SERVER", field("server_address")),
    ("STATE", field("state")),
    ("CONFIRMED", confirmed),
    ("CREATED", when("created_at")),
    ("EXPIRES", when("expires_at")),
]


AUDIT_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("AT", when("at")),
    ("ACTOR", field("actor")),
    ("CLIENT", field("client", "-")),
    ("ACTION", field("action")),
    ("TARGET", field("target", "-")),
    ("DETAIL", field("detail", "-")),
]


def milliseconds(name: str, zero: str = "default") -> Callable[[Mapping[str, Any]], str]:
    """A time in milliseconds as `500ms`, `30s`, `1h30m`; 0 as `zero`."""

    def show(row: Mapping[str, Any]) -> str:
        value = row.get(name)
        if not isinstance(value, int | float) or value < 0:
            return "-"
        return format_ms(round(value)) if value else zero

    return show


def seconds(name: str) -> Callable[[Mapping[str, Any]], str]:
    def show(row: Mapping[str, Any]) -> str:
        value = row.get(name)
        if not isinstance(value, int | float) or value < 0:
            return "-"
        return format_ms(round(value * 1000))

    return show


def count(name: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda row: str(row.get(name)) if row.get(name) else "default"


def size(row: Mapping[str, Any]) -> str:
    value = row.get("junk_bytes")
    if not isinstance(value, int) or value < 0:
        return "-"
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return f"{value}B"


def _yes_no(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else "-"  # "-": an older broker


def suffixes(row: Mapping[str, Any]) -> str:
    values = row.get("upn_suffixes")
    return ",".join(str(v) for v in values) if isinstance(values, list) and values else "-"


POOL_COLUMNS: list[Column] = [
    ("NAME", field("name")),
    ("DEFAULT", lambda row: "yes" if row.get("default") else ""),
    ("DISCONNECT TIMEOUT", lambda row: _duration(row.get("disconnect_timeout_s"))),
    ("DOMAIN", field("domain", "-")),
    ("UPN SUFFIXES", suffixes),
    ("JUNK", size),
    ("CONFIRM", seconds("confirm_timeout_s")),
    ("STALE AFTER", milliseconds("stale_after_ms")),
    ("LOGON LAG", seconds("logon_lag_s")),
    ("TOKENS", lambda row: _yes_no(row.get("honor_routing_tokens"))),
    ("PLACEMENT", field("placement", "breadth")),
    ("SERVERS", field("servers", "0")),
    ("SESSIONS", field("live_sessions", "0")),
]

# `rdbroker pools show`: every setting, one per line, as the farm file names it.
POOL_SETTINGS: list[Column] = [
    ("name", field("name")),
    ("default", lambda row: "yes" if row.get("default") else "no"),
    ("disconnect_timeout", lambda row: _duration(row.get("disconnect_timeout_s"))),
    ("domain", field("domain", "none")),
    ("upn_suffixes", lambda row: suffixes(row) if row.get("upn_suffixes") else "none"),
    ("junk_bytes", size),
    ("confirm_timeout", seconds("confirm_timeout_s")),
    ("stale_after", milliseconds("stale_after_ms", "default (three probe intervals plus the probe lease)")),
    ("logon_lag", seconds("logon_lag_s")),
    ("honor_routing_tokens", lambda row: _yes_no(row.get("honor_routing_tokens"))),
    ("placement", field("placement", "breadth")),
    ("probe.interval", milliseconds("probe_interval_ms", "default (RDBROKER_PROBE_INTERVAL_MS)")),
    ("probe.timeout", milliseconds("probe_timeout_ms", "default (RDBROKER_PROBE_TIMEOUT_MS)")),
    ("probe.rise", count("probe_rise")),
    ("probe.fall", count("probe_fall")),
    ("probe.sessions_interval", milliseconds("sessions_interval_ms")),
    ("servers", field("servers", "0")),
    ("live_sessions", field("live_sessions", "0")),
]


def render_settings(row: Mapping[str, Any], lines: Sequence[Column]) -> str:
    """`name:  value` lines, the values aligned."""
    width = max(len(name) for name, _ in lines) + 1
    return "".join(f"{name + ':':<{width}}  {_one_line(show(row))}\n" for name, show in lines)


def format_ms(ms: int) -> str:
    """`500ms`, `30s`, `2m`, `1h30m`, `2d`."""
    if ms % 1000:
        return f"{ms}ms"
    rest = ms // 1000
    parts = []
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        number, rest = divmod(rest, scale)
        if number:
            parts.append(f"{number}{unit}")
    return "".join(parts) or "0s"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"
