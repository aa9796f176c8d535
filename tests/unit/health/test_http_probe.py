"""The agent and session-list probes over HTTP: MockTransport for the cases, one real server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from rdbroker_health.probes.http import MAX_AGENT_BODY, AgentState, fetch_sessions, probe_agent


def client_answering(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_agent_load_from_the_body() -> None:
    async with client_answering(lambda request: httpx.Response(200, text="35\n")) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0)
    assert result.ok
    assert (result.load, result.state) == (35, AgentState.UP)


async def test_agent_haproxy_words() -> None:
    async with client_answering(lambda request: httpx.Response(200, text="75%,drain")) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0)
    assert (result.ok, result.load, result.state) == (True, 25, AgentState.DRAIN)


@pytest.mark.parametrize("status", [500, 404, 302])
async def test_agent_http_errors_fail(status: int) -> None:
    async with client_answering(lambda request: httpx.Response(status, text="50")) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0)
    assert not result.ok
    assert result.detail == f"http {status}"


async def test_agent_timeout_and_connection_errors_fail() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_answering(timeout) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 0.5)
    assert (result.ok, result.detail) == (False, "timeout after 0.5s")
    async with client_answering(refused) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 0.5)
    assert not result.ok
    assert result.detail.startswith("connect failed")


async def test_agent_bad_body_and_oversized_body_fail() -> None:
    async with client_answering(lambda request: httpx.Response(200, text="busy")) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0)
    assert not result.ok
    assert "unknown agent word" in result.detail
    too_long = "1" * (MAX_AGENT_BODY + 1)
    async with client_answering(lambda request: httpx.Response(200, text=too_long)) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0)
    assert not result.ok
    assert "longer than" in result.detail


async def test_agent_bad_url_fails() -> None:
    async with httpx.AsyncClient() as client:
        result = await probe_agent(client, "ftp://ts1/load", 1.0)
        assert not result.ok
        assert result.detail.startswith("bad url")
        result = await probe_agent(client, "not a url", 1.0)
        assert not result.ok


async def test_sessions_fetch() -> None:
    body = b'[{"user": "alice", "state": "disconnected"}]'
    async with client_answering(lambda request: httpx.Response(200, content=body)) as client:
        result = await fetch_sessions(client, "http://ts1:8088/sessions", 1.0)
    assert result.ok
    assert [(s.user, s.disconnected) for s in result.sessions] == [("alice", True)]
    async with client_answering(lambda request: httpx.Response(500)) as client:
        result = await fetch_sessions(client, "http://ts1:8088/sessions", 1.0)
    assert (result.ok, result.detail) == (False, "http 500")


# One real HTTP server on loopback -----------------------------------------------------------


class TinyHttpServer:
    """Answers each request with the next configured body, or never answers when the body is None."""

    def __init__(self) -> None:
        self.body: bytes | None = b"20"
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            if self.body is None:
                await reader.read()  # hold the connection until the client gives up
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(self.body)}\r\n\r\n".encode()
                + self.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/load"


@pytest.fixture
async def http_server() -> AsyncIterator[TinyHttpServer]:
    tiny = TinyHttpServer()
    tiny.server = await asyncio.start_server(tiny.handle, "127.0.0.1", 0)
    try:
        yield tiny
    finally:
        tiny.server.close()
        await tiny.server.wait_closed()


async def test_real_server_load_and_silence(http_server: TinyHttpServer) -> None:
    async with httpx.AsyncClient() as client:
        result = await probe_agent(client, http_server.url, 2.0)
        assert (result.ok, result.load) == (True, 20)
        http_server.body = b"drain"
        result = await probe_agent(client, http_server.url, 2.0)
        assert (result.ok, result.state) == (True, AgentState.DRAIN)
        http_server.body = None
        result = await probe_agent(client, http_server.url, 0.3)
        assert not result.ok
        assert result.detail.startswith("timeout")
    assert http_server.requests == 3


async def test_real_server_gone_is_a_connect_failure(http_server: TinyHttpServer) -> None:
    url = http_server.url
    assert http_server.server is not None
    http_server.server.close()
    await http_server.server.wait_closed()
    async with httpx.AsyncClient() as client:
        result = await probe_agent(client, url, 1.0)
    assert not result.ok
    assert result.detail.startswith("connect failed")


SET_TOKEN = "set RDBROKER_AGENT_TOKEN (or --agent-token-file) on the health replicas to the agent's token"


@pytest.mark.parametrize("status", [401, 403])
async def test_an_agent_refusing_us_is_a_refused_probe_saying_what_to_set(status: int) -> None:
    sent: list[str | None] = []

    def agent(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(status, text="50")

    async with client_answering(agent) as client:
        with_token = await probe_agent(client, "http://ts1:8088/load", 1.0, "Bearer our-token")
        without = await probe_agent(client, "http://ts1:8088/load", 1.0)
        sessions = await fetch_sessions(client, "http://ts1:8088/sessions", 1.0, "Bearer our-token")
    assert sent == ["Bearer our-token", None, "Bearer our-token"]
    assert (with_token.ok, with_token.refused, with_token.load) == (False, True, None)
    assert with_token.detail == f"agent refused our token ({status}): {SET_TOKEN}"
    assert without.detail == f"agent requires a token ({status}): {SET_TOKEN}"
    assert (sessions.ok, sessions.refused, sessions.detail) == (False, True, with_token.detail)


async def test_other_failures_are_not_refusals() -> None:
    async with client_answering(lambda request: httpx.Response(404)) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0, "Bearer our-token")
    assert (result.ok, result.refused, result.detail) == (False, False, "http 404")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_answering(refused) as client:
        result = await probe_agent(client, "http://ts1:8088/load", 1.0, "Bearer our-token")
    assert not result.refused
    assert result.detail.startswith("connect failed")
