"""Drain until empty (`POST /v1/servers/{address}/drain` with a body, drains.py) on a real PostgreSQL,
with the sessions' server's agent a real agent HTTP server on 127.0.0.1 over fake Windows commands.
The broker's clock is in the test's hand: each pass of the drainer is run by the test, so every step
is seen (messaged, waiting, the logoff of a disconnected session once due, maintenance when empty)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_agent.actions import WindowsActions
from rdbroker_agent.auth import AgentAuth
from rdbroker_agent.config import parse_config
from rdbroker_agent.errors import SourceError
from rdbroker_agent.server import AgentServer
from rdbroker_broker import callers
from rdbroker_broker.agents import AgentCaller
from rdbroker_broker.db.drain_repository import DrainRepository
from rdbroker_broker.drains import Drainer
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_common.bearer import Tokens
from tests.integration.rest.conftest import ADMIN, SERVERS, place, settings_for
from tests.support.audit import audit_lines, audit_rows, fields
from tests.unit.agent.fakes import FakeSources

A, B, _ = SERVERS
AGENT_TOKEN = "agent-token-for-drain-tests"
TEXT = "This server restarts at 18:00: please save your work."
QUSER = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
 alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
 bob                                       3  Disc            5  11/27/2026 9:05 AM
"""
INTERVAL_S = 5.0
RETRY_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def sources() -> FakeSources:
    return FakeSources(outputs={("quser",): QUSER, ("msg", "2", TEXT): "", ("logoff", "3"): ""})


@pytest.fixture
async def agent(sources: FakeSources) -> AsyncIterator[AgentServer]:
    config = parse_config({"counters": [{"kind": "cpu"}]})
    auth = AgentAuth(tokens=Tokens(fixed=AGENT_TOKEN))
    async with AgentServer(config, sources, auth=auth, actions=WindowsActions(sources.run, 5.0)) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(engine: AsyncEngine, pg_database_url: str, clock: Clock) -> BrokerService:
    settings = settings_for(
        pg_database_url,
        agent_token=SecretStr(AGENT_TOKEN),
        drain_interval_s=INTERVAL_S,
        drain_retry_s=RETRY_S,
    )
    return BrokerService(Store(engine), settings, clock=clock)


