"""The proxy end to end on loopback: fake RDP servers, an in-process fake broker, real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp import build_connection_request, build_preconnection, encode_routing_token
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.support.postgres import free_port
from tests.unit.proxy.fake_broker import Directory, RunningBroker, fake_broker
from tests.unit.proxy.support import (
    CR,
    STEP_TIMEOUT_S,
    close,
    closed_by_peer,
    handshake,
    open_client,
    running_proxy,
    settings,
    wait_until,
)

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors" / "public"


@dataclass
class Farm:
    servers: list[FakeRdpServer]  # two in the default pool, one in "Sales"
    directory: Directory
    broker: RunningBroker

    def server_at(self, address: str) -> FakeRdpServer:
        return next(s for s in self.servers if s.address == address)


@pytest.fixture
async def farm() -> AsyncIterator[Farm]:
    async with (
        FakeRdpServer(mode="echo") as a,
        FakeRdpServer(mode="echo") as b,
        FakeRdpServer(mode="echo") as sales,
    ):
        directory = Directory({"": [a.address, b.address], "Sales": [sales.address]})
        async with fake_broker(directory) as broker:
            yield Farm([a, b, sales], directory, broker)


async def echo_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    async with asyncio.timeout(10):
        return await reader.readexactly(len(data))


# -- routing on every form of first packet -------------------------------------------------------


async def test_cookie_routes_where_the_broker_says_and_the_same_user_comes_back(farm: Farm) -> None:
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer, confirm = await handshake(proxy.port, CR)
        assert confirm[5] == 0xD0  # a Connection Confirm from the server
        assert await echo_roundtrip(reader, writer, b"after the handshake") == b"after the handshake"
        await close(writer)
        first = farm.directory.routes[0]
        placed = farm.directory.answers[(first.connection_id, 0)].server_address
        assert first.cookie == "alice"
        assert first.pool == ""
        assert farm.server_at(placed).first_packets == [CR]

        reader, writer, _ = await handshake(proxy.port, CR)
        await close(writer)
        again = farm.directory.answers[(farm.directory.routes[1].connection_id, 0)]
        assert again.reason == pb.ROUTE_REASON_RECONNECT
        assert again.server_address == placed
        assert farm.directory.routes[1].connection_id != first.connection_id


async def test_no_cookie_is_placed_without_identity(farm: Farm) -> None:
    bare = bytes.fromhex("0300000b06e00000000000")
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, bare)
        await close(writer)
    route = farm.directory.routes[0]
    assert route.cookie == ""
    assert farm.directory.answers[(route.connection_id, 0)].reason == pb.ROUTE_REASON_NO_IDENTITY


async def test_a_token_goes_to_the_server_it_names(farm: Farm) -> None:
    target = farm.servers[1]
    packet = build_connection_request(routing_token=encode_routing_token("127.0.0.1", target.port))
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, packet)
        await close(writer)
    assert target.first_packets == [packet]
    assert farm.directory.routes[0].routing_token == encode_routing_token("127.0.0.1", target.port)


async def test_a_token_naming_an_unregistered_address_is_refused(farm: Farm) -> None:
    packet = build_connection_request(routing_token=encode_routing_token("127.0.0.1", free_port()))
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(packet)
        assert await closed_by_peer(reader)
        await close(writer)
    assert sum(s.accepted for s in farm.servers) == 0
    assert farm.directory.closed == []


async def test_a_collection_names_the_pool(farm: Farm) -> None:
    packet = build_connection_request(
        cookie="bob", load_balance_info="tsv://MS Terminal Services Plugin.1.Sales", requested_protocols=3
    )
    async with running_proxy([farm.broker.address], pool="ignored-when-a-collection-is-sent") as proxy:
        _, writer, _ = await handshake(proxy.port, packet)
        await close(writer)
    assert farm.directory.routes[0].pool == "Sales"
    assert farm.servers[2].first_packets == [packet]


async def test_the_default_pool_setting_is_used_without_a_collection(farm: Farm) -> None:
    farm.directory.pools["Office"] = [farm.servers[2].address]
    async with running_proxy([farm.broker.address], pool="Office") as proxy:
        _, writer, _ = await handshake(proxy.port, CR)
        await close(writer)
    assert farm.directory.routes[0].pool == "Office"
    assert farm.servers[2].first_packets == [CR]


async def test_a_preconnection_pdu_is_a_routing_hint_and_is_replayed_in_order(farm: Farm) -> None:
    packet = build_preconnection(7, "vm-42") + CR
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer, _ = await handshake(proxy.port, packet)
        assert await echo_roundtrip(reader, writer, b"x" * 1000) == b"x" * 1000
        await close(writer)
    route = farm.directory.routes[0]
    assert route.preconnection_id == 7
    assert route.preconnection_blob == b"vm-42"
    placed = farm.directory.answers[(route.connection_id, 0)].server_address
    assert farm.server_at(placed).first_packets[0] == packet


async def test_bytes_after_the_first_packet_are_replayed_after_it(farm: Farm) -> None:
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(CR + b"early bytes")
        async with asyncio.timeout(10):
            header = await reader.readexactly(4)
            await reader.readexactly(int.from_bytes(header[2:4], "big") - 4)
            assert await reader.readexactly(len(b"early bytes")) == b"early bytes"  # echoed after the CR
        await close(writer)


@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in VECTORS.glob("*.hex") if not p.stem.endswith(".reply")),
)
async def test_every_public_client_vector_is_routed_and_replayed_exactly(farm: Farm, name: str) -> None:
    packet = bytes.fromhex((VECTORS / f"{name}.hex").read_text().strip())
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, packet)
        await close(writer)
    assert sum(s.first_packets.count(packet) for s in farm.servers) == 1


async def test_the_packet_dribbled_one_byte_at_a_time_works(farm: Farm) -> None:
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer = await open_client(proxy.port)
        for i in range(len(CR)):
            writer.write(CR[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.005)
        async with asyncio.timeout(10):
            header = await reader.readexactly(4)
        assert header[:2] == b"\x03\x00"
        await close(writer)
    assert sum(s.first_packets.count(CR) for s in farm.servers) == 1


# -- refusing cleanly and cheaply -----------------------------------------------------------------

BAD_PACKETS = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tpkt_length_0": bytes.fromhex("03000000") + b"\x00" * 7,
    "tpkt_length_10": bytes.fromhex("0300000a05e000000000"),
    "tpkt_length_260": bytes.fromhex("03000104") + b"\x00" * 256,
    "tpkt_length_65535": bytes.fromhex("0300ffff") + b"\x00" * 300,
    "li_mismatch": bytes.fromhex("0300000b07e00000000000"),
    "not_a_connection_request": bytes.fromhex("0300000b06d00000000000"),
    "preconnection_too_big": struct.pack("<IIII", 70000, 0, 2, 1),
    "preconnection_bad_version": struct.pack("<IIII", 16, 0, 9, 1),
    "cookie_without_crlf": bytes.fromhex("0300001f1ae00000000000") + b"Cookie: mstshash=bob",
}


@pytest.mark.parametrize("name", sorted(BAD_PACKETS))
async def test_bad_first_packets_are_closed_without_asking_the_broker(farm: Farm, name: str) -> None:
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(BAD_PACKETS[name])
        assert await closed_by_peer(reader)
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
    assert farm.directory.routes == []


async def test_a_first_packet_past_the_size_bound_is_closed(farm: Farm) -> None:
    async with running_proxy([farm.broker.address], max_first_packet=20) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(CR)  # complete, but longer than the bound
        assert await closed_by_peer(reader)
        await close(writer)
    assert farm.directory.routes == []


@pytest.mark.parametrize("sent", [b"", CR[:5]], ids=["nothing", "a_start"])
async def test_a_silent_client_is_closed_at_the_deadline_and_not_before(
    farm: Farm, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_proxy")
    timeout_s = 0.5
    async with running_proxy([farm.broker.address], first_packet_timeout_s=timeout_s) as proxy:
        loop = asyncio.get_running_loop()
        started = loop.time()  # before the connect: the proxy's timer starts later than this
        reader, writer = await open_client(proxy.port)
        writer.write(sent)
        assert await closed_by_peer(reader)  # bounded by STEP_TIMEOUT_S: only a hang fails it
        waited = loop.time() - started
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
    # A lower bound only (a loaded machine may close it late); the slack covers timer granularity.
    assert waited >= timeout_s - 0.05
    assert farm.directory.routes == []
    [line] = [r for r in caplog.records if r.getMessage().startswith("connection ended")]
    assert line.end_reason == "first_packet_timeout"  # type: ignore[attr-defined]


async def test_a_client_that_closes_mid_packet_is_forgotten(farm: Farm) -> None:
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer = await open_client(proxy.port)
        writer.write(CR[:10])
        await writer.drain()
        await close(writer)
        await wait_until(lambda: proxy.context.accepted == 1 and not proxy.context.connections)
    assert farm.directory.routes == []


async def test_silent_clients_do_not_hold_up_others(farm: Farm) -> None:
    # Had the proxy waited on the silent ones, the others would wait out this deadline (the test's
    # timeout comes long before it).
    silent_deadline_s = 300.0  # the largest allowed
    async with running_proxy(
        [farm.broker.address], first_packet_timeout_s=silent_deadline_s, max_routing_per_client=0
    ) as proxy:
        silent = [await open_client(proxy.port) for _ in range(200)]
        await wait_until(lambda: len(proxy.context.connections) == 200)

        async def normal(i: int) -> None:
            _, writer, _ = await handshake(proxy.port, build_connection_request(cookie=f"user{i}"))
            await close(writer)

        async with asyncio.timeout(STEP_TIMEOUT_S), asyncio.TaskGroup() as tg:
            for i in range(5):
                tg.create_task(normal(i))
        # All five went through while every silent client was still waiting for its deadline.
        assert len(farm.directory.routes) == 5
        assert len(proxy.context.connections) >= 200
        for _, writer in silent:
            writer.close()
        await wait_until(lambda: not proxy.context.connections)


async def test_over_the_connection_cap_new_clients_are_closed_at_once(farm: Farm) -> None:
    async with running_proxy([farm.broker.address], max_connections=3, first_packet_timeout_s=30.0) as proxy:
        held = [await open_client(proxy.port) for _ in range(3)]
        await wait_until(lambda: len(proxy.context.connections) == 3)
        reader, writer = await open_client(proxy.port)
        writer.write(CR)
        assert await closed_by_peer(reader)
        assert proxy.context.refused_over_cap == 1
        await close(writer)
        for _, w in held:
            await close(w)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
    ],
)
async def test_broker_refusals_close_the_client(farm: Farm, code: grpc.StatusCode) -> None:
    farm.directory.error = (code, "refused for the test")
    async with running_proxy([farm.broker.address], route_timeout_s=1.0) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(CR)
        assert await closed_by_peer(reader)
        await close(writer)
    assert sum(s.accepted for s in farm.servers) == 0


async def test_an_unreachable_broker_closes_the_client(farm: Farm) -> None:
    async with running_proxy([f"127.0.0.1:{free_port()}"], route_timeout_s=0.5) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(CR)
        assert await closed_by_peer(reader)
        await close(writer)
    assert sum(s.accepted for s in farm.servers) == 0


# -- server failures --------------------------------------------------------------------------------


async def test_a_new_placement_that_cannot_connect_is_reported_and_placed_again(farm: Farm) -> None:
    dead = f"127.0.0.1:{free_port()}"
    live = farm.servers[0]
    farm.directory.pools[""] = [dead, live.address]  # equal load: the dead one is chosen first
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, CR)
        await close(writer)
    first, retry = farm.directory.routes
    assert retry.connection_id == first.connection_id
    assert (retry.attempt, retry.failed_server_address) == (1, dead)
    assert live.first_packets == [CR]


async def test_a_reconnect_to_a_dead_server_is_asked_again_and_the_broker_decides(farm: Farm) -> None:
    dead = f"127.0.0.1:{free_port()}"
    farm.directory.pools[""].append(dead)
    farm.directory.users[("", "alice")] = dead
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, CR)
        await close(writer)
    first, retry = farm.directory.routes
    assert farm.directory.answers[(first.connection_id, 0)].reason == pb.ROUTE_REASON_RECONNECT
    assert (retry.connection_id, retry.attempt, retry.failed_server_address) == (first.connection_id, 1, dead)
    assert sum(len(s.first_packets) for s in farm.servers) == 1  # placed by the broker's second answer


async def test_a_connection_asks_the_broker_at_most_three_times(farm: Farm) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    farm.directory.pools[""] = dead
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer = await open_client(proxy.port)
        writer.write(CR)
        assert await closed_by_peer(reader)
        await close(writer)
        await wait_until(lambda: len(farm.directory.closed) == 1)
    assert [r.attempt for r in farm.directory.routes] == [0, 1, 2]
    assert farm.directory.closed[0].end_reason == "connect_failed"


async def test_a_server_that_refuses_the_negotiation_and_closes_is_passed_through() -> None:
    async with FakeRdpServer(mode="neg_failure") as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker, running_proxy([broker.address]) as proxy:
            reader, writer, confirm = await handshake(proxy.port, CR)
            assert confirm[11] == 0x03  # RDP_NEG_FAILURE, as the server sent it
            assert await closed_by_peer(reader)
            await close(writer)
            await wait_until(lambda: len(directory.closed) == 1)
    assert directory.closed[0].end_reason in {"server_closed", "client_closed"}


async def test_a_server_reset_resets_the_client() -> None:
    async with FakeRdpServer(mode="reset") as server:
        directory = Directory({"": [server.address]})
        async with fake_broker(directory) as broker, running_proxy([broker.address]) as proxy:
            reader, writer = await open_client(proxy.port)
            writer.write(CR)
            assert await closed_by_peer(reader)
            await close(writer)
            await wait_until(lambda: len(directory.closed) == 1)
    assert directory.closed[0].end_reason == "server_reset"


# -- reports, logs, timeouts, shutdown -----------------------------------------------------------------


async def test_opened_and_closed_are_reported_with_byte_counts(
    farm: Farm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_proxy")
    async with running_proxy([farm.broker.address], log_identity="cookie") as proxy:
        reader, writer, confirm = await handshake(proxy.port, CR)
        assert await echo_roundtrip(reader, writer, b"y" * 5000) == b"y" * 5000
        await close(writer)
        await wait_until(lambda: len(farm.directory.closed) == 1)
    opened, closed = farm.directory.opened[0], farm.directory.closed[0]
    route = farm.directory.routes[0]
    assert opened.connection_id == closed.connection_id == route.connection_id
    assert opened.proxy_id == "test-proxy"
    assert closed.bytes_from_client == len(CR) + 5000
    assert closed.bytes_from_server == len(confirm) + 5000
    assert closed.end_reason == "client_closed"
    [line] = [r for r in caplog.records if r.getMessage().startswith("connection ended")]
    assert line.identity == "alice"  # type: ignore[attr-defined]
    assert line.server == opened.server_address  # type: ignore[attr-defined]
    assert line.route_reason == "new"  # type: ignore[attr-defined]
    assert line.bytes_from_client == len(CR) + 5000  # type: ignore[attr-defined]
    assert line.end_reason == "client_closed"  # type: ignore[attr-defined]
    assert line.client.startswith("127.0.0.1:")  # type: ignore[attr-defined]


async def test_identity_is_hashed_in_logs_by_default(farm: Farm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_proxy")
    async with running_proxy([farm.broker.address]) as proxy:
        _, writer, _ = await handshake(proxy.port, CR)
        await close(writer)
        await wait_until(lambda: len(farm.directory.closed) == 1)
    [line] = [r for r in caplog.records if r.getMessage().startswith("connection ended")]
    assert line.identity.startswith("hmac:")  # type: ignore[attr-defined]
    assert "alice" not in caplog.text


async def test_heartbeats_carry_the_open_connections(farm: Farm) -> None:
    farm.directory.heartbeat_interval_ms = 50  # the proxy follows the broker's interval
    async with running_proxy([farm.broker.address], heartbeat_interval_s=60.0) as proxy:
        _, writer, _ = await handshake(proxy.port, CR)
        [connection_id] = proxy.context.connection_ids()
        await wait_until(lambda: any(connection_id in h.connection_ids for h in farm.directory.heartbeats))
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
        seen = len(farm.directory.heartbeats)
        await wait_until(lambda: len(farm.directory.heartbeats) > seen)
    last = farm.directory.heartbeats[-1]
    assert last.proxy_id == "test-proxy"
    assert list(last.connection_ids) == []


async def test_both_sockets_of_a_spliced_connection_send_small_packets_at_once(farm: Farm) -> None:
    """TCP_NODELAY on the client's and the server's socket: an RDP connection sequence is many small
    request/answer packets, and a client such as FreeRDP 2 only polls for the answer every 100 ms
    when it is not there at once (docs/performance.md, Real logons), so Nagle's wait is never wanted."""
    async with running_proxy([farm.broker.address]) as proxy:
        reader, writer, _ = await handshake(proxy.port, CR)
        (connection,) = proxy.context.connections
        assert connection.splice is not None
        assert connection.splice.server is not None
        for transport in (connection.transport, connection.splice.server):
            assert transport is not None
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert await echo_roundtrip(reader, writer, b"x") == b"x"
        await close(writer)


