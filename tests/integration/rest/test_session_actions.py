"""`POST /v1/sessions/{id}/logoff|disconnect|message` on a real PostgreSQL, carried out by a fake agent on
127.0.0.1 (the real agent's HTTP server over fake Windows commands): what the agent is sent, what the
directory and the audit trail say afterwards, and each error with its reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_agent.actions import WindowsActions
from rdbroker_agent.auth import AgentAuth
from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from rdbroker_broker import callers
from rdbroker_broker import domain as d
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_common.bearer import Tokens
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, place, settings_for
from tests.support.audit import audit_lines, audit_rows, fields
from tests.support.postgres import free_port
from tests.unit.agent.fakes import FakeSources
from tests.unit.common.test_tls import Authority

A, B, _ = SERVERS
AGENT_TOKEN = "agent-token-for-broker-tests"
QUSER = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
 alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
"""
ADMIN_FROM_TEST = ("token:admin", "127.0.0.1")


@pytest.fixture
def sources() -> FakeSources:
    return FakeSources(
        outputs={
            ("quser",): QUSER,
            ("logoff", "2"): "",
            ("tsdiscon", "2"): "",
            ("msg", "2", "Back in 5 minutes"): "",
        }
    )


@pytest.fixture
async def agent(sources: FakeSources) -> AsyncIterator[AgentServer]:
    config = parse_config({"counters": [{"kind": "cpu"}]})
    auth = AgentAuth(tokens=Tokens(fixed=AGENT_TOKEN))
    async with AgentServer(config, sources, auth=auth, actions=WindowsActions(sources.run, 5.0)) as server:
        yield server


def broker(engine: AsyncEngine, url: str, **settings: Any) -> httpx.AsyncClient:
    values = {"agent_token": SecretStr(AGENT_TOKEN), **settings}
    service = BrokerService(Store(engine), settings_for(url, **values))
    transport = httpx.ASGITransport(app=create_app(service))
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers)


