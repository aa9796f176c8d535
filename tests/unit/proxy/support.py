"""Helpers for proxy tests: run a proxy in-process, speak the first packet as a client, count fds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from rdbroker_proxy.config import ProxySettings
from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp import build_connection_confirm, build_connection_request, parse_first_packet

CR = build_connection_request(cookie="alice", requested_protocols=3)
# What a client sends and an echoing fake server sends back for a logon: more than a pool's
# `junk_bytes` (2 KiB) from the server, so the broker keeps the session when the connection closes.
LOGON = bytes(range(256)) * 24
STEP_TIMEOUT_S = 10.0  # generous: a loaded 2-core machine; only a hang hits it


def settings(brokers: list[str], **overrides: Any) -> ProxySettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "grpc_listen": "127.0.0.1:0",
        "broker": ",".join(brokers),
        "proxy_id": "test-proxy",
        "first_packet_timeout_s": 1.0,
        "route_timeout_s": 3.0,
        "route_attempt_timeout_s": 1.0,
        "connect_timeout_s": 2.0,
        "shutdown_grace_s": 0.5,
        "heartbeat_interval_s": 60.0,
        "log_format": "text",
    }
    values.update(overrides)
    return ProxySettings(**values)


@contextlib.asynccontextmanager
async def running_proxy(brokers: list[str], **overrides: Any) -> AsyncIterator[ProxyServer]:
    proxy = ProxyServer(settings(brokers, **overrides))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(proxy.serve(stop))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await proxy.ready.wait()
        try:
            yield proxy
        finally:
            stop.set()


async def open_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await asyncio.open_connection("127.0.0.1", port)


async def handshake(
    port: int, packet: bytes = CR
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect through the proxy, send the first packet, answer the server's Connection Confirm."""
    reader, writer = await open_client(port)
    writer.write(packet)
    async with asyncio.timeout(STEP_TIMEOUT_S):
        header = await reader.readexactly(4)
        confirm = header + await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
    return reader, writer, confirm


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the peer closed (EOF or reset) before sending anything more."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            return await reader.read(65536) == b""
    except ConnectionResetError:
        return True


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pattern(n: int, seed: int) -> bytes:
    """n deterministic pseudo-random bytes: no block repeats, so the checksum of what arrives also
    catches chunks delivered out of order (a repeated block would hide a swap). ~0.3 s per 64 MiB."""
    return random.Random(seed).randbytes(n)


class BulkServer:
    """A terminal-server double for bulk tests: answers the Connection Confirm, hashes everything it
    reads until the client's EOF, and sends `send` bytes then half-closes: at once, or only after the
    client's EOF (`send_after_eof`, to prove the other direction still flows after a half-close)."""

    def __init__(self, send: bytes = b"", *, send_after_eof: bool = False) -> None:
        self.send = send
        self.send_after_eof = send_after_eof
        self.received = hashlib.sha256()
        self.received_bytes = 0
        self.done = asyncio.Event()
        self.first_packets: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> BulkServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            buf = b""
            while (first := parse_first_packet(buf)) is None:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buf += chunk
            self.first_packets.append(first.raw)
            writer.write(build_connection_confirm(kind="neg_rsp", selected_protocol=0))
            rest = buf[first.consumed :]
            self.received.update(rest)
            self.received_bytes += len(rest)
            async with asyncio.TaskGroup() as tg:
                if not self.send_after_eof:
                    tg.create_task(self._send(writer))
                while chunk := await reader.read(1 << 18):
                    self.received.update(chunk)
                    self.received_bytes += len(chunk)
            if self.send_after_eof:
                await self._send(writer)
        finally:
            self.done.set()
            await close(writer)

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        view = memoryview(self.send)
        for offset in range(0, len(view), 1 << 18):
            writer.write(view[offset : offset + (1 << 18)])
            await writer.drain()
        writer.write_eof()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Poll a condition the code under test offers no event for; bounded in time."""
    for _ in range(int(timeout_s / 0.02) + 1):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")
