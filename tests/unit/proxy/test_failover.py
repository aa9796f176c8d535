"""A broker killed mid-run: connections keep being routed through the other, no session twice."""

from __future__ import annotations

import asyncio

from rdbroker_rdp import build_connection_request
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import STEP_TIMEOUT_S, BulkServer, close, handshake, open_client, running_proxy


async def test_a_killed_broker_is_routed_around_and_no_session_is_created_twice() -> None:
    async with BulkServer() as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as a, fake_broker(directory) as b:
            async with running_proxy([a.address, b.address]) as proxy:
                for i in range(30):
                    if i == 10:
                        await a.stop()  # killed mid-run, connections keep coming
                    _, writer, _ = await handshake(proxy.port, build_connection_request(cookie=f"user{i}"))
                    await close(writer)
            assert a.servicer.route_calls >= 1
            assert b.servicer.route_calls >= 20
    assert len(server.first_packets) == 30
    assert len(directory.sessions_created) == 30
    assert set(directory.sessions_created.values()) == {1}


async def test_a_broker_that_dies_before_answering_does_not_cause_a_second_session() -> None:
    async with BulkServer() as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as hung, fake_broker(directory) as good:
            hung.servicer.hang_routes = True  # records the session, never answers
            async with running_proxy([hung.address, good.address], route_attempt_timeout_s=0.3) as proxy:
                for i in range(6):
                    _, writer, _ = await handshake(proxy.port, build_connection_request(cookie=f"user{i}"))
                    await close(writer)
            assert hung.servicer.route_calls >= 1
    assert len(server.first_packets) == 6
    # Each connection's retry carried the same connection_id and got the session already made.
    assert len(directory.sessions_created) == 6
    assert set(directory.sessions_created.values()) == {1}
    retried = [r.connection_id for r in directory.routes]
    assert len(retried) > len(set(retried))


async def test_a_client_waits_for_a_restarting_broker_within_the_route_deadline() -> None:
    """The only broker is down when the client connects and comes back 1 s later: the client is
    routed (the proxy keeps trying until its Route deadline), not refused."""
    async with BulkServer() as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as first:
            port = first.port
        # The broker is gone; the proxy's channel is failing and backing off.
        async with running_proxy([f"127.0.0.1:{port}"], route_timeout_s=8.0) as proxy:
            reader, writer = await open_client(proxy.port)
            writer.write(build_connection_request(cookie="alice"))
            await asyncio.sleep(1.0)
            assert not server.first_packets
            async with fake_broker(directory, port=port):
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    header = await reader.readexactly(4)
                assert header[:2] == b"\x03\x00"  # the server's Connection Confirm came back
                await close(writer)
    assert len(server.first_packets) == 1
    assert len(directory.sessions_created) == 1
