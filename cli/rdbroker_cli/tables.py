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


def state(row: Mapping[str, Any]) -> str:
    """The operator's state, and the agent's tightening of it when they differ."""
    admin = str(row.get("admin_state") or "")
    effective = str(row.get("effective_admin_state") or admin)
    return admin if effective == admin else f"{admin} ({effective} by agent)"


SERVER_COLUMNS: list[Column] = [
    ("POOL", field("pool")),
    ("ADDRESS", field("address")),
    ("STATE", state),
    ("HEALTH", field("health")),
    ("LOAD", load),
    ("SESSIONS", field("live_sessions", "0")),
    ("WEIGHT", field("weight")),
    ("MAX", field("max_sessions", "0")),
]

SESSION_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("USER", field("user", "-")),
    ("POOL", field("pool")),
    ("SERVER", field("server_address")),
    ("STATE", field("state")),
    ("CREATED", when("created_at")),
    ("EXPIRES", when("expires_at")),
]

POOL_COLUMNS: list[Column] = [
    ("NAME", field("name")),
    ("DEFAULT", lambda row: "yes" if row.get("default") else ""),
    ("DISCONNECT TIMEOUT", lambda row: _duration(row.get("disconnect_timeout_s"))),
    ("SERVERS", field("servers", "0")),
    ("SESSIONS", field("live_sessions", "0")),
]


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"