@pytest.fixture
async def client(service: BrokerService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as http:
        yield http


@pytest.fixture
def drainer(service: BrokerService) -> Drainer:
    return Drainer(service, AgentCaller.from_settings(service.settings), owner="test-replica")


async def users_on_a(service: BrokerService, client: httpx.AsyncClient, agent: AgentServer) -> dict[str, str]:
    """alice active and bob disconnected (since the clock's now) on A, whose agent is `agent`."""
    url = f"http://127.0.0.1:{agent.port}/sessions"
    assert (await client.patch(f"/v1/servers/{A}", json={"sessions_url": url})).status_code == 200
    assert (await client.post(f"/v1/servers/{B}/maintenance")).status_code == 200
    ids = {}
    with callers.use_caller(callers.Caller("test-setup")):
        for n, user in enumerate(("CORP\\alice", "CORP\\bob")):
            decision = await place(service, user, f"c{n}")
            assert decision.server_address == A
            await service.connection_opened(decision.session_id, f"c{n}", "p1")
            ids[user.split("\\")[1]] = decision.session_id
        await service.connection_closed(ids["bob"], "c1", bytes_from_server=100_000)
    return ids


async def drain_of(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get(f"/v1/servers/{A}/drain")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def progress(drain: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("step", "sessions_left", "active", "disconnected", "messaged", "logged_off", "errors")
    return tuple(drain[k] for k in keys)


async def test_a_drain_runs_until_the_server_is_empty(
    client, service, drainer, agent, sources, clock, engine, caplog
):
    ids = await users_on_a(service, client, agent)
    bob_gone_at = clock.now
    caplog.clear()
    body = {"notify": TEXT, "logoff_disconnected_after_s": 1800, "then": "maintenance"}
    started = await client.post(f"/v1/servers/{A}/drain", json=body)
    assert started.status_code == 200, started.text
    server = started.json()
    assert (server["admin_state"], server["routable"]) == ("draining", False)
    assert progress(server["drain"]) == ("starting", 2, 0, 0, 0, 0, 0)
    assert (server["drain"]["started_by"], server["drain"]["notify"]) == ("token:admin", TEXT)
    [line] = audit_lines(caplog)
    assert fields(line) == ("server.drain", A, "token:admin", "127.0.0.1", "ok")
    assert line["detail"] == (
        "admin_state enabled -> draining, until empty: message users, "
        "log off sessions disconnected for 1800 s, then maintenance"
    )

    # Pass 1: alice (active) is sent the message; bob (disconnected) is not due for 30 minutes.
    [drain] = await drainer.advance_due()
    assert sources.runs == [("quser",), ("msg", "2", TEXT)]
    now = await drain_of(client)
    assert progress(now) == ("waiting", 2, 1, 1, 1, 0, 0)
    assert now["detail"] == "2 sessions left: 1 active, 1 disconnected"
    assert now["next_logoff_at"] == (bob_gone_at + timedelta(seconds=1800)).isoformat().replace("+00:00", "Z")

    # Nothing is due before the interval; later passes do not message alice again.
    assert await drainer.advance_due() == []
    clock.advance(INTERVAL_S)
    [drain] = await drainer.advance_due()
    assert drain.messaged == 1
    assert sources.runs == [("quser",), ("msg", "2", TEXT)]

    # 30 minutes after bob disconnected, his session is logged off through the agent.
    clock.advance(1800)
    [drain] = await drainer.advance_due()
    assert sources.runs[-2:] == [("quser",), ("logoff", "3")]
    assert progress(await drain_of(client)) == ("waiting", 1, 1, 0, 1, 1, 0)
    gone = await client.get(f"/v1/sessions?server={A}&state=ended")
    assert [(s["id"], s["end_reason"]) for s in gone.json()["items"]] == [(ids["bob"], "logged_off")]

    # alice logs off herself: at the next pass the server holds nothing and goes to maintenance.
    await service.end_session(ids["alice"], "logged_off")
    clock.advance(INTERVAL_S)
    [drain] = await drainer.advance_due()
    server = (await client.get(f"/v1/servers/{A}")).json()
    assert server["admin_state"] == "maintenance"
    assert progress(server["drain"]) == ("done", 0, 0, 0, 1, 1, 0)
    assert server["drain"]["running"] is False
    assert server["drain"]["detail"] == f"no sessions left: {A} is now maintenance"
    assert await drainer.advance_due() == []

    rows = await audit_rows(engine)
    ours = ("server.drain", "session.message", "session.logoff", "server.drain_done")
    drained = [(r["action"], r["actor"]) for r in rows if r["action"] in ours]
    drainer_actor = "drain:token:admin"
    assert drained == [
        ("server.drain", "token:admin"),
        ("session.message", drainer_actor),
        ("session.logoff", drainer_actor),
        ("server.drain_done", drainer_actor),
    ]
    assert rows[-1]["detail"] == "admin_state draining -> maintenance; messaged 1, logged off 1, errors 0"


async def test_then_draining_keeps_the_server_draining_and_a_drain_without_options_ends_at_once(
    client, service, drainer, agent, engine
):
    started = await client.post(f"/v1/servers/{B}/drain", json={"then": "draining"})
    assert started.json()["drain"]["step"] == "starting"
    [drain] = await drainer.advance_due()
    assert drain.step.value == "done"
    server = (await client.get(f"/v1/servers/{B}")).json()
    assert (server["admin_state"], server["drain"]["detail"]) == (
        "draining",
        f"no sessions left: {B} is now draining",
    )
    # A plain drain (no body) is what it always was: draining, no drain until empty.
    plain = await client.post(f"/v1/servers/{A}/drain")
    assert (plain.json()["admin_state"], plain.json()["drain"]) == ("draining", None)
    assert (await client.get(f"/v1/servers/{A}/drain")).status_code == 404


async def test_an_agent_that_fails_is_tried_again_and_the_server_is_kept(
    client, service, drainer, agent, sources, clock
):
    await users_on_a(service, client, agent)
    sources.outputs[("msg", "2", TEXT)] = SourceError("msg.exe: the RPC server is unavailable")
    await client.post(f"/v1/servers/{A}/drain", json={"notify": TEXT})
    assert len(await drainer.advance_due()) == 1
    now = await drain_of(client)
    assert progress(now) == ("messaging", 2, 1, 1, 0, 0, 1)
    assert now["last_error"].startswith(
        f"message of {(await users_of(client))['alice']} (CORP\\alice): the agent at"
    )
    assert "cannot message session 2: msg.exe: the RPC server is unavailable" in now["last_error"]
    assert now["running"] is True

    # Not again before the retry time, whatever the passes in between.
    clock.advance(INTERVAL_S)
    await drainer.advance_due()
    assert sources.runs.count(("msg", "2", TEXT)) == 1
    # The agent works again: the message goes out on the retry, the error stays counted.
    sources.outputs[("msg", "2", TEXT)] = ""
    clock.advance(RETRY_S)
    await drainer.advance_due()
    assert sources.runs.count(("msg", "2", TEXT)) == 2
    assert progress(await drain_of(client)) == ("waiting", 2, 1, 1, 1, 0, 1)

    # An agent that cannot be reached at all: the drain goes on, the server stays draining.
    await agent.stop()
    clock.advance(INTERVAL_S)
    await drainer.advance_due()
    server = (await client.get(f"/v1/servers/{A}")).json()
    assert (server["admin_state"], server["drain"]["step"]) == ("draining", "waiting")


async def users_of(client: httpx.AsyncClient) -> dict[str, str]:
    page = (await client.get(f"/v1/sessions?server={A}")).json()
    return {s["user"].split("\\")[1]: s["id"] for s in page["items"]}


async def test_cancel_and_operator_state_changes_end_the_drain(
    client, service, drainer, agent, clock, caplog
):
    await users_on_a(service, client, agent)
    await client.post(f"/v1/servers/{A}/drain", json={"notify": TEXT})
    again = await client.post(f"/v1/servers/{A}/drain", json={"notify": TEXT})
    assert again.status_code == 409
    assert again.json()["detail"].startswith(
        f"a drain of {A} is under way (started 2026-12-07 09:00:00 UTC by"
    )
    caplog.clear()
    cancelled = await client.delete(f"/v1/servers/{A}/drain")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["step"], cancelled.json()["detail"]) == ("cancelled", "cancelled by token:admin")
    [line] = audit_lines(caplog)
    assert fields(line) == ("server.drain_cancel", A, "token:admin", "127.0.0.1", "ok")
    assert (await client.get(f"/v1/servers/{A}")).json()["admin_state"] == "draining"
    assert await drainer.advance_due() == []
    nothing = await client.delete(f"/v1/servers/{A}/drain")
    assert (nothing.status_code, nothing.json()["detail"]) == (409, f"no drain of {A} is under way")

    # Enabling the server while a drain runs ends the drain at its next pass.
    assert (await client.post(f"/v1/servers/{A}/drain", json={})).status_code == 200
    assert (await client.post(f"/v1/servers/{A}/enable")).status_code == 200
    [drain] = await drainer.advance_due()
    assert (drain.step.value, drain.detail) == ("cancelled", "the server was set enabled meanwhile")


@pytest.mark.parametrize(
    ("address", "body", "status", "says"),
    [
        ("10.9.9.9:3389", {"notify": TEXT}, 404, "no server is registered at 10.9.9.9:3389"),
        (A, {"notify": ""}, 422, "body.notify: String should have at least 1 character"),
        (A, {"notify": "   "}, 400, "text must be one line of 1..500 printable characters"),
        (A, {"notify": "two\nlines"}, 422, "body.notify: String should match pattern"),
        (A, {"logoff_disconnected_after_s": -1}, 422, "body.logoff_disconnected_after_s: Input should be"),
        (
            A,
            {"logoff_disconnected_after_s": "soon"},
            422,
            "body.logoff_disconnected_after_s: Input should be",
        ),
        (A, {"then": "off"}, 422, "body.then: Input should be 'maintenance' or 'draining'"),
        (A, {"then_state": "maintenance"}, 422, "body.then_state: Extra inputs are not permitted"),
    ],
)
async def test_bad_drain_requests_are_refused_and_audited(client, caplog, address, body, status, says):
    caplog.clear()
    answer = await client.post(f"/v1/servers/{address}/drain", json=body)
    assert answer.status_code == status
    assert answer.json()["detail"].startswith(says), answer.json()["detail"]
    [line] = audit_lines(caplog)
    assert line["action"] == "server.drain"
    assert line["outcome"] == {404: "not_found", 400: "invalid", 422: "invalid"}[status]
    assert (await client.get(f"/v1/servers/{A}")).json()["admin_state"] == "enabled"
    missing = await client.get(f"/v1/servers/{address}/drain")
    assert missing.status_code == 404


async def test_one_replica_at_a_time_advances_a_drain(client, service, engine, clock, agent, sources):
    await users_on_a(service, client, agent)
    await client.post(f"/v1/servers/{A}/drain", json={"notify": TEXT})
    one, other = (
        Drainer(service, AgentCaller.from_settings(service.settings), owner=o) for o in ("r1", "r2")
    )

    async def claim(drainer: Drainer) -> bool:
        return await service.run_tx(functools.partial(drainer._claim, A))

    # Two replicas claim at once: one wins; the lease keeps the other out until it runs out.
    won = await asyncio.gather(claim(one), claim(other))
    assert sorted(won) == [False, True]
    winner, loser = (one, other) if won[0] else (other, one)
    assert await loser.advance_due() == []
    clock.advance(service.settings.drain_lease_s + 1)
    [drain] = await loser.advance_due()  # the winner died holding it: the other carries on
    assert drain.messaged == 1
    assert sources.runs.count(("msg", "2", TEXT)) == 1

    # The dead owner's late writes change nothing: the lease is no longer its.
    async def late(r):
        return await DrainRepository(r.conn).count(A, winner.owner, "messaged")

    assert await service.run_tx(late) is False
    assert (await drain_of(client))["messaged"] == 1
