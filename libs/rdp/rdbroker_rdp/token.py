"""Microsoft's `Cookie: msts=` routing token: `<IPv4 as LE u32>.<port byte-swapped>.<reserved>`.

172.31.249.216:3389 <-> `3640205228.15629.0000`. The decoder follows HAProxy's `tcp_persist_rdp_cookie`
(the dot after the port is required, the reserved part is ignored) with two extra rules so a value
from another product is never mistaken for an address: each number is plain decimal within its range,
and the reserved part is decimal digits, optionally followed by the space that pads the token to an
even length. Anything else is opaque (`None`). A decoded address must still be a registered server
before anyone routes to it; that check is the broker's.
"""

from __future__ import annotations

import ipaddress
import re
import struct

_TOKEN = re.compile(rb"([0-9]{1,10})\.([0-9]{1,5})\.[0-9]* *")


def decode_routing_token(token: str | bytes) -> tuple[str, int] | None:
    """(host, port) for an MS-format token, else None (opaque: keep it, never treat it as an address)."""
    raw = token.encode("utf-8", errors="replace") if isinstance(token, str) else bytes(token)
    match = _TOKEN.fullmatch(raw)
    if match is None:
        return None
    addr, swapped = int(match[1]), int(match[2])
    if not 0 < addr <= 0xFFFFFFFF or not 0 < swapped <= 0xFFFF:
        return None
    host = str(ipaddress.IPv4Address(struct.pack("<I", addr)))
    (port,) = struct.unpack("<H", struct.pack(">H", swapped))
    return host, port


def encode_routing_token(host: str, port: int) -> str:
    """The msts value for an IPv4 host and port, e.g. `3640205228.15629.0000`."""
    try:
        packed = ipaddress.IPv4Address(host).packed
    except ValueError as exc:
        raise ValueError(f"routing tokens carry IPv4 addresses only, not {host!r}") from exc
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port {port} outside 1..65535")
    (addr,) = struct.unpack("<I", packed)
    (swapped,) = struct.unpack("<H", struct.pack(">H", port))
    return f"{addr}.{swapped}.0000"
