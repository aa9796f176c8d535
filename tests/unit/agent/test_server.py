"""The agent's HTTP endpoint served on 127.0.0.1:0, end to end with an HTTP client."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from rdbroker_agent.config import parse_config
from rdbroker_agent.errors import SourceError
from rdbroker_agent.server import AgentServer
from rdbroker_agent.sources import Session, SystemSources
from tests.unit.agent.fakes import FakeSources

CONFIG = parse_config(
    {
        "counters": [{"kind": "cpu", "weight": 3}, {"kind": "sessions", "full_scale": 10}],
        "max_sessions": 5,
    }
)


async def get(server: AgentServer, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        return await client.request(method, path)


async def test_load_and_sessions() -> None:
    users = [Session("alice", "active"), Session("bob", "disconnected")]
    async with AgentServer(CONFIG, FakeSources(cpu=40, users=users)) as server:
        assert server.port != 0
        load = await get(server, "/load")
        assert load.status_code == 200
        assert load.headers["content-type"].startswith("text/plain")
        assert load.text == "35\n"  # (3*40 + 1*20) / 4
        sessions = await get(server, "/sessions?x=1")
        assert sessions.status_code == 200
        assert sessions.headers["content-type"] == "application/json"
        # The default (psutil) source cannot show disconnected sessions, and says so.
        assert sessions.json() == {
            "omits_disconnected": True,
            "sessions": [
                {"user": "alice", "state": "active"},
                {"user": "bob", "state": "disconnected"},
            ],
        }


async def test_sessions_from_a_command_source() -> None:
    script = 'import json; print(json.dumps([{"user": "CORP\\\\zoë", "state": "Disc"}]))'
    config = parse_config(
        {
            "counters": [{"kind": "sessions", "full_scale": 4}],
            "sessions": {"source": "command", "command": [sys.executable, "-c", script]},
        }
    )
    async with AgentServer(config, SystemSources()) as server:
        assert (await get(server, "/sessions")).json() == {
            "omits_disconnected": False,  # quser and xrdp helpers list disconnected sessions
            "sessions": [{"user": "CORP\\zoë", "state": "disconnected"}],
        }
        assert (await get(server, "/load")).text == "25\n"


async def test_sessions_from_xrdp_desktops() -> None:
    config = parse_config(
        {"counters": [{"kind": "sessions", "full_scale": 4}], "sessions": {"source": "xrdp"}}
    )
    desktops = [Session("alice", "active"), Session("bob", "disconnected")]
    async with AgentServer(
        config, FakeSources(users=[Session("carol", "active")], desktops=desktops)
    ) as server:
        assert (await get(server, "/sessions")).json() == {
            "omits_disconnected": False,  # sesman's desktops are all there, connected or not
            "sessions": [{"user": "alice", "state": "active"}, {"user": "bob", "state": "disconnected"}],
        }
        assert (await get(server, "/load")).text == "50\n"


async def test_failed_session_source_is_503() -> None:
    async with AgentServer(CONFIG, FakeSources(users=SourceError("utmp unreadable"))) as server:
        response = await get(server, "/sessions")
        assert response.status_code == 503
        assert "utmp unreadable" in response.text


async def test_unknown_path_and_method() -> None:
    async with AgentServer(CONFIG, FakeSources()) as server:
        assert (await get(server, "/")).status_code == 404
        response = await get(server, "/load", method="POST")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"


async def raw(server: AgentServer, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bad_request_line() -> None:
    async with AgentServer(CONFIG, FakeSources()) as server:
        assert (await raw(server, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")


async def test_oversized_head_is_refused() -> None:
    async with AgentServer(CONFIG, FakeSources()) as server:
        reply = await raw(server, b"GET /load HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")


async def test_silent_client_is_closed_at_the_deadline() -> None:
    async with AgentServer(CONFIG, FakeSources(), request_timeout_s=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /lo")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("path", ["/load", "/sessions"])
async def test_many_requests_in_a_row(path: str) -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=0)) as server:
        for _ in range(20):
            assert (await get(server, path)).status_code == 200


async def test_unexpected_error_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=RuntimeError("bug"))) as server:
        response = await get(server, "/load")
        assert response.status_code == 500
        assert response.text == "internal error\n"
    assert "agent request failed" in caplog.text
