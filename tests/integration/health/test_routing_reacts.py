"""Health results drive the real broker's routing (broker process on PostgreSQL, replica in this loop).

Probe settings come from the broker: interval 200 ms, timeout 150 ms, rise 2, fall 3.
"""

from __future__ import annotations

import pytest

from rdbroker_proto.v1 import broker_pb2
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.health.support import (
    FALL,
    INTERVAL_S,
    RISE,
    AgentStub,
    Server,
    health_replica,
    real_broker,
    wait_for,
)

UP, DOWN = broker_pb2.HEALTH_STATE_UP, broker_pb2.HEALTH_STATE_DOWN
JITTER = 0.1  # the replica's default


async def test_a_server_whose_rdp_stops_answering_gets_no_new_users_then_gets_them_back(
    pg_database_url: str,
) -> None:
    async with (
        FakeRdpServer(mode="sink") as s1,
        FakeRdpServer(mode="sink") as s2,
        real_broker(pg_database_url, [Server(s1.address), Server(s2.address)]) as broker,
        health_replica(broker.address),
    ):

        async def health_is(address: str, state: int) -> bool:
            return (await broker.servers())[address].health == state

        await wait_for(lambda: health_is(s1.address, UP))
        await wait_for(lambda: health_is(s2.address, UP))

        s1.mode = "silent"  # accepts, never answers the Connection Request
        took_down = await wait_for(lambda: health_is(s1.address, DOWN))
        # fall=3 failed probes: at least two intervals after the first of them
        assert took_down >= (FALL - 1) * INTERVAL_S * (1 - JITTER), took_down
        assert "timeout" in (await broker.servers())[s1.address].health_detail
        for i in range(6):
            answer = await broker.route(f"new{i}")
            assert answer.server_address == s2.address
            assert answer.reason == broker_pb2.ROUTE_REASON_NEW

        s1.mode = "sink"
        took_up = await wait_for(lambda: health_is(s1.address, UP))
        assert took_up >= (RISE - 1) * INTERVAL_S * (1 - JITTER), took_up
        answer = await broker.route("after")  # s1 has no sessions, s2 has six
        assert answer.server_address == s1.address


async def test_agent_load_100_keeps_new_users_away(pg_database_url: str) -> None:
    agent = await AgentStub({"/s1/load": b"100", "/s2/load": b"40"}).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            FakeRdpServer(mode="sink") as s2,
            real_broker(
                pg_database_url,
                [Server(s1.address, agent.url("/s1/load")), Server(s2.address, agent.url("/s2/load"))],
            ) as broker,
            health_replica(broker.address),
        ):

            async def loads_are(l1: int, l2: int) -> bool:
                servers = await broker.servers()
                return (servers[s1.address].load, servers[s2.address].load) == (l1, l2)

            await wait_for(lambda: loads_are(100, 40))
            for i in range(5):
                assert (await broker.route(f"u{i}")).server_address == s2.address

            agent.bodies["/s1/load"] = b"0"
            await wait_for(lambda: loads_are(0, 40))
            assert (await broker.route("later")).server_address == s1.address
    finally:
        await agent.stop()


@pytest.mark.parametrize("disabled", [b"drain", b"102"])  # 102: Kemp's "administratively disabled"
async def test_drain_keeps_new_users_away_but_lets_a_user_reconnect(
    pg_database_url: str, disabled: bytes
) -> None:
    agent = await AgentStub({"/s1/load": b"5", "/s2/load": b"50"}).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            FakeRdpServer(mode="sink") as s2,
            real_broker(
                pg_database_url,
                [Server(s1.address, agent.url("/s1/load")), Server(s2.address, agent.url("/s2/load"))],
            ) as broker,
            health_replica(broker.address),
        ):

            async def agent_state(address: str, state: str) -> bool:
                return await broker.column(address, "agent_state") == state

            await wait_for(lambda: agent_state(s1.address, "up"))
            await wait_for(lambda: agent_state(s2.address, "up"))
            bob = await broker.route("bob")
            assert bob.server_address == s1.address  # load 5 beats 50
            await broker.open(bob, "bob")

            agent.bodies["/s1/load"] = disabled
            await wait_for(lambda: agent_state(s1.address, "drain"))
            assert await broker.column(s1.address, "health") == "up"  # not a failed probe
            for user in ("carol", "dave", "erin"):
                assert (await broker.route(user)).server_address == s2.address
            again = await broker.route("bob")
            assert (again.server_address, again.reason) == (s1.address, broker_pb2.ROUTE_REASON_RECONNECT)
    finally:
        await agent.stop()


async def test_an_agent_down_answer_keeps_new_users_away(pg_database_url: str) -> None:
    agent = await AgentStub({"/s1/load": b"101", "/s2/load": b"50"}).start()
    try:
        async with (
            FakeRdpServer(mode="sink") as s1,
            FakeRdpServer(mode="sink") as s2,
            real_broker(
                pg_database_url,
                [Server(s1.address, agent.url("/s1/load")), Server(s2.address, agent.url("/s2/load"))],
            ) as broker,
            health_replica(broker.address),
        ):

            async def s1_agent_down() -> bool:
                return await broker.column(s1.address, "agent_state") == "down"

            await wait_for(s1_agent_down)
            for i in range(3):
                assert (await broker.route(f"u{i}")).server_address == s2.address
    finally:
        await agent.stop()