async def test_an_idle_connection_is_closed_after_the_idle_timeout(farm: Farm) -> None:
    async with running_proxy([farm.broker.address], idle_timeout_s=0.3) as proxy:
        reader, writer, _ = await handshake(proxy.port, CR)
        assert await closed_by_peer(reader)
        await close(writer)
        await wait_until(lambda: len(farm.directory.closed) == 1)
    assert farm.directory.closed[0].end_reason == "idle_timeout"


async def test_health_goes_not_serving_and_live_connections_end_with_shutdown(farm: Farm) -> None:
    proxy = ProxyServer(settings([farm.broker.address], shutdown_grace_s=30.0))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(proxy.serve(stop))
        async with asyncio.timeout(10):
            await proxy.ready.wait()
        reader, writer, _ = await handshake(proxy.port, CR)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stop.set()
            await wait_until(lambda: proxy.context.drained is not None)
            status = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The listener is closed, the established connection still works during the grace period.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await echo_roundtrip(reader, writer, b"still here") == b"still here"
        await close(writer)
        async with asyncio.timeout(10):
            await serving
    assert farm.directory.closed[0].end_reason == "client_closed"


async def test_connections_left_at_the_end_of_the_grace_are_closed_and_reported(farm: Farm) -> None:
    async with running_proxy([farm.broker.address], shutdown_grace_s=0.2) as proxy:
        reader, writer, _ = await handshake(proxy.port, CR)
    # running_proxy waited for serve() to return, which flushes the reports.
    assert await closed_by_peer(reader)
    await close(writer)
    assert [c.end_reason for c in farm.directory.closed] == ["shutdown"]
