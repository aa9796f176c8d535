"""A logoff on the server shows in the directory within one session-list interval plus a second: the real
broker (PostgreSQL) hands the replica its RDBROKER_SESSIONS_INTERVAL_MS, the replica reads the agent's list
at that pace, and the agent's word ends a proxy-made session even right after its connection closed."""

from __future__ import annotations

import json
import logging

from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import AgentStub, Server, health_replica, real_broker, wait_for

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