@pytest.fixture
async def client(engine: AsyncEngine, pg_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with broker(engine, pg_database_url) as http:
        yield http


async def alice_on_a(engine: AsyncEngine, url: str, sessions_url: str) -> str:
    """alice's live session on A, whose agent answers at `sessions_url` ("" for none)."""
    service = BrokerService(Store(engine), settings_for(url))
    async with broker(engine, url) as http:
        assert (await http.patch(f"/v1/servers/{A}", json={"sessions_url": sessions_url})).status_code == 200
        assert (await http.post(f"/v1/servers/{B}/maintenance")).status_code == 200
    with callers.use_caller(callers.Caller("test-setup")):
        decision = await place(service, "CORP\\alice", "c1")
    assert decision.server_address == A
    return decision.session_id


def agent_url(agent: AgentServer) -> str:
    return f"http://127.0.0.1:{agent.port}/sessions"


async def test_logoff_through_the_agent_ends_the_session_and_is_audited(
    client, agent, sources, engine, pg_database_url, caplog
):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    caplog.clear()
    answer = await client.post(f"/v1/sessions/{session_id}/logoff")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["action"] == "logoff"
    assert (body["server_address"], body["server_user"], body["server_sessions"]) == (A, "alice", ["2"])
    assert body["detail"] == "logged off session 2"
    # The directory says so at once, as the agent's next list would.
    assert (body["session"]["state"], body["session"]["end_reason"]) == ("ended", "logged_off")
    assert sources.runs == [("quser",), ("logoff", "2")]  # the agent found alice's session by her name

    [line] = audit_lines(caplog)
    assert fields(line) == ("session.logoff", session_id, *ADMIN_FROM_TEST, "ok")
    assert line["detail"] == f"on {A} (pool default): logged off session 2"
    [row] = await audit_rows(engine, action="session.logoff")
    assert fields(row) == fields(line)
    assert row["detail"] == f"on {A} (pool default): logged off session 2; user CORP\\alice"

    again = await client.post(f"/v1/sessions/{session_id}/logoff")
    assert again.status_code == 409
    assert again.json()["detail"] == f"session {session_id} is ended (logged_off): there is nothing to logoff"


async def test_disconnect_and_message_leave_the_session_live(client, agent, sources, engine, pg_database_url):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    disconnected = await client.post(f"/v1/sessions/{session_id}/disconnect")
    assert disconnected.status_code == 200, disconnected.text
    assert (
        disconnected.json()["session"]["state"] == "pending"
    )  # the proxy and the agent's list tell the rest
    sent = await client.post(f"/v1/sessions/{session_id}/message", json={"text": "Back in 5 minutes"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["detail"] == "sent a message to session 2"
    assert sources.runs[-1] == ("msg", "2", "Back in 5 minutes")
    [row] = await audit_rows(engine, action="session.message")
    assert row["detail"].endswith("user CORP\\alice, text 'Back in 5 minutes'")  # the text in the row only
    assert [r["outcome"] for r in await audit_rows(engine, action="session.disconnect")] == ["ok"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (None, "body: Field required"),
        ({}, "body.text: Field required"),
        ({"text": ""}, "body.text: String should have at least 1 character"),
        ({"text": "x" * 501}, "body.text: String should have at most 500 characters"),
        ({"text": "two\nlines"}, "body.text: String should match pattern"),
        ({"text": "hi", "to": "all"}, "body.to: Extra inputs are not permitted"),
    ],
)
async def test_a_bad_message_is_refused_before_the_agent_is_asked(
    client, agent, sources, engine, pg_database_url, caplog, body, says
):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    caplog.clear()
    answer = await client.post(f"/v1/sessions/{session_id}/message", json=body)
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith(says)
    assert sources.runs == []
    [line] = audit_lines(caplog)
    assert fields(line) == ("session.message", session_id, *ADMIN_FROM_TEST, "invalid")


async def test_errors_before_the_agent(client, engine, pg_database_url, caplog):
    unknown = await client.post("/v1/sessions/no-such-session/logoff")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "unknown session 'no-such-session'"

    session_id = await alice_on_a(engine, pg_database_url, "")
    caplog.clear()
    no_agent = await client.post(f"/v1/sessions/{session_id}/disconnect")
    assert no_agent.status_code == 409
    detail = no_agent.json()["detail"]
    assert detail.startswith(f"server {A} has no sessions_url, so no agent to act through: set it")
    assert f"rdbroker servers set {A} --sessions-url http://<server>:8088/sessions" in detail
    [line] = audit_lines(caplog)
    assert fields(line) == ("session.disconnect", session_id, *ADMIN_FROM_TEST, "conflict")

    assert (
        await client.patch(f"/v1/servers/{A}", json={"sessions_url": "http://10.0.0.11:9/users"})
    ).is_success
    elsewhere = await client.post(f"/v1/sessions/{session_id}/logoff")
    assert elsewhere.status_code == 409
    assert "is not an rdbroker-agent's /sessions" in elsewhere.json()["detail"]
    assert await audit_rows(engine, action="session.logoff") == []


async def test_the_read_token_cannot_act(engine, pg_database_url, agent, sources):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    async with broker(engine, pg_database_url) as http:
        http.headers["Authorization"] = f"Bearer {READ}"
        assert (await http.post(f"/v1/sessions/{session_id}/logoff")).status_code == 403
    assert sources.runs == []


async def test_the_agent_cannot(client, agent, sources, engine, pg_database_url, caplog):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    sources.outputs[("quser",)] = QUSER.replace("Active", "Disc  ").replace("rdp-tcp#3", "         ")
    caplog.clear()
    answer = await client.post(f"/v1/sessions/{session_id}/disconnect")
    assert answer.status_code == 502
    assert answer.json()["title"] == "Agent failed"
    assert answer.json()["detail"] == (
        f"the agent at {agent_url(agent)}/disconnect answered 409: "
        "cannot disconnect: alice's session is disconnected (nothing to do)"
    )
    [line] = audit_lines(caplog)
    assert fields(line) == ("session.disconnect", session_id, *ADMIN_FROM_TEST, "agent_failed")
    assert await audit_rows(engine, action="session.disconnect") == []
    # Nothing was done, so the directory keeps the session.
    state = (await client.get("/v1/sessions", params={"user": "CORP\\alice"})).json()["items"]
    assert [s["id"] for s in state] == [session_id]


async def test_the_agent_refuses_our_token(engine, pg_database_url, agent, sources):
    session_id = await alice_on_a(engine, pg_database_url, agent_url(agent))
    async with broker(engine, pg_database_url, agent_token=SecretStr("not-the-agents-token")) as http:
        answer = await http.post(f"/v1/sessions/{session_id}/logoff")
    assert answer.status_code == 502
    assert answer.json()["detail"] == (
        f"the agent at {agent_url(agent)}/logoff refused our credentials (401): set RDBROKER_AGENT_TOKEN "
        "(or --agent-token-file) on the brokers to the agent's token"
    )
    assert sources.runs == []


async def test_the_agent_is_unreachable(client, engine, pg_database_url):
    url = f"http://127.0.0.1:{free_port()}/sessions"  # nothing listens there
    session_id = await alice_on_a(engine, pg_database_url, url)
    answer = await client.post(f"/v1/sessions/{session_id}/logoff")
    assert answer.status_code == 502
    assert answer.json()["detail"].startswith(f"the agent at {url}/logoff is unreachable: ConnectError")


async def test_the_agent_does_not_answer_in_time(engine, pg_database_url, caplog):
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            await done.wait()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/sessions"
        session_id = await alice_on_a(engine, pg_database_url, url)
        caplog.clear()
        async with broker(engine, pg_database_url, agent_action_timeout_s=0.5) as http:
            answer = await http.post(f"/v1/sessions/{session_id}/logoff")
    finally:
        done.set()
        server.close()
        await server.wait_closed()
    assert answer.status_code == 504
    assert answer.json()["title"] == "Agent timeout"
    assert answer.json()["detail"] == f"the agent at {url}/logoff did not answer within 0.5 s"
    [line] = audit_lines(caplog)
    assert fields(line)[-1] == "agent_failed"


async def test_a_session_without_a_user_name(client, agent, engine, pg_database_url):
    await alice_on_a(engine, pg_database_url, agent_url(agent))
    service = BrokerService(Store(engine), settings_for(pg_database_url))
    nameless = await service.route(d.RouteRequest(connection_id="c2", proxy_id="p1"))
    answer = await client.post(f"/v1/sessions/{nameless.session_id}/logoff")
    assert answer.status_code == 409
    assert "has no user name (its client sent none)" in answer.json()["detail"]


async def test_an_https_agent_that_requires_the_brokers_client_certificate(
    engine, pg_database_url, sources, tmp_path
):
    # The broker's agent_tls_* settings, as the health replicas': trust the agent's CA, present a certificate.
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
    client_cert = ca.issue("broker", server=False)
    async with AgentServer(config, sources, actions=WindowsActions(sources.run, 5.0)) as agent:
        url = f"https://127.0.0.1:{agent.port}/sessions"
        session_id = await alice_on_a(engine, pg_database_url, url)
        trusting = {"agent_tls_ca": str(ca.ca_path)}
        async with broker(engine, pg_database_url, **trusting) as http:
            refused = await http.post(f"/v1/sessions/{session_id}/disconnect")
        assert refused.status_code == 502
        assert refused.json()["detail"].startswith(f"the agent at {url}/disconnect is unreachable: ")
        certified = trusting | {
            "agent_tls_cert": str(client_cert.cert),
            "agent_tls_key": str(client_cert.key),
        }
        async with broker(engine, pg_database_url, **certified) as http:
            done = await http.post(f"/v1/sessions/{session_id}/disconnect")
        assert done.status_code == 200, done.text
    assert sources.runs == [("quser",), ("tsdiscon", "2")]


def test_unusable_agent_settings_stop_the_rest_app(engine, pg_database_url, tmp_path):
    service = BrokerService(
        Store(engine), settings_for(pg_database_url, agent_token_file=str(tmp_path / "missing"))
    )
    with pytest.raises(ValueError, match="missing"):
        create_app(service)
