"""What a client sends before the server's first answer: [RDP_PRECONNECTION_PDU] + Connection Request.

`parse_first_packet(buf)` is what a proxy calls on every read: None while more bytes are needed, an
X224Error as soon as the bytes prove the packet bad, else a FirstPacket. The caller forwards `raw`
(every byte consumed, in order) and then `buf[consumed:]`, the bytes that came after the Connection
Request: they are not inspected, not refused and not lost.

A buffer that starts `03 00` is a TPKT. Anything else is read as a preconnection PDU, whose cbSize
(16..4096) cannot start with `03 00`, so the two never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tpkt
from .errors import X224Error
from .preconnection import MAX_PRECONNECTION, PreconnectionPdu, parse_preconnection
from .x224 import ConnectionRequest, parse_connection_request

MAX_FIRST_PACKET = MAX_PRECONNECTION + tpkt.MAX_LEN  # the most bytes read before a routing decision


@dataclass(frozen=True, slots=True)
class FirstPacket:
    preconnection: PreconnectionPdu | None
    request: ConnectionRequest
    raw: bytes  # preconnection PDU (if any) + Connection Request, exactly as received

    @property
    def consumed(self) -> int:
        return len(self.raw)


def parse_first_packet(buf: tpkt.Buffer) -> FirstPacket | None:
    if not buf:
        return None
    if buf[0] == tpkt.TPKT_VERSION and (len(buf) < 2 or buf[1] == 0):
        if len(buf) < 2:
            return None  # 03 alone could still open a preconnection PDU of cbSize 0x..03
        request = parse_connection_request(buf)
        return None if request is None else FirstPacket(None, request, request.raw)
    try:
        pcb = parse_preconnection(buf)
    except X224Error as exc:
        raise X224Error(f"first bytes are neither a TPKT nor a preconnection PDU: {exc}") from exc
    if pcb is None:
        return None
    with memoryview(buf)[len(pcb.raw) :] as rest:  # no copy, released before the caller resizes buf
        request = parse_connection_request(rest)
    return None if request is None else FirstPacket(pcb, request, pcb.raw + request.raw)
