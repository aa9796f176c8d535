"""A fake RDP server for tests and `rdbroker demo`: answers the first packet, then echoes or sinks.

This is the only module of `rdbroker_rdp` that does I/O (asyncio sockets); the codec itself is sans-IO
and the package does not import this module.

Modes, for what happens after a valid first packet ([preconnection PDU] + Connection Request):
    echo          answer the default Confirm, then send back every later byte
    sink          answer the default Confirm, then read and drop every later byte
    silent        never answer; read and drop
    garbage       answer bytes that are not a Confirm, then read and drop
    reset         reset the connection (RST: SO_LINGER 0) instead of answering
    slow          wait `delay_s`, then behave as echo
    bare_confirm  answer an 11-byte Confirm with no negotiation data, then echo
    neg_failure   answer RDP_NEG_FAILURE (SSL_NOT_ALLOWED_BY_SERVER when SSL was asked, else
                  SSL_REQUIRED_BY_SERVER) and close, as Windows does
The default Confirm is NEG_RSP selecting SSL when the client offered it, else standard RDP; a client
that sent no RDP_NEG_REQ gets a Confirm without negotiation data (MS-RDPBCGR 3.3.5.3.2). A first
packet that does not parse is not answered: the connection is closed.

    python -m rdbroker_rdp.fakeserver --listen 127.0.0.1:3389 --mode echo [--delay-s 0.5]
runs one until SIGTERM or SIGINT and logs the address it bound (port 0 picks a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
import sys
from types import TracebackType
from typing import Final, Literal, get_args

from .confirm import SSL_NOT_ALLOWED_BY_SERVER, SSL_REQUIRED_BY_SERVER, build_connection_confirm
from .errors import X224Error
from .first_packet import FirstPacket, parse_first_packet
from .negotiation import PROTOCOL_RDP, PROTOCOL_SSL

log = logging.getLogger(__name__)

Mode = Literal["echo", "sink", "silent", "garbage", "reset", "slow", "bare_confirm", "neg_failure"]
MODES: Final = get_args(Mode)
GARBAGE: Final = b"SSH-2.0-OpenSSH_9.6\r\n"  # a plausible wrong service on port 3389
_CHUNK = 65536


class FakeRdpServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "echo", delay_s: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self.host = host
        self.mode = mode
        self.delay_s = delay_s
        self.port = port
        self.first_packets: list[bytes] = []  # raw bytes of each valid first packet, in arrival order
        self.accepted = 0  # connections accepted
        self.received = 0  # bytes read after the first packets (what echo sent back or sink dropped)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeRdpServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("fake RDP connection ended: %s", exc)
        except asyncio.CancelledError:
            # Only stop() cancels a handler. Ending the task normally matters: Python 3.11's
            # start_server callback calls task.exception() and logs an error for a cancelled task.
            if self._server is not None and self._server.is_serving():
                raise
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        read = await _read_first_packet(reader)
        if read is None:
            return
        packet, rest = read
        self.first_packets.append(packet.raw)
        if self.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        if self.mode != "silent":
            writer.write(self._answer(packet))
            await writer.drain()
        if self.mode == "neg_failure":
            return
        echo = self.mode in ("echo", "slow", "bare_confirm")
        data = rest
        while True:
            if data:
                self.received += len(data)
                if echo:
                    writer.write(data)
                    await writer.drain()  # stop reading while the client is slow
            data = await reader.read(_CHUNK)
            if not data:
                break
        if echo and writer.can_write_eof():
            writer.write_eof()  # half-close after the last echoed byte
            await writer.drain()

    def _answer(self, packet: FirstPacket) -> bytes:
        neg = packet.request.negotiation
        if self.mode == "garbage":
            return GARBAGE
        if self.mode == "neg_failure":
            ssl = neg is not None and neg.wants_ssl
            code = SSL_NOT_ALLOWED_BY_SERVER if ssl else SSL_REQUIRED_BY_SERVER
            return build_connection_confirm("neg_failure", failure_code=code)
        if self.mode == "bare_confirm" or neg is None:
            return build_connection_confirm("none")
        selected = PROTOCOL_SSL if neg.wants_ssl else PROTOCOL_RDP
        return build_connection_confirm("neg_rsp", selected_protocol=selected)


async def _read_first_packet(reader: asyncio.StreamReader) -> tuple[FirstPacket, bytes] | None:
    """The first packet and the bytes read past it; None when the client closes or sends garbage."""
    buf = bytearray()
    while True:
        try:
            packet = parse_first_packet(buf)
        except X224Error as exc:
            log.info("fake RDP server refused a first packet: %s", exc)
            return None
        if packet is not None:
            return packet, bytes(buf[packet.consumed :])
        data = await reader.read(_CHUNK)  # the parser's bounds cap how much is kept
        if not data:
            return None
        buf += data


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _run(host: str, port: int, mode: str, delay_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows has no add_signal_handler
            loop.add_signal_handler(sig, stop.set)
    async with FakeRdpServer(host, port, mode=mode, delay_s=delay_s) as server:
        log.info("fake RDP server listening on %s (mode %s)", server.address, mode)
        await stop.wait()
    log.info("fake RDP server stopped after %d connections", server.accepted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rdbroker_rdp.fakeserver", description="A fake RDP server."
    )
    parser.add_argument("--listen", type=_split_host_port, default=("127.0.0.1", 3389), help="HOST:PORT")
    parser.add_argument("--mode", choices=MODES, default="echo")
    parser.add_argument("--delay-s", type=float, default=0.0, help="answer delay in mode slow")
    args = parser.parse_args(argv)
    if args.delay_s < 0:
        parser.error("--delay-s must not be negative")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    host, port = args.listen
    asyncio.run(_run(host, port, args.mode, args.delay_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
