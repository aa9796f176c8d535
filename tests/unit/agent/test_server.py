"""The agent's HTTP endpoint (Starlette on uvicorn) served on 127.0.0.1:0, end to end with an HTTP
client, and what bad or slow input gets."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import httpx
import pytest

from rdbroker_agent.config import parse_config
from rdbroker_agent.errors import SourceError
from rdbroker_agent.protocol import MAX_HEAD
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
        missing = await get(server, "/")
        assert missing.status_code == 404
        assert (
            missing.text
            == "not found: try /load, /sessions, /sessions/logoff|disconnect|message or /healthz\n"
        )
        response = await get(server, "/load", method="POST")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert response.text == "only GET (or HEAD)\n"


async def test_healthz_answers_ok() -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=RuntimeError("counters are not read"))) as server:
        response = await get(server, "/healthz")
        assert (response.status_code, response.text) == (200, "ok\n")
        assert response.headers["cache-control"] == "no-store"


async def raw(server: AgentServer, data: bytes) -> bytes:
    """What the server sends back to `data` until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"hello\r\n\r\n",  # no request line
        b"GET /load HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /load HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
    ],
)
async def test_bad_request_is_400_and_closed(request_bytes: bytes) -> None:
    async with AgentServer(CONFIG, FakeSources()) as server:
        reply = await raw(server, request_bytes)  # returns once the server has closed
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert reply.endswith(b"Invalid HTTP request received.")


@pytest.mark.parametrize("burst", [True, False])
async def test_oversized_head_is_431_and_closed(burst: bool) -> None:
    head = b"GET /load HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    async with AgentServer(CONFIG, FakeSources(cpu=7)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            # In one write, or a byte short of the limit and then the rest: refused either way.
            for part in [head] if burst else [head[: MAX_HEAD - 1], head[MAX_HEAD - 1 :]]:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)  # let the server read each part on its own
            reply = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            pytest.fail("the server reset the connection instead of answering")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert reply.endswith(f"\r\n\r\nrequest head longer than {MAX_HEAD} bytes\n".encode())


async def test_a_head_just_under_the_limit_is_served() -> None:
    start = b"GET /load HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: "
    head = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    async with AgentServer(CONFIG, FakeSources(cpu=7)) as server:
        reply = await raw(server, head)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert reply.endswith(b"\r\n\r\n5\n")  # (3*7 + 1*0) / 4, rounded


async def test_silent_client_is_closed_at_the_deadline() -> None:
    async with AgentServer(CONFIG, FakeSources(), request_timeout_s=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /lo")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


async def test_a_slow_second_request_on_a_kept_connection_is_closed_at_the_deadline() -> None:
    async with AgentServer(CONFIG, FakeSources(), request_timeout_s=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /load HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"0\n"
        writer.write(b"GET /lo")  # the next head, never finished: keep-alive's idle timer is off now
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
