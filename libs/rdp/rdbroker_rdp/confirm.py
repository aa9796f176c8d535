"""The server's X.224 Connection Confirm (MS-RDPBCGR 2.2.1.2): parse incrementally, and build.

    tpkt(4) | x224Ccf(7) | [RDP_NEG_RSP     02 flags 08 00 <selectedProtocol u32>
                            | RDP_NEG_FAILURE 03 00   08 00 <failureCode u32>]

The header (TPKT, LI, code 0xD0, class 0) decides whether the reply is a Confirm at all: a reply that
passes it comes from a live RDP stack. The negotiation data is then read leniently, by this rule:
- no bytes: kind "none" (a legacy server, or a client that sent no RDP_NEG_REQ);
- 8 or more bytes starting with type 2 or 3: kind "neg_rsp" / "neg_failure" with the u32 read as it
  stands; a length field other than 8 or extra bytes inside the TPKT set `malformed` (zeek's
  rdp-invalid-length capture has length 0);
- 1..7 bytes, or another type: X224Error.
Bytes after the TPKT length are not read (`consumed`); after a Confirm they are the server's next data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from . import tpkt
from .errors import X224Error
from .negotiation import NEG_LEN, TYPE_RDP_NEG_FAILURE, TYPE_RDP_NEG_RSP

ConfirmKind = Literal["neg_rsp", "neg_failure", "none"]

SSL_REQUIRED_BY_SERVER = 1
SSL_NOT_ALLOWED_BY_SERVER = 2
SSL_CERT_NOT_ON_SERVER = 3
INCONSISTENT_FLAGS = 4
HYBRID_REQUIRED_BY_SERVER = 5
SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER = 6

_SRC_REF = 0x1234  # the value MS servers put in SRC-REF (MS-RDPBCGR 3.3.5.3.2)
_KIND_TYPES: dict[ConfirmKind, int] = {"neg_rsp": TYPE_RDP_NEG_RSP, "neg_failure": TYPE_RDP_NEG_FAILURE}


@dataclass(frozen=True, slots=True)
class ConnectionConfirm:
    kind: ConfirmKind
    selected_protocol: int  # neg_rsp only, else 0
    failure_code: int  # neg_failure only, else 0
    flags: int
    raw: bytes  # the whole TPKT
    malformed: bool = False  # negotiation data broke its length rule but was read anyway

    @property
    def consumed(self) -> int:
        return len(self.raw)


def parse_connection_confirm(buf: tpkt.Buffer) -> ConnectionConfirm | None:
    """A Connection Confirm from the start of `buf`; None until the whole TPKT has arrived."""
    length = tpkt.check_header(buf, tpkt.CODE_CONNECTION_CONFIRM)
    if length is None or len(buf) < length:
        return None
    raw = bytes(buf[:length])
    neg = raw[tpkt.MIN_LEN :]
    if not neg:
        return ConnectionConfirm("none", 0, 0, 0, raw)
    if len(neg) < NEG_LEN:
        raise X224Error(f"negotiation data in the Connection Confirm truncated: {len(neg)} of 8 bytes")
    kind_type, flags, neg_length, value = struct.unpack_from("<BBHI", neg)
    malformed = neg_length != NEG_LEN or len(neg) != NEG_LEN
    if kind_type == TYPE_RDP_NEG_RSP:
        return ConnectionConfirm("neg_rsp", value, 0, flags, raw, malformed)
    if kind_type == TYPE_RDP_NEG_FAILURE:
        return ConnectionConfirm("neg_failure", 0, value, flags, raw, malformed)
    raise X224Error(f"unknown negotiation type 0x{kind_type:02x} in the Connection Confirm")


def build_connection_confirm(
    kind: ConfirmKind = "neg_rsp", selected_protocol: int = 0, failure_code: int = 0, flags: int = 0
) -> bytes:
    """A Connection Confirm as a Windows server sends it (SRC-REF 0x1234)."""
    if kind == "none":
        return tpkt.build_header(tpkt.MIN_LEN, tpkt.CODE_CONNECTION_CONFIRM, _SRC_REF)
    if kind not in _KIND_TYPES:
        raise ValueError(f"kind must be neg_rsp, neg_failure or none, not {kind!r}")
    value = selected_protocol if kind == "neg_rsp" else failure_code
    if not 0 <= flags <= 0xFF or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("flags must fit a byte and the protocol or code a u32")
    neg = struct.pack("<BBHI", _KIND_TYPES[kind], flags, NEG_LEN, value)
    return tpkt.build_header(tpkt.MIN_LEN + NEG_LEN, tpkt.CODE_CONNECTION_CONFIRM, _SRC_REF) + neg
