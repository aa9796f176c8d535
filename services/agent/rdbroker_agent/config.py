"""The agent's TOML config: counters with weights and full-scale values, limits, drain, session source,
and who may ask (a bearer token file, TLS files).

Every key is checked and unknown keys are refused, so a typo is an error at start rather than a
counter silently left out. See services/agent/agent.example.toml for every key with its meaning.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from .errors import ConfigError

CounterKind = Literal["cpu", "memory", "sessions", "command"]
COUNTER_KINDS: tuple[CounterKind, ...] = ("cpu", "memory", "sessions", "command")
DEFAULT_FULL_SCALE = {"cpu": 100.0, "memory": 100.0, "command": 100.0}


@dataclass(frozen=True, slots=True)
class Counter:
    name: str
    kind: CounterKind
    weight: float
    full_scale: float  # the reading at which this counter alone means "full" (100)
    command: tuple[str, ...] = ()  # kind "command": argv of a program that prints one number


@dataclass(frozen=True, slots=True)
class SessionSource:
    kind: Literal["psutil", "xrdp", "command"] = "psutil"
    command: tuple[str, ...] = ()  # kind "command": argv of a program that prints the sessions as JSON


@dataclass(frozen=True, slots=True)
class AgentConfig:
    counters: tuple[Counter, ...]
    max_sessions: int | None = None  # at or above this many sessions /load answers 100
    drain: bool = False
    drain_file: Path | None = None  # /load answers "drain" while this file exists
    on_counter_error: Literal["skip", "down"] = "skip"
    command_timeout_s: float = 5.0
    sessions: SessionSource = SessionSource()
    token_file: Path | None = None  # bearer token(s), one per line, re-read when the file changes
    tls_cert: Path | None = None  # HTTPS with this certificate and key
    tls_key: Path | None = None
    tls_ca: Path | None = None  # and client certificates from this CA required (they authenticate)


_TOP_KEYS = {
    "counters",
    "max_sessions",
    "drain",
    "drain_file",
    "on_counter_error",
    "command_timeout_s",
    "sessions",
    "token_file",
    "tls_cert",
    "tls_key",
    "tls_ca",
}
_PATH_KEYS = ("drain_file", "token_file", "tls_cert", "tls_key", "tls_ca")
_COUNTER_KEYS = {"name", "kind", "weight", "full_scale", "command"}
_SESSION_KEYS = {"source", "command"}


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the config file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_config(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
    _no_unknown_keys(data, _TOP_KEYS, "top level")
    raw_counters = data.get("counters")
    if not isinstance(raw_counters, list) or not raw_counters:
        raise ConfigError("at least one [[counters]] table is needed")
    counters = tuple(_counter(raw, i) for i, raw in enumerate(raw_counters))
    names = [c.name for c in counters]
    if len(set(names)) != len(names):
        raise ConfigError("counter names must be unique")
    max_sessions = data.get("max_sessions")
    if max_sessions is not None and (not _is_int(max_sessions) or max_sessions < 1):
        raise ConfigError(f"max_sessions must be a whole number >= 1, not {max_sessions!r}")
    drain = data.get("drain", False)
    if not isinstance(drain, bool):
        raise ConfigError(f"drain must be true or false, not {drain!r}")
    paths = {key: _path(data.get(key), key, base_dir) for key in _PATH_KEYS}
    if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        raise ConfigError("tls_cert and tls_key go together (HTTPS needs both)")
    if paths["tls_ca"] is not None and paths["tls_cert"] is None:
        raise ConfigError("tls_ca (client certificates) needs tls_cert and tls_key (HTTPS)")
    on_error = data.get("on_counter_error", "skip")
    if on_error not in ("skip", "down"):
        raise ConfigError(f"on_counter_error must be 'skip' or 'down', not {on_error!r}")
    timeout = _number(data.get("command_timeout_s", 5.0), "command_timeout_s")
    if not 0 < timeout <= 300:
        raise ConfigError(f"command_timeout_s must be in (0, 300], not {timeout}")
    sessions = _session_source(data.get("sessions", {}))
    return AgentConfig(
        counters=counters,
        max_sessions=max_sessions,
        drain=drain,
        drain_file=paths["drain_file"],
        on_counter_error=on_error,
        command_timeout_s=timeout,
        sessions=sessions,
        token_file=paths["token_file"],
        tls_cert=paths["tls_cert"],
        tls_key=paths["tls_key"],
        tls_ca=paths["tls_ca"],
    )


def _path(raw: object, key: str, base_dir: Path | None) -> Path | None:
    """A path key: relative to the config file's folder."""
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{key} must be a non-empty path")
    path = Path(raw)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return path


def _counter(raw: object, index: int) -> Counter:
    where = f"counters[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    _no_unknown_keys(raw, _COUNTER_KEYS, where)
    kind = raw.get("kind")
    if kind not in COUNTER_KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(COUNTER_KINDS)}, not {kind!r}")
    kind = cast(CounterKind, kind)
    name = raw.get("name", kind)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name must be a non-empty string")
    weight = _number(raw.get("weight", 1.0), f"{where}.weight")
    if weight <= 0:
        raise ConfigError(f"{where}.weight must be > 0, not {weight}")
    if "full_scale" not in raw and kind not in DEFAULT_FULL_SCALE:
        raise ConfigError(f"{where}.full_scale is needed for kind {kind!r} (e.g. the most sessions it holds)")
    full_scale = _number(raw.get("full_scale", DEFAULT_FULL_SCALE.get(kind)), f"{where}.full_scale")
    if full_scale <= 0:
        raise ConfigError(f"{where}.full_scale must be > 0, not {full_scale}")
    command: tuple[str, ...] = ()
    if kind == "command":
        command = _command(raw.get("command"), f"{where}.command")
    elif "command" in raw:
        raise ConfigError(f"{where}.command is only for kind 'command'")
    return Counter(name, kind, weight, full_scale, command)


def _session_source(raw: object) -> SessionSource:
    if not isinstance(raw, dict):
        raise ConfigError("[sessions] must be a table")
    _no_unknown_keys(raw, _SESSION_KEYS, "sessions")
    source = raw.get("source", "psutil")
    if source == "psutil":
        if "command" in raw:
            raise ConfigError("sessions.command needs sessions.source = 'command'")
        return SessionSource("psutil")
    if source == "xrdp":
        if "command" in raw:
            raise ConfigError("sessions.command needs sessions.source = 'command'")
        return SessionSource("xrdp")
    if source == "command":
        return SessionSource("command", _command(raw.get("command"), "sessions.command"))
    raise ConfigError(f"sessions.source must be 'psutil', 'xrdp' or 'command', not {source!r}")


def _command(raw: object, where: str) -> tuple[str, ...]:
    # A list, not a shell string: no quoting rules that differ between Windows and Linux.
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) and a for a in raw):
        raise ConfigError(f'{where} must be a non-empty list of strings, e.g. ["/usr/bin/prog", "--arg"]')
    return tuple(raw)


def _number(raw: object, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ConfigError(f"{where} must be a number, not {raw!r}")
    return float(raw)


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _no_unknown_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        allowed_text = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {allowed_text})")
