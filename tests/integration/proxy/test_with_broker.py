"""The proxy against real broker processes on a real PostgreSQL (two replicas over one database)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1.broker_pb2_grpc import BrokerStub
from rdbroker_rdp import build_connection_request, encode_routing_token
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.processes import BrokerProcess, running_broker
from tests.support import prom
from tests.support.postgres import free_port
from tests.unit.proxy.support import (
    LOGON,
    close,
    closed_by_peer,
    handshake,
    open_client,
    running_proxy,
    wait_until,
)


def cli(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_cli", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def declare_farm(database_url: str, tmp_path: Path, *servers: FakeRdpServer) -> None:
    """Migrate the database and apply a farm of `servers` in the default pool, with the CLI."""
    farm_file = tmp_path / "farm.yaml"
    farm_file.write_text(
        "pools:\n  - name: default\n    default: true\n    disconnect_timeout: 1h\nservers:\n"
        + "".join(f"  - address: {s.address}\n    pool: default\n" for s in servers),
        encoding="utf-8",
    )
    cli("migrate", "--database-url", database_url)
    cli("apply", "-f", str(farm_file), "--database-url", database_url)


@dataclass
class RealFarm:
    servers: list[FakeRdpServer]
    brokers: list[BrokerProcess]

    async def sessions(self, user: str) -> list[pb.Session]:
        async with grpc.aio.insecure_channel(self.brokers[-1].grpc_address) as channel:
            answer = await BrokerStub(channel).LookupUserSessions(
                pb.LookupUserSessionsRequest(user=user, include_ended=True), timeout=10
            )
        return list(answer.sessions)


@pytest.fixture
async def real_farm(pg_database_url: str, tmp_path: Path) -> AsyncIterator[RealFarm]:
    async with FakeRdpServer(mode="echo") as a, FakeRdpServer(mode="echo") as b:
        declare_farm(pg_database_url, tmp_path, a, b)
        async with running_broker(pg_database_url) as one, running_broker(pg_database_url) as two:
            yield RealFarm([a, b], [one, two])


async def test_a_user_comes_back_to_the_same_server_through_the_real_broker(real_farm: RealFarm) -> None:
    packet = build_connection_request(cookie="alice", requested_protocols=3)
    brokers = [b.grpc_address for b in real_farm.brokers]
    async with running_proxy(brokers) as proxy:
        reader, writer, _ = await handshake(proxy.port, packet)
        logon = bytes(range(256)) * 16  # more than junk_bytes back from the server: a session to keep
        writer.write(logon)
        async with asyncio.timeout(10):
            assert await reader.readexactly(len(logon)) == logon
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
        await wait_until(lambda: proxy.broker is not None and proxy.broker.pending_reports == 0)
        _, writer, _ = await handshake(proxy.port, packet)
        await close(writer)
    landed = [s for s in real_farm.servers if s.first_packets]
    assert len(landed) == 1
    assert landed[0].first_packets == [packet, packet]
    [session] = await real_farm.sessions("alice")
    assert session.server_address == landed[0].address


async def test_a_token_routes_to_a_registered_server_and_not_elsewhere(real_farm: RealFarm) -> None:
    target = real_farm.servers[1]
    good = build_connection_request(routing_token=encode_routing_token("127.0.0.1", target.port))
    bad = build_connection_request(routing_token=encode_routing_token("127.0.0.1", free_port()))
    async with running_proxy([b.grpc_address for b in real_farm.brokers]) as proxy:
        _, writer, _ = await handshake(proxy.port, good)
        await close(writer)
        reader, writer = await open_client(proxy.port)
        writer.write(bad)
        assert await closed_by_peer(reader)
        await close(writer)
    assert target.first_packets == [good]
    assert real_farm.servers[0].accepted == 0


async def test_a_crafted_token_to_a_draining_server_does_not_land_a_new_user_there(
    real_farm: RealFarm,
) -> None:
    home, draining = real_farm.servers
    async with grpc.aio.insecure_channel(real_farm.brokers[0].grpc_address) as channel:
        await BrokerStub(channel).SetServerState(
            pb.SetServerStateRequest(address=draining.address, admin_state=pb.ADMIN_STATE_DRAINING),
            timeout=10,
        )
    token = encode_routing_token("127.0.0.1", draining.port)
    crafted = build_connection_request(cookie="mallory", routing_token=token, requested_protocols=3)
    async with running_proxy([b.grpc_address for b in real_farm.brokers]) as proxy:
        _, writer, _ = await handshake(proxy.port, crafted)
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
    # Placed by policy on the server that takes new users; the draining one never heard of it.
    assert home.first_packets == [crafted]
    assert draining.accepted == 0
    assert [s.server_address for s in await real_farm.sessions("mallory")] == [home.address]


async def test_a_killed_broker_is_routed_around_and_every_user_has_one_session(real_farm: RealFarm) -> None:
    users = [f"user{i:02d}" for i in range(40)]
    done: list[str] = []
    brokers = [b.grpc_address for b in real_farm.brokers]
    async with running_proxy(
        brokers, route_timeout_s=10.0, route_attempt_timeout_s=3.0, max_routing_per_client=0
    ) as proxy:

        async def connect(user: str) -> None:
            packet = build_connection_request(cookie=user, requested_protocols=3)
            _, writer, _ = await handshake(proxy.port, packet)
            await close(writer)
            done.append(user)

        async with asyncio.TaskGroup() as tg:
            for i, user in enumerate(users):
                if i == 15:
                    real_farm.brokers[0].kill()  # SIGKILL, with Routes in flight
                tg.create_task(connect(user))
                await asyncio.sleep(0.01)
        await wait_until(lambda: proxy.broker is not None and proxy.broker.pending_reports == 0)
    assert sorted(done) == users
    for user in users:
        sessions = await real_farm.sessions(user)
        assert len(sessions) == 1, (user, sessions)
    assert sum(len(s.first_packets) for s in real_farm.servers) == len(users)


async def test_a_logon_storm_on_an_overloaded_broker_routes_everyone_once(
    pg_database_url: str, tmp_path: Path
) -> None:
    """A broker with one database connection and room for one waiting call refuses most of a storm of
    logons (UNAVAILABLE, overloaded); the proxy tries again, and every user gets through, once."""
    users = [f"storm{i:03d}" for i in range(80)]
    metrics_port = free_port()
    async with FakeRdpServer(mode="echo") as a, FakeRdpServer(mode="echo") as b:
        declare_farm(pg_database_url, tmp_path, a, b)
        overloaded = (
            "--db-pool-size",
            "1",
            "--db-max-waiting",
            "1",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        )
        async with running_broker(pg_database_url, *overloaded) as broker:
            farm = RealFarm([a, b], [broker])
            async with running_proxy(
                [broker.grpc_address], route_timeout_s=30.0, max_routing_per_client=0
            ) as proxy:

                async def logon(user: str) -> None:
                    packet = build_connection_request(cookie=user, requested_protocols=3)
                    _, writer, _ = await handshake(proxy.port, packet)
                    await close(writer)

                async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
                    for user in users:
                        tg.create_task(logon(user))
                await wait_until(lambda: proxy.broker is not None and proxy.broker.pending_reports == 0)
            refused = prom.sample(prom.scrape(metrics_port), "rdbroker_calls_refused_total") or 0.0
            assert refused > 0  # the storm did overload it
            for user in users:
                assert len(await farm.sessions(user)) == 1, user
    assert len(a.first_packets) + len(b.first_packets) == len(users)


@pytest.mark.parametrize("domain", ["", "CORP"])
async def test_one_account_under_two_spellings_lands_on_one_server(
    real_farm: RealFarm, pg_database_url: str, domain: str
) -> None:
    """mstsc sends `CORP\\bob`, FreeRDP `bob`: one account, one server, one live session, with the
    pool's `domain` set (one key) and without (bare and qualified names find each other)."""
    if domain:
        async with await psycopg.AsyncConnection.connect(pg_database_url, autocommit=True) as conn:
            await conn.execute("UPDATE pools SET domain = %s, upn_suffixes = 'corp.example.com'", (domain,))
    brokers = [b.grpc_address for b in real_farm.brokers]
    packets = [build_connection_request(cookie=c, requested_protocols=3) for c in ("CORP\\bob", "bob")]
    async with running_proxy(brokers) as proxy:
        for packet in packets:
            reader, writer, _ = await handshake(proxy.port, packet)
            writer.write(LOGON)  # a logon's worth of bytes: the session is kept when it closes
            assert await asyncio.wait_for(reader.readexactly(len(LOGON)), 10) == LOGON
            await close(writer)
            await wait_until(lambda: not proxy.context.connections)
            await wait_until(lambda: proxy.broker is not None and proxy.broker.pending_reports == 0)
    landed = [s for s in real_farm.servers if s.first_packets]
    assert len(landed) == 1
    assert landed[0].first_packets == packets
    for name in ("CORP\\bob", "bob", "bob@corp.example.com" if domain else "corp\\BOB"):
        live = [s for s in await real_farm.sessions(name) if s.state != pb.SESSION_STATE_ENDED]
        assert [s.server_address for s in live] == [landed[0].address], name
