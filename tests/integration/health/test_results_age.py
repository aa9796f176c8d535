"""When every health replica is gone, the last results age: after stale_after (three probe intervals
plus the broker's probe lease, small here) a server reads as never probed and takes users again.

The broker is a process on PostgreSQL; the replica runs in this loop and is stopped (all replicas dead).
"""

from __future__ import annotations

from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import (
    AgentStub,
    RealBroker,
    Server,
    health_replica,
    real_broker,
    wait_for,
)

UP, DOWN = broker_pb2.HEALTH_STATE_UP, broker_pb2.HEALTH_STATE_DOWN
# stale_after = 3 x 200 ms (the test probe interval) + this lease: 1.6 s.
ENV = {"RDBROKER_LEASE_MS": "1000"}


async def stale(broker: RealBroker, address: str) -> bool:
    """The server's last result has stopped counting, by the database's clock (the broker's host)."""
    return bool(await broker.column(address, "fresh_until <= now()"))


async def test_a_down_server_whose_replicas_all_die_becomes_routable(pg_database_url: str) -> None:
    async with (
        FakeRdpServer(mode="silent") as s1,  # accepts, never answers: down
        FakeRdpServer(mode="sink") as s2,
        real_broker(pg_database_url, [Server(s1.address), Server(s2.address)], env=ENV) as broker,
    ):
        async with health_replica(broker.address):

            async def health_is(address: str, state: int) -> bool:
                return (await broker.servers())[address].health == state

            await wait_for(lambda: health_is(s1.address, DOWN))
            await wait_for(lambda: health_is(s2.address, UP))
            for i in range(3):
                assert (await broker.route(f"u{i}")).server_address == s2.address
        # No replica reports any more. Until its result goes stale s1 stays down...
        if await broker.column(s1.address, "fresh_until - now() > interval '0.5 s'"):
            assert (await broker.route("early")).server_address == s2.address
        await wait_for(lambda: stale(broker, s1.address))
        await wait_for(lambda: stale(broker, s2.address))
        # ...then both read unknown, and s1 (no sessions) is the emptier one.
        answer = await broker.route("after")
        assert (answer.server_address, answer.reason) == (s1.address, broker_pb2.ROUTE_REASON_NEW)


async def test_a_full_server_whose_replicas_all_die_is_used_again(pg_database_url: str) -> None:
    agent = await AgentStub({"/s1/load": b"100", "/s2/load": b"40"}).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            FakeRdpServer(mode="sink") as s2,
            real_broker(
                pg_database_url,
                [Server(s1.address, agent.url("/s1/load")), Server(s2.address, agent.url("/s2/load"))],
                env=ENV,
            ) as broker,
        ):
            async with health_replica(broker.address):

                async def loads_are(l1: int, l2: int) -> bool:
                    servers = await broker.servers()
                    return (servers[s1.address].load, servers[s2.address].load) == (l1, l2)

                await wait_for(lambda: loads_are(100, 40))
                for i in range(3):
                    assert (await broker.route(f"u{i}")).server_address == s2.address
            await wait_for(lambda: stale(broker, s1.address))
            await wait_for(lambda: stale(broker, s2.address))
            # No load figure counts: session counts stand in (s1 none, s2 three).
            assert (await broker.route("after")).server_address == s1.address
    finally:
        await agent.stop()
