"""A drain until empty outlives the broker advancing it: a broker process killed with SIGKILL in the
middle of a pass (an agent call under way, the drain's lease held), and a new broker process on the
same database carries the drain on once the lease runs out, without messaging anyone twice who was
recorded as messaged, and moves the server to maintenance when it is empty."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest

from rdbroker_agent.actions import WindowsActions
from rdbroker_agent.auth import AgentAuth
from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from rdbroker_broker import callers
from rdbroker_broker import domain as d
from rdbroker_common.bearer import Tokens
from tests.integration.broker.conftest import seed, server
from tests.integration.broker.processes import running_broker
from tests.support.audit import audit_rows
from tests.unit.agent.fakes import FakeSources

pytestmark = pytest.mark.slow

A = "10.0.0.11:3389"
TOKEN = "agent-token-for-the-drain-restart-test"
TEXT = "Maintenance at noon: please log off."
QUSER = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
 alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
 bob                   rdp-tcp#4           3  Active          .  11/27/2026 9:05 AM
"""
BOB_MESSAGE = ("msg", "3", TEXT)
ENV = {
    "RDBROKER_AGENT_TOKEN": TOKEN,
    "RDBROKER_DRAIN_INTERVAL_S": "0.2",
    "RDBROKER_DRAIN_LEASE_S": "3",
    "RDBROKER_LOG_FORMAT": "text",
}


class HeldSources(FakeSources):
    """bob's message waits in the agent until `release` is set (`reached` says it arrived)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, command: Sequence[str], timeout_s: float) -> str:
        if tuple(command) == BOB_MESSAGE and not self.release.is_set():
            self.reached.set()
            await self.release.wait()
        return await super().run(command, timeout_s)


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {seconds:g} s: {what}")


async def test_a_killed_broker_s_drain_is_carried_on_by_the_next(pg_database_url, engine, service, clock):
    sources = HeldSources(outputs={("quser",): QUSER, ("msg", "2", TEXT): "", BOB_MESSAGE: ""})
    config = parse_config({"counters": [{"kind": "cpu"}]})
    auth = AgentAuth(tokens=Tokens(fixed=TOKEN))
    async with AgentServer(config, sources, auth=auth, actions=WindowsActions(sources.run, 30.0)) as agent:
        url = f"http://127.0.0.1:{agent.port}/sessions"
        await seed(engine, server(A, sessions_url=url))
        ids = {}
        with callers.use_caller(callers.Caller("test-setup")):
            for n, user in enumerate(("alice", "bob")):
                request = d.RouteRequest(connection_id=f"c{n}", proxy_id="p", cookie=user)
                decision = await service.route(request)
                assert decision.server_address == A
                await service.connection_opened(decision.session_id, f"c{n}", "p")
                ids[user] = decision.session_id
                clock.advance(1)  # a drain takes sessions oldest first: alice, then bob

        async with running_broker(pg_database_url, env=ENV) as first, httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{first.http_port}/v1/servers/{A}/drain"
            started = await http.post(base, json={"notify": TEXT, "then": "maintenance"})
            assert started.status_code == 200, started.text
            # alice is messaged, then bob's message is under way when the broker dies.
            await asyncio.wait_for(sources.reached.wait(), 30)
            drain = (await http.get(base)).json()
            assert (drain["step"], drain["messaged"]) == ("starting", 1)
            first.kill()
            await first.process.wait()
        sources.release.set()  # the agent finishes bob's message for a broker that is gone

        async with running_broker(pg_database_url, env=ENV) as second, httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{second.http_port}/v1/servers/{A}"

            async def drain_says(**want: Any) -> bool:
                drain = (await http.get(f"{base}/drain")).json()
                return all(drain[k] == v for k, v in want.items())

            await until(lambda: drain_says(step="waiting", messaged=2), "the second broker messages bob")
            # alice was recorded as messaged: never again; bob's message, unrecorded when the
            # first broker died, was sent again (at least once).
            assert sources.runs.count(("msg", "2", TEXT)) == 1
            assert sources.runs.count(BOB_MESSAGE) == 2

            for sid in ids.values():
                await service.end_session(sid, "logged_off")
            await until(lambda: drain_says(step="done", sessions_left=0), "the drain ends")
            assert (await http.get(base)).json()["admin_state"] == "maintenance"

    actions = [r["action"] for r in await audit_rows(engine, target=A)]
    assert actions[-2:] == ["server.drain", "server.drain_done"]
    messages = await audit_rows(engine, action="session.message")
    assert [(r["target"], r["actor"]) for r in messages] == [
        (ids["alice"], "drain:open-api"),
        (ids["bob"], "drain:open-api"),
    ]
