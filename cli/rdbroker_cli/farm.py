"""The farm `rdbroker up` starts with: a farm file (`-f farm.yaml`, DESIGN §7) or `--server` addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rdbroker_common.settings import split_host_port

DEFAULT_POOL = "default"
RDP_PORT = 3389


class FarmError(ValueError):
    """The farm given on the command line is unusable; the message says why, in one line."""


def from_servers(addresses: list[str], pool: str = DEFAULT_POOL) -> dict[str, Any]:
    """One default pool holding these servers (`host` alone means port 3389)."""
    servers: list[dict[str, Any]] = []
    seen: set[str] = set()
    for text in addresses:
        try:
            host, port = split_host_port(text, default_port=RDP_PORT)
        except ValueError as exc:
            raise FarmError(f"bad --server {text!r}: {exc}") from exc
        if port == 0:
            raise FarmError(f"bad --server {text!r}: port 0")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if address in seen:
            raise FarmError(f"--server {address} is given twice")
        seen.add(address)
        servers.append({"address": address, "pool": pool})
    return {"pools": [{"name": pool, "default": True}], "servers": servers}


def load(path: Path) -> dict[str, Any]:
    """Read a farm file: YAML with `pools` and `servers` lists (the broker checks the details)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FarmError(f"cannot read the farm file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FarmError(f"the farm file {path} is not UTF-8 text") from exc
    try:
        farm = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise FarmError(f"the farm file {path} is not valid YAML{line}") from exc
    if not isinstance(farm, dict):
        raise FarmError(f"the farm file {path} must be a mapping with `pools` and `servers`")
    for key in ("pools", "servers"):
        if not isinstance(farm.get(key, []), list):
            raise FarmError(f"the farm file {path}: `{key}` must be a list")
    return farm


def summary(farm: dict[str, Any]) -> str:
    """`3 servers in pool default` / `5 servers in 2 pools`."""
    servers = farm.get("servers") or []
    pools = {str(s.get("pool") or DEFAULT_POOL) for s in servers if isinstance(s, dict)}
    count = f"{len(servers)} server{'' if len(servers) == 1 else 's'}"
    if len(pools) == 1:
        return f"{count} in pool {pools.pop()}"
    return f"{count} in {len(pools)} pools"
