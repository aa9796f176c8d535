"""A small packet capture on the loopback interface (root, AF_PACKET) for the benches: the TCP segments
to or from a set of ports, and how long a relay takes to pass each one on.

Loopback carries every packet once as outgoing and once as incoming: only the incoming copy is kept.
Each segment's time is the kernel's (SO_TIMESTAMPNS, wall clock), not when this process read it.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ETH_P_ALL = 0x0003
ETH_HEADER = 14
SYN, ACK = 0x02, 0x10
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@dataclass(frozen=True)
class Segment:
    at: float  # seconds (the kernel's wall clock) when the interface carried it
    src: int  # ports
    dst: int
    flags: int
    seq: int
    length: int  # payload bytes


class Capture:
    """Segments to or from `ports` (both ends on 127.0.0.1), read by a thread until `close()`."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = set(ports)
        self.segments: list[Segment] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # Every loopback packet of the machine arrives here: room for bursts while this thread waits.
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)  # root: past rmem_max
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, ancillary, _, address = self._sock.recvmsg(65535, 64)
                if address[2] != socket.PACKET_OUTGOING:
                    segment = parse(data, stamp(ancillary))
                    if segment is not None and (segment.src in self.ports or segment.dst in self.ports):
                        self.segments.append(segment)

    def close(self) -> list[Segment]:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return self.segments


def stamp(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])  # struct timespec
            return float(sec + nsec / 1e9)
    return time.time()


def parse(frame: bytes, at: float) -> Segment | None:
    """An Ethernet frame holding IPv4 and TCP, else None."""
    ip = frame[ETH_HEADER:]
    if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
        return None
    ip_len = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ip_len:]
    src, dst, seq = struct.unpack("!HHI", tcp[:8])
    tcp_len = (tcp[12] >> 4) * 4
    return Segment(at, src, dst, tcp[13], seq, total - ip_len - tcp_len)


def stream(segments: Sequence[Segment], src: int, dst: int) -> list[tuple[float, int]]:
    """(time, stream offset just past the segment's last byte) of one direction's data, in order;
    a retransmitted segment counts once, at its first copy."""
    isn = next((s.seq for s in segments if s.src == src and s.dst == dst and s.flags & SYN), None)
    out: list[tuple[float, int]] = []
    reached = 0
    for s in segments:
        if s.src == src and s.dst == dst and s.length and isn is not None:
            end = (s.seq - isn - 1) % 2**32 + s.length
            if end > reached:
                reached = end
                out.append((s.at, end))
    return out


def relay_delays(incoming: Sequence[tuple[float, int]], outgoing: Sequence[tuple[float, int]]) -> list[float]:
    """Seconds from each incoming segment until the relay has sent on its last byte."""
    delays = []
    j = 0
    for at, end in incoming:
        while j < len(outgoing) and outgoing[j][1] < end:
            j += 1
        if j == len(outgoing):
            break
        delays.append(max(outgoing[j][0] - at, 0.0))
    return delays


def connections(segments: Sequence[Segment], port: int) -> list[int]:
    """The client ports of the connections to `port`, in the order they opened."""
    return [s.src for s in segments if s.dst == port and s.flags & SYN and not s.flags & ACK]


def busiest(segments: Sequence[Segment], port: int) -> int | None:
    """The client port of the connection to `port` that carried the most bytes (a health probe's
    connection carries a few), None when none opened."""
    ports = connections(segments, port)
    if not ports:
        return None
    return max(ports, key=lambda p: sum(s.length for s in segments if p in (s.src, s.dst)))


def waits(segments: Sequence[Segment], client: int, port: int, low_s: float = 0.05) -> list[float]:
    """The pauses of `low_s` or more in which the client had its answer and sent nothing: each gap
    before a client's data segment that follows data from the other side."""
    data = [s for s in segments if s.length and {s.src, s.dst} == {client, port}]
    return [
        b.at - a.at
        for a, b in itertools.pairwise(data)
        if a.src == port and b.src == client and b.at - a.at >= low_s
    ]


def relayed(segments: Sequence[Segment], relay_port: int, server_port: int) -> dict[str, list[float]]:
    """A relay's delays for the busiest client connection to `relay_port`, relayed to `server_port`."""
    client, leg = busiest(segments, relay_port), busiest(segments, server_port)
    if client is None or leg is None:
        return {}
    to_server = relay_delays(stream(segments, client, relay_port), stream(segments, leg, server_port))
    to_client = relay_delays(stream(segments, server_port, leg), stream(segments, relay_port, client))
    return {"to_server": to_server, "to_client": to_client}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
