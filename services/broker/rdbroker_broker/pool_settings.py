"""A pool's settings and their bounds: one set of rules for the farm file and `PATCH /v1/pools/{name}`.

Every check takes the value in the unit of its `domain.Pool` field (seconds, milliseconds, bytes) and
answers it, or raises `SettingError` with a message that names the bounds in units a person reads.
The farm file puts `file:line: field:` in front of the message, the REST API answers it as a 422.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rdbroker_broker import domain as d

# NetBIOS names are at most 15 characters. Of the punctuation NetBIOS allows we take only `-`, `_`
# and `.`: `\` and `@` separate an account's parts, and the rest never appears in real domains.
_NETBIOS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_UPN_SUFFIXES = 32
UPN_SUFFIXES_CHARS = 1024  # pools.upn_suffixes holds them comma-separated
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")
_SIZE = re.compile(r"(\d+)\s*(b|kib|mib)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024 * 1024}


class SettingError(ValueError):
    """The value is out of bounds or malformed; the message says what is expected."""


@dataclass(frozen=True)
class Bound:
    """A numeric setting: `low..high` in the field's unit; `zero` (if set) says what 0 means."""

    low: float
    high: float
    unit: str  # "s", "ms" or "bytes"
    zero: str = ""

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise SettingError(self.expected())
        if value == 0 and self.zero:
            return 0
        if not self.low <= value <= self.high:
            raise SettingError(self.expected())
        return value

    def expected(self) -> str:
        text = f"expected {self.show(self.low)} to {self.show(self.high)}"
        return f"{text}, or 0 for {self.zero}" if self.zero else text

    def show(self, value: float) -> str:
        if self.unit == "bytes":
            return format_size(int(value))
        return format_ms(round(value * 1000 if self.unit == "s" else value))


# The bounds of every numeric setting, by domain.Pool field. Probe times match RDBROKER_PROBE_*.
BOUNDS: dict[str, Bound] = {
    "disconnect_timeout_s": Bound(1, 366 * 86400, "s"),
    "probe_interval_ms": Bound(100, 3_600_000, "ms", "the broker's RDBROKER_PROBE_INTERVAL_MS"),
    "probe_timeout_ms": Bound(100, 3_600_000, "ms", "the broker's RDBROKER_PROBE_TIMEOUT_MS"),
    "sessions_interval_ms": Bound(100, 3_600_000, "ms", "the broker's default"),
    "junk_bytes": Bound(0, 1024 * 1024, "bytes"),
    "confirm_timeout_s": Bound(1, 86400, "s"),
    "stale_after_ms": Bound(1000, 86_400_000, "ms", "three probe intervals plus the probe lease"),
    "logon_lag_s": Bound(0, 3600, "s"),
}
PROBE_COUNT_MAX = 100
# What `PATCH /v1/pools/{name}` may change: every setting but the name and which pool is the default.
PATCHABLE = frozenset(BOUNDS) | {
    "probe_rise", "probe_fall", "domain", "upn_suffixes", "honor_routing_tokens", "placement",
}  # fmt: skip


def check_number(field: str, value: Any) -> float:
    return BOUNDS[field].check(value)


def check_count(value: Any) -> int:
    """A probe rise/fall: 1..100, or 0 for the broker's RDBROKER_PROBE_RISE/FALL."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PROBE_COUNT_MAX:
        raise SettingError(f"expected an integer from 1 to {PROBE_COUNT_MAX}, or 0 for the broker's value")
    return value


def check_flag(value: Any) -> bool:
    """A yes/no setting: true or false only (a loose reading would take the string "false" for true)."""
    if not isinstance(value, bool):
        raise SettingError("expected true or false")
    return value


def check_placement(value: Any) -> d.Placement:
    """`breadth` (the least loaded server by weight) or `depth` (fill the busiest server first)."""
    try:
        return d.Placement(value)
    except ValueError:
        raise SettingError(
            "expected breadth (spread users over the least loaded servers) or depth (fill the busiest "
            "server up to its max_sessions before the next)"
        ) from None


def check_domain(value: Any) -> str:
    """A NetBIOS domain name (`CORP`), or "" for none."""
    if not isinstance(value, str):
        raise SettingError("expected a NetBIOS domain name like CORP")
    name = value.strip()
    if name and not _NETBIOS.fullmatch(name):
        raise SettingError(
            "expected a NetBIOS domain name: letters, digits, '-', '_', '.' (not first), at most 15 "
            "characters (a NetBIOS name's length)"
        )
    return name


def check_upn_suffix(value: Any) -> str:
    """A DNS name (`corp.example.com`), lower case; a leading `@` and a trailing dot are dropped."""
    if not isinstance(value, str):
        raise SettingError("expected a DNS name like corp.example.com")
    name = value.strip().lower().removeprefix("@").removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise SettingError(
            f"{value!r} is not a DNS name (labels of letters, digits and '-', like corp.example.com)"
        )
    return name


def check_upn_suffixes(values: Iterable[Any]) -> tuple[str, ...]:
    suffixes: list[str] = []
    for value in values:
        suffix = check_upn_suffix(value)
        if suffix in suffixes:
            raise SettingError(f"{suffix} is listed twice")
        suffixes.append(suffix)
    if len(suffixes) > MAX_UPN_SUFFIXES:
        raise SettingError(f"at most {MAX_UPN_SUFFIXES} UPN suffixes")
    if len(",".join(suffixes)) > UPN_SUFFIXES_CHARS:
        raise SettingError(f"at most {UPN_SUFFIXES_CHARS} characters in all")
    return tuple(suffixes)


def pool_problems(pool: d.Pool, default_probe_interval_ms: int = 0) -> list[tuple[str, str]]:
    """Rules across settings, as (field, problem); [] when the pool is consistent. The probe interval
    is the pool's, else `default_probe_interval_ms` (the broker's RDBROKER_PROBE_INTERVAL_MS) if known."""
    problems = []
    if pool.upn_suffixes and not pool.domain:
        problems.append(("upn_suffixes", "UPN suffixes need the pool's `domain` (the domain they mean)"))
    interval = pool.probe_interval_ms or default_probe_interval_ms
    if pool.stale_after_ms and interval and pool.stale_after_ms <= interval:
        problems.append(
            (
                "stale_after_ms",
                f"must be longer than the probe interval ({format_ms(interval)}), or every result goes "
                "stale between two probes",
            )
        )
    return problems


# --- the farm file's spellings -------------------------------------------------------------------


def parse_duration_ms(value: Any) -> int | None:
    """`500ms`, `30s`, `2m`, `1h30m`, `2d`, `0` or a number of seconds, in milliseconds; None if not a
    duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return round(value * 1000) if math.isfinite(value) and value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _DURATION.fullmatch(text)
    if not text or not match or not any(match.groups()):
        return None
    days, hours, minutes, seconds, ms = (int(g or 0) for g in match.groups())
    return (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000 + ms


def parse_size(value: Any) -> int | None:
    """`2048`, `512B`, `2KiB`, `1MiB`, in bytes; None if not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value.strip())
    if not match:
        return None
    return int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]


def format_ms(ms: int) -> str:
    """The shortest plain spelling: `500ms`, `30s`, `2m`, `1h30m`, `2d`."""
    if ms % 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size} bytes"
