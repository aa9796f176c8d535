"""Reading the farm file's YAML nodes: each problem is told with its line (`file:line: field: problem`),
and durations are read as the file spells them (`8h`, `1h30m`, `500ms`)."""

from __future__ import annotations

import re
from typing import Any

import yaml

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class Reader:
    """One file's problems so far, each with its line, and its YAML nodes read as values."""

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


def parse_probe_ms(value: Any) -> int | None:
    """`500ms`, `2s`, `1m` or a number of seconds (1.5), in milliseconds; None if not a duration."""
    if isinstance(value, str) and value.strip().endswith("ms"):
        digits = value.strip()[:-2].strip()
        return int(digits) if digits.isdigit() else None
    if isinstance(value, float) and not isinstance(value, bool):
        return round(value * 1000) if value > 0 else None
    seconds = parse_duration(value)
    return round(seconds * 1000) if seconds is not None else None
