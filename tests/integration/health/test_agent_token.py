"""The real rdbroker-agent with a token, probed by a real health replica reporting to the real broker
(a process on PostgreSQL): the replica sends the token; a refused token is an agent failure the broker
records with a clear detail, while the server's RDP health stays up and it keeps taking users."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from rdbroker_agent.auth import AgentAuth
from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from rdbroker_agent.sources import Session
from rdbroker_common.bearer import Tokens
from rdbroker_health import app
from rdbroker_health.probes.http import fetch_sessions, probe_agent
from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import Server, health_replica, real_broker, wait_for
from tests.unit.agent.fakes import FakeSources
from tests.unit.common.test_tls import Authority
from tests.unit.health.support import fast_settings

TOKEN = "integration-agent-token-01"
WRONG = "integration-wrong-token"  # another length than TOKEN: a rewrite within one mtime tick shows
UP = broker_pb2.HEALTH_STATE_UP
CONFIG = parse_config({"counters": [{"kind": "cpu"}]})
SET_TOKEN = "set RDBROKER_AGENT_TOKEN (or --agent-token-file) on the health replicas to the agent's token"


def replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def agent_with_token() -> AgentServer:
    sources = FakeSources(cpu=40, users=[Session("alice", "active")])
    return AgentServer(CONFIG, sources, auth=AgentAuth(tokens=Tokens(fixed=TOKEN)))


async def test_a_refused_token_is_a_visible_agent_failure_until_the_replica_has_the_right_one(
    pg_database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    health_token = tmp_path / "agent-token"
    health_token.write_text(WRONG + "\n")
    async with agent_with_token() as agent, FakeRdpServer(mode="sink") as s1:
        base = f"http://127.0.0.1:{agent.port}"
        server = Server(s1.address, agent_url=f"{base}/load", sessions_url=f"{base}/sessions")
        async with (
            real_broker(pg_database_url, [server], env={"RDBROKER_SESSIONS_INTERVAL_MS": "200"}) as broker,
            health_replica(broker.address, agent_token_file=str(health_token)),
        ):

            async def agent_detail_is(expected: str) -> bool:
                # What operators see (ListServers; REST and the CLI show the same field).
                return (await broker.servers())[s1.address].agent_detail == expected

            await wait_for(lambda: agent_detail_is(f"agent refused our token (401): {SET_TOKEN}"))
            seen = (await broker.servers())[s1.address]
            assert seen.health == UP  # the RDP probe decides health; the agent's refusal does not
            assert seen.load == -1
            assert await broker.column(s1.address, "agent_state") == "none"
            placed = await broker.route("bob")
            assert placed.server_address == s1.address  # still taking users
            assert agent.refusals.total > 0

            # The replica re-reads its token file: no restart.
            replace(health_token, TOKEN + "\n")
            await wait_for(lambda: agent_detail_is("load=40 state=up"))

            async def load_reported() -> bool:
                return (await broker.servers())[s1.address].load == 40

            await wait_for(load_reported)
            assert await broker.column(s1.address, "agent_state") == "up"

            async def alice_listed() -> bool:
                request = broker_pb2.LookupUserSessionsRequest(user="alice")
                sessions = (await broker.stub.LookupUserSessions(request, timeout=10)).sessions
                return any(s.server_address == s1.address and s.confirmed for s in sessions)

            await wait_for(alice_listed)  # the session list went through with the token too

            # An agent that does not answer at all reads differently from one that refuses us.
            await agent.stop()

            async def unreachable() -> bool:
                return (await broker.servers())[s1.address].agent_detail.startswith("connect failed")

            await wait_for(unreachable)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("rdbroker_health")
        and r.levelno >= logging.WARNING
        and "refused" in r.getMessage()
    ]
    # Once per agent URL (load, sessions) while it refuses, not at every probe; never the token itself.
    assert sorted(m.split(": ", 1)[0] for m in warned) == [
        f"agent of {s1.address} at {base}/load",
        f"agent of {s1.address} at {base}/sessions",
    ]
    assert TOKEN not in caplog.text
    assert WRONG not in caplog.text


async def test_a_replica_without_a_token_is_told_the_agent_wants_one(pg_database_url: str) -> None:
    async with agent_with_token() as agent, FakeRdpServer(mode="sink") as s1:
        server = Server(s1.address, agent_url=f"http://127.0.0.1:{agent.port}/load")
        async with real_broker(pg_database_url, [server]) as broker, health_replica(broker.address):

            async def told() -> bool:
                detail = (await broker.servers())[s1.address].agent_detail
                return detail == f"agent requires a token (401): {SET_TOKEN}"

            await wait_for(told)
            assert (await broker.servers())[s1.address].health == UP


async def test_a_replica_with_a_client_certificate_probes_an_agent_that_requires_one(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "rdbroker")
    served = ca.issue("agent", server=True)
    config = parse_config(
        {
            "counters": [{"kind": "cpu"}],
            "tls_cert": str(served.cert),
            "tls_key": str(served.key),
            "tls_ca": str(ca.ca_path),
        }
    )
    replica_cert = ca.issue("health", server=False)
    agent = AgentServer(config, FakeSources(cpu=40, users=[Session("alice", "active")]))
    async with agent:
        url = f"https://127.0.0.1:{agent.port}"
        with_cert = fast_settings(
            "127.0.0.1:1",
            agent_tls_ca=str(ca.ca_path),
            agent_tls_cert=str(replica_cert.cert),
            agent_tls_key=str(replica_cert.key),
        )
        without_cert = fast_settings("127.0.0.1:1", agent_tls_ca=str(ca.ca_path))
        for settings, expected in [(with_cert, "load=40 state=up"), (without_cert, None)]:
            files = app.agent_tls(settings)
            assert files is not None
            async with app.agent_client(files.context) as client:
                result = await probe_agent(client, f"{url}/load", 5.0)
                sessions = await fetch_sessions(client, f"{url}/sessions", 5.0)
            if expected is not None:
                assert (result.ok, result.detail) == (True, expected)
                assert [s.user for s in sessions.sessions] == ["alice"]
            else:
                # The handshake fails: no HTTP answer, so not a token refusal either.
                assert not result.ok
                assert not result.refused
                assert not sessions.ok
                assert result.detail == (
                    "ReadError: the agent closed the connection without an answer "
                    "(over HTTPS: does it require a client certificate? --agent-tls-cert/--agent-tls-key)"
                )
