"""FakeRdpServer in every mode, with a real client on 127.0.0.1, and its command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

from rdbroker_rdp import (
    PROTOCOL_HYBRID,
    PROTOCOL_RDP,
    PROTOCOL_SSL,
    SSL_NOT_ALLOWED_BY_SERVER,
    SSL_REQUIRED_BY_SERVER,
    ConnectionConfirm,
    X224Error,
    build_connection_request,
    build_preconnection,
    parse_connection_confirm,
)
from rdbroker_rdp.fakeserver import GARBAGE, FakeRdpServer
from tests.support.postgres import free_port

CR_SSL = build_connection_request(cookie="alice", requested_protocols=PROTOCOL_SSL | PROTOCOL_HYBRID)
CR_RDP = build_connection_request(cookie="bob", requested_protocols=PROTOCOL_RDP)
CR_BARE = build_connection_request()
STEP = 5.0  # bound on every await; tests never wait this long unless something is broken


@asynccontextmanager
async def client(server: FakeRdpServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), STEP)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def read_confirm(reader: asyncio.StreamReader, *, then: bytes = b"") -> ConnectionConfirm:
    """Read a Confirm and exactly `then` after it (the echo of bytes sent right behind the request)."""
    buf = b""
    async with asyncio.timeout(STEP):
        while (cc := parse_connection_confirm(buf)) is None or len(buf) < cc.consumed + len(then):
            data = await reader.read(64)
            assert data, "closed before a whole Confirm"
            buf += data
    assert buf[cc.consumed :] == then
    return cc


async def test_echo_answers_ssl_then_echoes_and_half_closes() -> None:
    async with FakeRdpServer() as server, client(server) as (reader, writer):
        assert server.address == f"127.0.0.1:{server.port}"
        writer.write(CR_SSL)
        cc = await read_confirm(reader)
        assert (cc.kind, cc.selected_protocol) == ("neg_rsp", PROTOCOL_SSL)
        writer.write(b"\x16\x03\x01hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), STEP) == b"\x16\x03\x01hello"  # then EOF
        assert server.first_packets == [CR_SSL]
        assert server.accepted == 1
        assert server.received == 8


async def test_rdp_only_request_gets_rdp_and_no_neg_req_gets_a_bare_confirm() -> None:
    async with FakeRdpServer() as server:
        async with client(server) as (reader, writer):
            writer.write(CR_RDP)
            cc = await read_confirm(reader)
            assert (cc.kind, cc.selected_protocol) == ("neg_rsp", PROTOCOL_RDP)
        async with client(server) as (reader, writer):
            writer.write(CR_BARE)
            assert (await read_confirm(reader)).kind == "none"
        assert server.accepted == 2


async def test_first_packet_dribbled_with_preconnection_and_trailing_bytes() -> None:
    first = build_preconnection(3, "TestVM") + CR_SSL
    async with FakeRdpServer() as server, client(server) as (reader, writer):
        for i in range(len(first)):
            writer.write(first[i : i + 1])
            await writer.drain()
        writer.write(b"more")
        cc = await read_confirm(reader, then=b"more")
        assert cc.kind == "neg_rsp"
        assert server.first_packets == [first]


async def test_sink_drops_later_bytes() -> None:
    async with FakeRdpServer(mode="sink") as server, client(server) as (reader, writer):
        writer.write(CR_SSL)
        await read_confirm(reader)
        writer.write(bytes(100_000))
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), STEP) == b""
        assert server.received == 100_000


async def test_silent_never_answers() -> None:
    async with FakeRdpServer(mode="silent") as server, client(server) as (reader, writer):
        writer.write(CR_SSL)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        assert server.first_packets == [CR_SSL]


async def test_garbage_is_not_a_confirm() -> None:
    async with FakeRdpServer(mode="garbage") as server, client(server) as (reader, writer):
        writer.write(CR_SSL)
        data = await asyncio.wait_for(reader.readexactly(len(GARBAGE)), STEP)
        with pytest.raises(X224Error):
            parse_connection_confirm(data)


async def test_reset_sends_rst() -> None:
    async with FakeRdpServer(mode="reset") as server, client(server) as (reader, writer):
        writer.write(CR_SSL)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), STEP)


async def test_slow_answers_after_the_delay() -> None:
    async with FakeRdpServer(mode="slow", delay_s=0.3) as server, client(server) as (reader, writer):
        started = time.monotonic()
        writer.write(CR_SSL)
        assert (await read_confirm(reader)).kind == "neg_rsp"
        assert time.monotonic() - started >= 0.3
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), STEP) == b"x"


async def test_bare_confirm_then_echo() -> None:
    async with FakeRdpServer(mode="bare_confirm") as server, client(server) as (reader, writer):
        writer.write(CR_SSL)
        cc = await read_confirm(reader)
        assert cc.kind == "none"
        assert len(cc.raw) == 11
        writer.write(b"ab")
        assert await asyncio.wait_for(reader.readexactly(2), STEP) == b"ab"


@pytest.mark.parametrize(
    ("request_bytes", "code"), [(CR_SSL, SSL_NOT_ALLOWED_BY_SERVER), (CR_RDP, SSL_REQUIRED_BY_SERVER)]
)
async def test_neg_failure_then_close(request_bytes: bytes, code: int) -> None:
    async with FakeRdpServer(mode="neg_failure") as server, client(server) as (reader, writer):
        writer.write(request_bytes)
        cc = await read_confirm(reader)
        assert (cc.kind, cc.failure_code) == ("neg_failure", code)
        assert await asyncio.wait_for(reader.read(), STEP) == b""


async def test_invalid_first_packet_is_closed_unanswered() -> None:
    async with FakeRdpServer() as server, client(server) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), STEP) == b""
        assert server.first_packets == []
        assert server.accepted == 1


async def test_stop_closes_open_connections() -> None:
    server = FakeRdpServer(mode="silent")
    await server.start()
    async with client(server) as (reader, writer):
        writer.write(CR_SSL[:5])
        await writer.drain()
        for _ in range(500):  # bounded: the server holds the connection, reading the rest
            if server.accepted:
                break
            await asyncio.sleep(0.01)
        assert server.accepted == 1
        await asyncio.wait_for(server.stop(), STEP)
        assert await asyncio.wait_for(reader.read(), STEP) == b""
    await server.stop()  # idempotent


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        FakeRdpServer(mode="chatty")
    with pytest.raises(ValueError, match="delay_s"):
        FakeRdpServer(delay_s=-1)


def test_command_line_runs_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdbroker_rdp.fakeserver", "--listen", f"127.0.0.1:{port}", "--mode", "echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()  # blocks until the server logs its address
        assert f"listening on 127.0.0.1:{port}" in line
        cc = asyncio.run(_one_confirm(port))
        assert (cc.kind, cc.selected_protocol) == ("neg_rsp", PROTOCOL_SSL)
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=STEP * 2)
        assert proc.returncode == 0
        assert out == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def _one_confirm(port: int) -> ConnectionConfirm:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), STEP)
    try:
        writer.write(CR_SSL)
        return await read_confirm(reader)
    finally:
        writer.close()
        await writer.wait_closed()


def test_command_line_rejects_a_bad_mode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_rdp.fakeserver", "--mode", "chatty"],
        capture_output=True,
        timeout=STEP * 2,
        check=False,
    )
    assert result.returncode == 2
    assert b"invalid choice" in result.stderr


def test_ipv6_address_is_bracketed() -> None:
    assert FakeRdpServer("::1", 3389).address == "[::1]:3389"
