"""RDP_NEG_REQ and RDP_NEG_CORRELATION_INFO (MS-RDPBCGR 2.2.1.1.1-2), all fields little-endian.

01 flags 08 00 <requestedProtocols u32>                         RDP_NEG_REQ, 8 bytes
06 00 24 00 <correlationId 16 bytes> <16 zero bytes>            iff flags & 0x08, 36 bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import X224Error

PROTOCOL_RDP = 0x00
PROTOCOL_SSL = 0x01
PROTOCOL_HYBRID = 0x02
PROTOCOL_RDSTLS = 0x04
PROTOCOL_HYBRID_EX = 0x08
PROTOCOL_RDSAAD = 0x10

RESTRICTED_ADMIN_MODE_REQUIRED = 0x01
REDIRECTED_AUTHENTICATION_MODE_REQUIRED = 0x02
CORRELATION_INFO_PRESENT = 0x08

TYPE_RDP_NEG_REQ = 0x01
TYPE_RDP_NEG_RSP = 0x02
TYPE_RDP_NEG_FAILURE = 0x03
TYPE_RDP_CORRELATION_INFO = 0x06

NEG_LEN = 8
CORRELATION_LEN = 36


@dataclass(frozen=True, slots=True)
class NegotiationRequest:
    flags: int
    requested_protocols: int
    correlation_id: bytes | None = None  # 16 bytes when flags & CORRELATION_INFO_PRESENT

    @property
    def wants_ssl(self) -> bool:
        return bool(self.requested_protocols & PROTOCOL_SSL)


def parse_negotiation(data: bytes) -> NegotiationRequest:
    """Parse RDP_NEG_REQ (+ correlation info) filling `data` exactly; anything else is an X224Error."""
    if data[0] != TYPE_RDP_NEG_REQ:
        raise X224Error(f"unexpected byte 0x{data[0]:02x} where RDP_NEG_REQ (0x01) or the end was expected")
    if len(data) < NEG_LEN:
        raise X224Error(f"RDP_NEG_REQ truncated: {len(data)} of 8 bytes")
    _type, flags, length, protocols = struct.unpack_from("<BBHI", data)
    if length != NEG_LEN:
        raise X224Error(f"RDP_NEG_REQ length field {length}, expected 8")
    correlation_id = None
    end = NEG_LEN
    if flags & CORRELATION_INFO_PRESENT:
        correlation_id = _parse_correlation(data[NEG_LEN:])
        end += CORRELATION_LEN
    if len(data) != end:
        raise X224Error(f"{len(data) - end} trailing bytes inside the TPKT after the negotiation request")
    return NegotiationRequest(flags, protocols, correlation_id)


def _parse_correlation(data: bytes) -> bytes:
    # The spec's SHOULDs on the first byte (0x00, 0xF4) are enforced, as FreeRDP does. Its third one, no
    # 0x0D byte, protects parsers that scan for CR LF; we read by length, and ANCHORS' vector V12 has one.
    if len(data) < CORRELATION_LEN:
        raise X224Error(f"RDP_NEG_CORRELATION_INFO truncated: {len(data)} of 36 bytes")
    _type, flags, length = struct.unpack_from("<BBH", data)
    if (_type, flags, length) != (TYPE_RDP_CORRELATION_INFO, 0, CORRELATION_LEN):
        raise X224Error("bad RDP_NEG_CORRELATION_INFO header")
    correlation_id = data[4:20]
    check_correlation_id(correlation_id, X224Error)
    if any(data[20:36]):
        raise X224Error("RDP_NEG_CORRELATION_INFO reserved bytes are not zero")
    return correlation_id


def check_correlation_id(correlation_id: bytes, error: type[ValueError] = ValueError) -> None:
    if len(correlation_id) != 16:
        raise error(f"correlation id is {len(correlation_id)} bytes, expected 16")
    if correlation_id[0] in (0x00, 0xF4):
        raise error(f"correlation id starts with 0x{correlation_id[0]:02x}")


def build_negotiation(requested_protocols: int, flags: int = 0, correlation_id: bytes | None = None) -> bytes:
    if correlation_id is not None:
        flags |= CORRELATION_INFO_PRESENT
    elif flags & CORRELATION_INFO_PRESENT:
        raise ValueError("flags has CORRELATION_INFO_PRESENT but no correlation_id was given")
    if not 0 <= flags <= 0xFF or not 0 <= requested_protocols <= 0xFFFFFFFF:
        raise ValueError("flags must fit a byte and requested_protocols a u32")
    out = struct.pack("<BBHI", TYPE_RDP_NEG_REQ, flags, NEG_LEN, requested_protocols)
    if correlation_id is not None:
        check_correlation_id(correlation_id)
        out += struct.pack("<BBH", TYPE_RDP_CORRELATION_INFO, 0, CORRELATION_LEN) + correlation_id + bytes(16)
    return out
