"""A logoff on the server shows in the directory within one session-list interval plus a second: the real
broker (PostgreSQL) hands the replica its RDBROKER_SESSIONS_INTERVAL_MS, the replica reads the agent's list
at that pace, and the agent's word ends a proxy-made session even right after its connection closed."""

from __future__ import annotations

import asyncio
import json
import logging

from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import AgentStub, Server, health_replica, real_broker, wait_for
from tests.unit.proxy.support import close, handshake, running_proxy

log = logging.getLogger(__name__)
INTERVAL_MS = 500
ROUNDS = 5


def listing(*users: str) -> bytes:
    return json.dumps([{"user": u, "state": "active"} for u in users]).encode()


async def test_a_logoff_shows_within_one_interval_plus_a_second(pg_database_url: str) -> None:
    agent = await AgentStub({"/s1/sessions": listing()}).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            real_broker(
                pg_database_url,
                [Server(s1.address, sessions_url=agent.url("/s1/sessions"))],
                env={"RDBROKER_SESSIONS_INTERVAL_MS": str(INTERVAL_MS)},
            ) as broker,
            # The replica's own fallback (60 s) must not apply: the broker sends its interval.
            health_replica(broker.address, sessions_interval_s=60),
        ):

            async def session_of(user: str) -> broker_pb2.Session:
                request = broker_pb2.LookupUserSessionsRequest(user=user, include_ended=True)
                [found] = (await broker.stub.LookupUserSessions(request, timeout=10)).sessions
                return found

            delays = []
            for i in range(ROUNDS):
                user = f"CORP\\user{i}"
                routed = await broker.route(user)
                assert routed.reason == broker_pb2.ROUTE_REASON_NEW
                await broker.open(routed, user)
                agent.bodies["/s1/sessions"] = listing(f"user{i}")  # quser's bare name

                async def confirmed(user: str = user) -> bool:
                    return (await session_of(user)).confirmed

                await wait_for(confirmed, timeout_s=10)
                # The client disconnects, and the user is logged off on the server a moment later
                # (the case the old grace for logons in progress hid for 30 s).
                await broker.stub.ConnectionClosed(
                    broker_pb2.ConnectionClosedRequest(
                        session_id=routed.session_id,
                        connection_id=f"c{broker.routes}-{user}",
                        proxy_id="test",
                        bytes_from_server=10_000,
                    ),
                    timeout=10,
                )
                agent.bodies["/s1/sessions"] = listing()

                async def ended(user: str = user) -> bool:
                    found = await session_of(user)
                    return found.state == broker_pb2.SESSION_STATE_ENDED

                delays.append(await wait_for(ended, timeout_s=10, step_s=0.02))
                state = await session_of(user)
                assert state.session_id == routed.session_id
            log.warning("logoff to ended, %d ms lists: %s s", INTERVAL_MS, [round(d, 2) for d in delays])
            assert max(delays) <= INTERVAL_MS / 1000 + 1.0, delays
    finally:
        await agent.stop()


async def test_through_the_proxy_a_claim_is_kept_while_open_and_a_logoff_ends_the_confirmed_session(
    pg_database_url: str,
) -> None:
    """Real proxy, real broker, health replica, agent stand-in: the agent's list confirms the proxy's
    claim, keeps an unlisted one whose connection is open, and its logoff ends the confirmed one."""
    agent = await AgentStub({"/s1/sessions": listing()}).start()
    try:
        async with (
            FakeRdpServer(mode="echo") as s1,
            real_broker(
                pg_database_url,
                [Server(s1.address, sessions_url=agent.url("/s1/sessions"))],
                env={"RDBROKER_SESSIONS_INTERVAL_MS": str(INTERVAL_MS)},
            ) as broker,
            health_replica(broker.address),
            running_proxy([broker.address]) as proxy,
        ):

            async def session_of(user: str) -> broker_pb2.Session:
                request = broker_pb2.LookupUserSessionsRequest(user=user, include_ended=True)
                [found] = (await broker.stub.LookupUserSessions(request, timeout=10)).sessions
                return found

            async def connect(user: str) -> asyncio.StreamWriter:
                packet = build_connection_request(cookie=user, requested_protocols=3)
                reader, writer, _ = await handshake(proxy.port, packet)
                data = bytes(4096)  # a real logon's worth from the server (the echo), not junk
                writer.write(data)
                async with asyncio.timeout(10):
                    assert await reader.readexactly(len(data)) == data
                return writer

            zoe = await connect("CORP\\zoe")
            slow = await connect("CORP\\slow")  # its logon never completes on the server
            agent.bodies["/s1/sessions"] = listing("zoe")

            async def zoe_confirmed() -> bool:
                return (await session_of("CORP\\zoe")).confirmed

            await wait_for(zoe_confirmed, timeout_s=10)
            lists = agent.served["/s1/sessions"]

            async def three_more_lists() -> bool:  # each one lacks "slow"
                return agent.served["/s1/sessions"] >= lists + 3

            await wait_for(three_more_lists, timeout_s=10)
            claim = await session_of("CORP\\slow")
            assert (claim.state, claim.confirmed) == (broker_pb2.SESSION_STATE_ACTIVE, False)

            await close(zoe)

            async def zoe_disconnected() -> bool:
                return (await session_of("CORP\\zoe")).state == broker_pb2.SESSION_STATE_DISCONNECTED

            await wait_for(zoe_disconnected, timeout_s=10)
            agent.bodies["/s1/sessions"] = listing()  # zoe logged off on the server

            async def zoe_ended() -> bool:
                return (await session_of("CORP\\zoe")).state == broker_pb2.SESSION_STATE_ENDED

            delay = await wait_for(zoe_ended, timeout_s=10, step_s=0.02)
            log.warning("through the proxy: logoff to ended in %.2f s (%d ms lists)", delay, INTERVAL_MS)
            assert delay <= INTERVAL_MS / 1000 + 1.0
            assert (await session_of("CORP\\slow")).state == broker_pb2.SESSION_STATE_ACTIVE
            await close(slow)
    finally:
        await agent.stop()
