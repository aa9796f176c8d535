"""`rdbroker-agent wake-on-lan MAC`: send a Wake-on-LAN magic packet (docs/power.md, bare metal).

A power hook receiver on the servers' network (where broadcasts reach them) runs it for the server a
`start` call names. The packet is 6 bytes 0xFF then the MAC address 16 times, sent over UDP (port 9,
the discard port, by default) to the broadcast address, a few times: UDP may drop one.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys

PACKET_BYTES = 102
_SEPARATED = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")
_DOTTED = re.compile(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}")
_BARE = re.compile(r"[0-9a-f]{12}")


def parse_mac(text: str) -> bytes:
    """`aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`, `aabb.ccdd.eeff` or `aabbccddeeff`; ValueError else."""
    value = text.strip().lower()
    if not (_SEPARATED.fullmatch(value) or _DOTTED.fullmatch(value) or _BARE.fullmatch(value)):
        raise ValueError(f"{text!r} is not a MAC address (expected like aa:bb:cc:dd:ee:ff)")
    return bytes.fromhex(re.sub(r"[^0-9a-f]", "", value))


def magic_packet(mac: bytes) -> bytes:
    return b"\xff" * 6 + mac * 16


def send(mac: bytes, address: str = "255.255.255.255", port: int = 9, count: int = 3) -> None:
    packet = magic_packet(mac)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for _ in range(count):
            sock.sendto(packet, (address, port))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rdbroker-agent wake-on-lan", description="Send a Wake-on-LAN magic packet to a MAC address."
    )
    parser.add_argument("mac", help="the server's MAC address, like aa:bb:cc:dd:ee:ff")
    parser.add_argument(
        "--broadcast", default="255.255.255.255", help="where to send it (the subnet's broadcast address)"
    )
    parser.add_argument("--port", type=int, default=9, help="UDP port (9, or 7)")
    parser.add_argument("--count", type=int, default=3, help="packets to send (UDP may drop one)")
    args = parser.parse_args(argv)
    try:
        mac = parse_mac(args.mac)
        if not 1 <= args.port <= 65535 or not 1 <= args.count <= 100:
            raise ValueError("--port must be 1..65535 and --count 1..100")
        send(mac, args.broadcast, args.port, args.count)
    except ValueError as exc:
        sys.stderr.write(f"rdbroker-agent wake-on-lan: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"rdbroker-agent wake-on-lan: cannot send to {args.broadcast}:{args.port}: {exc}\n")
        return 1
    sys.stdout.write(f"sent {args.count} magic packets for {mac.hex(':')} to {args.broadcast}:{args.port}\n")
    return 0
