"""RDP_PRECONNECTION_PDU (MS-RDPEPS 2.2.1): Hyper-V / VDI console clients send it before the CR.

    cbSize u32 | flags u32 | version u32 (1 or 2) | id u32 | v2: cchPCB u16 | wszPCB (cchPCB UTF-16LE units)

All little-endian. Bounds follow MS-RDPEPS 3.2.5.1 (cbSize 16 for v1, >= 18 and room for the string for
v2) plus our own cap, MAX_PRECONNECTION, checked before waiting for (or copying) the body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import X224Error
from .tpkt import Buffer

MAX_PRECONNECTION = 4096
V1_LEN = 16
V2_MIN_LEN = 18


@dataclass(frozen=True, slots=True)
class PreconnectionPdu:
    version: int
    flags: int  # MUST be zero when sent, ignored on receipt: kept only to be logged
    id: int
    blob: str | None  # the v2 string without its NUL terminator; None for v1
    raw: bytes


def parse_preconnection(buf: Buffer) -> PreconnectionPdu | None:
    """A preconnection PDU from the start of `buf`; None until all cbSize bytes have arrived."""
    n = len(buf)
    if n < 4:
        return None
    (size,) = struct.unpack_from("<I", buf)
    if size < V1_LEN or size == V1_LEN + 1 or size > MAX_PRECONNECTION:
        raise X224Error(f"preconnection PDU cbSize {size} outside 16 or 18..{MAX_PRECONNECTION}")
    if n < 12:
        return None
    (version,) = struct.unpack_from("<I", buf, 8)
    if version == 1 and size != V1_LEN:
        raise X224Error(f"preconnection PDU v1 with cbSize {size}, expected 16")
    if version == 2 and size < V2_MIN_LEN:
        raise X224Error(f"preconnection PDU v2 with cbSize {size}, expected at least 18")
    if version not in (1, 2):
        raise X224Error(f"preconnection PDU version {version}, expected 1 or 2")
    if version == 2 and n >= V2_MIN_LEN:
        (chars,) = struct.unpack_from("<H", buf, 16)
        if V2_MIN_LEN + 2 * chars > size:
            raise X224Error(f"preconnection PDU string of {chars} characters overflows cbSize {size}")
    if n < size:
        return None
    raw = bytes(buf[:size])
    _size, flags, _version, pdu_id = struct.unpack_from("<IIII", raw)
    blob = None
    if version == 2:
        (chars,) = struct.unpack_from("<H", raw, 16)
        try:
            blob = raw[V2_MIN_LEN : V2_MIN_LEN + 2 * chars].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise X224Error("preconnection PDU string is not valid UTF-16") from exc
        blob = blob.split("\x00", 1)[0]
    return PreconnectionPdu(version, flags, pdu_id, blob, raw)


def build_preconnection(pdu_id: int, blob: str | None = None, flags: int = 0) -> bytes:
    """A v1 PDU (no blob) or a v2 PDU whose string is `blob` plus a NUL terminator."""
    if not 0 <= pdu_id <= 0xFFFFFFFF or not 0 <= flags <= 0xFFFFFFFF:
        raise ValueError("pdu_id and flags must fit a u32")
    if blob is None:
        return struct.pack("<IIII", V1_LEN, flags, 1, pdu_id)
    if "\x00" in blob:
        raise ValueError("blob must not contain NUL")
    try:
        text = (blob + "\x00").encode("utf-16-le")
    except UnicodeEncodeError as exc:  # a lone surrogate: the parser would refuse it too
        raise ValueError("blob is not valid UTF-16 text") from exc
    size = V2_MIN_LEN + len(text)
    if size > MAX_PRECONNECTION:
        raise ValueError(f"preconnection PDU would be {size} bytes, over {MAX_PRECONNECTION}")
    return struct.pack("<IIIIH", size, flags, 2, pdu_id, len(text) // 2) + text
