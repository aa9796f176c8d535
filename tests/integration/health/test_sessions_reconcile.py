"""Session lists fetched by the replica reach the real broker: a logoff ends a session, a disconnected
session the directory did not know is recorded so its user reconnects to it."""

from __future__ import annotations

from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import AgentStub, Server, health_replica, real_broker, wait_for


async def test_logoff_and_unknown_disconnected_session(pg_database_url: str) -> None:
    agent = await AgentStub(
        {
            "/s1/sessions": b'[{"user": "alice", "state": "disconnected"}]',
            "/s2/sessions": b'[{"user": "bob", "state": "active"}]',
        }
    ).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            FakeRdpServer(mode="sink") as s2,
            real_broker(
                pg_database_url,
                [
                    Server(s1.address, sessions_url=agent.url("/s1/sessions")),
                    Server(s2.address, sessions_url=agent.url("/s2/sessions")),
                ],
                env={"RDBROKER_SESSIONS_INTERVAL_MS": "200"},
            ) as broker,
            health_replica(broker.address),
        ):

            async def sessions_of(user: str) -> list[broker_pb2.Session]:
                request = broker_pb2.LookupUserSessionsRequest(user=user, include_ended=True)
                return list((await broker.stub.LookupUserSessions(request, timeout=10)).sessions)

            async def alice_recorded() -> bool:
                return any(s.server_address == s1.address for s in await sessions_of("alice"))

            async def bob_recorded() -> bool:
                return any(s.confirmed for s in await sessions_of("bob"))

            await wait_for(alice_recorded)
            await wait_for(bob_recorded)  # the server's session: confirmed, not a claim
            alice = await broker.route("alice")
            assert (alice.server_address, alice.reason) == (s1.address, broker_pb2.ROUTE_REASON_RECONNECT)

            bob = await broker.route("bob")
            assert bob.server_address == s2.address  # s1 holds alice's session
            await broker.open(bob, "bob")
            agent.bodies["/s2/sessions"] = b"[]"  # bob logged off

            async def bob_ended() -> bool:
                return [s.state for s in await sessions_of("bob")] == [broker_pb2.SESSION_STATE_ENDED]

            await wait_for(bob_ended)
    finally:
        await agent.stop()
