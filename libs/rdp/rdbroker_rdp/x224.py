"""The client's X.224 Connection Request (MS-RDPBCGR 2.2.1.1): parse incrementally, and build.

    tpkt(4) | x224Crq(7) | [text lines, each CRLF-terminated] | [RDP_NEG_REQ(8) [+ correlation info(36)]]

Text lines are the routing token (`Cookie: msts=...` or `tsv://...`) and/or the cookie
(`Cookie: mstshash=...`). The spec allows one of them; servers SHOULD continue when both are sent,
so every line is read and the first of each kind wins. A line is recognised by a printable first
byte, must end in CR LF inside the TPKT, and a line we do not know is kept in `load_balance_info`.

Decisions for input the spec does not settle (each one has a test):
- an empty `mstshash=` or `msts=` value is no cookie / no token (the client routes with no identity);
- bytes after the negotiation data but inside the TPKT length are an error (as caddy-l4, FreeRDP);
- a correlation id that starts with 0x00 or 0xF4, or non-zero reserved bytes, is an error (as FreeRDP;
  real clients send GUIDs that pass); a 0x0D inside the id is accepted (we read it by length);
- bytes after the TPKT length are not read: the result's `consumed` says where the packet ended and
  the caller keeps (and replays) the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tpkt
from .cookie import collection_name, cookie_value
from .errors import X224Error
from .negotiation import NegotiationRequest, build_negotiation, parse_negotiation


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    cookie: bytes | None  # the mstshash value, no CRLF (may be truncated to 9 chars and space-padded)
    routing_token: bytes | None  # the msts value, no CRLF: decode with decode_routing_token
    collection: str | None  # from tsv://MS Terminal Services Plugin.1.<collection>
    negotiation: NegotiationRequest | None
    raw: bytes  # the whole TPKT, exactly as received
    load_balance_info: bytes | None = None  # the first line that is not a Cookie: line (e.g. tsv://...)

    @property
    def consumed(self) -> int:
        return len(self.raw)


def parse_connection_request(buf: tpkt.Buffer) -> ConnectionRequest | None:
    """A Connection Request from the start of `buf`; None until the whole TPKT has arrived."""
    length = tpkt.check_header(buf, tpkt.CODE_CONNECTION_REQUEST)
    if length is None or len(buf) < length:
        return None
    raw = bytes(buf[:length])  # bounded by tpkt.MAX_LEN before this copy
    return _parse_body(raw)


def _parse_body(raw: bytes) -> ConnectionRequest:
    cookie: bytes | None = None
    token: bytes | None = None
    other: bytes | None = None
    pos = tpkt.MIN_LEN
    while pos < len(raw) and 0x20 <= raw[pos] < 0x7F:
        end = raw.find(b"\r\n", pos)
        if end < 0:
            raise X224Error("text line in the Connection Request is not terminated by CR LF")
        line = raw[pos:end]
        pos = end + 2
        if (value := cookie_value(line, b"mstshash")) is not None:
            cookie = cookie if cookie is not None else value or None
        elif (value := cookie_value(line, b"msts")) is not None:
            token = token if token is not None else value or None
        elif other is None:
            other = line
    negotiation = parse_negotiation(raw[pos:]) if pos < len(raw) else None
    collection = collection_name(other) if other is not None else None
    return ConnectionRequest(cookie, token, collection, negotiation, raw, other)


def _line(value: str | bytes, what: str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if b"\r" in data or b"\n" in data:
        raise ValueError(f"{what} must not contain CR or LF")
    return data


def build_connection_request(
    cookie: str | bytes | None = None,
    routing_token: str | bytes | None = None,
    load_balance_info: str | bytes | None = None,
    requested_protocols: int | None = None,
    flags: int = 0,
    correlation_id: bytes | None = None,
) -> bytes:
    """A Connection Request: `routing_token` is the msts value, `load_balance_info` a whole line such as
    `tsv://MS Terminal Services Plugin.1.Sales`; lines go out as token, load-balance info, cookie.
    NEG_REQ is sent only when `requested_protocols` is given (0 = standard RDP security)."""
    body = b""
    if routing_token is not None:
        body += b"Cookie: msts=" + _line(routing_token, "routing_token") + b"\r\n"
    if load_balance_info is not None:
        line = _line(load_balance_info, "load_balance_info")
        if not line or not 0x20 <= line[0] < 0x7F or line[:7].lower() == b"cookie:":
            raise ValueError("load_balance_info must be a line starting with printable ASCII, not Cookie:")
        body += line + b"\r\n"
    if cookie is not None:
        body += b"Cookie: mstshash=" + _line(cookie, "cookie") + b"\r\n"
    if requested_protocols is not None:
        body += build_negotiation(requested_protocols, flags, correlation_id)
    elif flags or correlation_id is not None:
        raise ValueError("flags and correlation_id need requested_protocols (they ride in RDP_NEG_REQ)")
    length = tpkt.MIN_LEN + len(body)
    if length > tpkt.MAX_LEN:
        raise ValueError(f"Connection Request would be {length} bytes, over {tpkt.MAX_LEN}")
    return tpkt.build_header(length, tpkt.CODE_CONNECTION_REQUEST, 0) + body
