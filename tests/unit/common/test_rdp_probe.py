"""The RDP probe against FakeRdpServer in each mode: what proves the stack alive, what is a failure."""

from __future__ import annotations

import asyncio

import pytest

from rdbroker_common.rdp_probe import probe_rdp
from rdbroker_rdp import SSL_NOT_ALLOWED_BY_SERVER, parse_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.support.postgres import free_port


async def test_neg_rsp_proves_the_stack_alive_and_sends_no_cookie() -> None:
    async with FakeRdpServer(mode="sink") as server:
        result = await probe_rdp(server.address, 2.0)
        assert result.ok, result.reason
        assert (result.kind, result.selected_protocol) == ("neg_rsp", 1)  # SSL chosen from SSL|HYBRID
        assert result.detail == "neg_rsp protocol=1"
        await asyncio.sleep(0.05)
        assert server.received == 0  # nothing after the Connection Request: no TLS, no logon
    request = parse_connection_request(server.first_packets[0])
    assert request is not None
    assert request.cookie is None
    assert request.routing_token is None
    assert request.negotiation is not None
    assert request.negotiation.requested_protocols == 0x3


async def test_neg_failure_proves_the_stack_alive() -> None:
    async with FakeRdpServer(mode="neg_failure") as server:
        result = await probe_rdp(server.address, 2.0)
    assert result.ok
    assert (result.kind, result.failure_code) == ("neg_failure", SSL_NOT_ALLOWED_BY_SERVER)
    assert result.detail == f"neg_failure code={SSL_NOT_ALLOWED_BY_SERVER}"


async def test_bare_confirm_proves_the_stack_alive() -> None:
    async with FakeRdpServer(mode="bare_confirm") as server:
        result = await probe_rdp(server.address, 2.0)
    assert (result.ok, result.kind, result.detail) == (True, "confirm", "confirm")


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("garbage", "garbage"),
        ("silent", "timeout waiting for answer"),
        ("reset", "connection reset"),
    ],
)
async def test_failures(mode: str, reason: str) -> None:
    async with FakeRdpServer(mode=mode) as server:
        result = await probe_rdp(server.address, 0.3)
    assert not result.ok
    assert result.reason.startswith(reason), result.reason
    assert server.accepted == 1


async def test_slow_answer_past_the_timeout_fails_and_in_time_passes() -> None:
    async with FakeRdpServer(mode="slow", delay_s=0.5) as server:
        late = await probe_rdp(server.address, 0.2)
        on_time = await probe_rdp(server.address, 3.0)
    assert not late.ok
    assert late.reason == "timeout waiting for answer after 0.2s"
    assert on_time.ok
    assert on_time.latency_ms >= 500


async def test_nothing_listening_is_refused() -> None:
    result = await probe_rdp(f"127.0.0.1:{free_port()}", 1.0)
    assert (result.ok, result.reason) == (False, "connection refused")


async def test_bad_address_fails_without_raising() -> None:
    result = await probe_rdp("no-port-here", 1.0)
    assert not result.ok
    assert result.reason.startswith("bad address")


async def test_truncated_confirm_is_a_failure() -> None:
    async def half_confirm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(bytes.fromhex("030000130ed00000"))  # 8 of 19 bytes, then close
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half_confirm, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await probe_rdp(f"127.0.0.1:{port}", 1.0)
    assert (result.ok, result.reason) == (False, "truncated")
