"""Failover on the first try through the real proxy and a real broker process on PostgreSQL, with fake
RDP servers: a user whose server died lands elsewhere on their one connection; a server only the
proxy cannot reach keeps its user's session; a dead token target is placed by policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from rdbroker_proxy.connection import ClientConnection
from rdbroker_rdp import build_connection_request, encode_routing_token
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.processes import BrokerProcess, running_broker
from tests.integration.proxy.test_with_broker import declare_farm
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

ALICE = build_connection_request(cookie="alice", requested_protocols=3)


@dataclass
class Farm:
    url: str
    servers: list[FakeRdpServer]
    broker: BrokerProcess

    def rows(self, sql: str, *params: object) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return list(conn.execute(sql, params).fetchall())

    def sessions(self, user: str) -> list[tuple[str, str, str]]:
        """(server, state, end_reason) of every session of `user`, oldest first."""
        return [
            (r[0], r[1], r[2])
            for r in self.rows(
                'SELECT server_address, state, end_reason FROM sessions WHERE "user" = %s '
                "ORDER BY created_at",
                user,
            )
        ]

    def health(self, address: str) -> tuple[str, str]:
        [(health, detail)] = self.rows(
            "SELECT health, health_detail FROM servers WHERE address = %s", address
        )
        return health, detail


@pytest.fixture
async def farm(pg_database_url: str, tmp_path: Path) -> AsyncIterator[Farm]:
    async with FakeRdpServer(mode="echo") as a, FakeRdpServer(mode="echo") as b:
        declare_farm(pg_database_url, tmp_path, a, b)
        async with running_broker(pg_database_url, "--failover-probe-timeout-ms", "500") as broker:
            yield Farm(pg_database_url, [a, b], broker)


async def log_on_and_leave(farm: Farm, proxy, packet: bytes = ALICE) -> FakeRdpServer:
    """One logon through the proxy, then the client leaves; answers the server it landed on, once the
    directory has the session disconnected."""
    reader, writer, _ = await handshake(proxy.port, packet)
    writer.write(LOGON)
    async with asyncio.timeout(10):
        assert await reader.readexactly(len(LOGON)) == LOGON
    await close(writer)
    [home] = [s for s in farm.servers if s.first_packets]
    await wait_until(lambda: farm.sessions("alice") == [(home.address, "disconnected", "")])
    return home


async def test_a_user_whose_server_died_lands_elsewhere_on_the_first_try(farm: Farm) -> None:
    async with running_proxy([farm.broker.grpc_address]) as proxy:
        home = await log_on_and_leave(farm, proxy)
        [other] = [s for s in farm.servers if s is not home]
        await home.stop()  # the server dies while its user is away

        accepted_before = proxy.context.accepted
        reader, writer, _ = await handshake(proxy.port, ALICE)  # one client connection
        writer.write(b"back")
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"back"
        assert proxy.context.accepted == accepted_before + 1
        assert other.first_packets == [ALICE]
        await close(writer)
    assert farm.sessions("alice")[0] == (home.address, "ended", "server_down")
    assert farm.sessions("alice")[1][0] == other.address
    health, detail = farm.health(home.address)
    assert (health, detail) == ("down", "failover probe: connection refused")


async def test_a_server_only_the_proxy_cannot_reach_keeps_its_user(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_proxy([farm.broker.grpc_address], route_timeout_s=1.5) as proxy:
        home = await log_on_and_leave(farm, proxy)
        refused = f"127.0.0.1:{free_port()}"
        real = ClientConnection._connect

        async def cut_off(self: ClientConnection, address: str):
            # Between this proxy and that server only: its connect goes to a closed port instead.
            return await real(self, refused if address == home.address else address)

        monkeypatch.setattr(ClientConnection, "_connect", cut_off)
        probes_before = home.accepted
        reader, writer = await open_client(proxy.port)
        writer.write(ALICE)
        assert await closed_by_peer(reader)  # a clean close: no Confirm, nothing else
        await close(writer)
        await wait_until(lambda: not proxy.context.connections)
    assert home.accepted > probes_before  # the broker's probes reached it
    assert [b"mstshash" in p for p in home.first_packets] == [True] + [False] * (len(home.first_packets) - 1)
    assert farm.sessions("alice") == [(home.address, "disconnected", "")]
    assert farm.health(home.address)[0] != "down"
    assert not next(s for s in farm.servers if s is not home).first_packets


async def test_a_dead_token_target_is_placed_by_policy(farm: Farm, tmp_path: Path) -> None:
    target = FakeRdpServer()
    await target.start()
    declare_farm(farm.url, tmp_path, *farm.servers, target)
    await target.stop()  # the server the token names has died
    dead_port = target.port
    dead = target.address
    packet = build_connection_request(
        cookie="carol", routing_token=encode_routing_token("127.0.0.1", dead_port), requested_protocols=3
    )
    async with running_proxy([farm.broker.grpc_address]) as proxy:
        reader, writer, _ = await handshake(proxy.port, packet)
        writer.write(LOGON)
        async with asyncio.timeout(10):
            assert await reader.readexactly(len(LOGON)) == LOGON
        await close(writer)
    assert [len(s.first_packets) for s in farm.servers].count(1) == 1
    assert farm.health(dead)[0] == "down"
    assert [(server, state) for server, state, _ in farm.sessions("carol")] == [
        (dead, "ended"),
        *[(s.address, "disconnected") for s in farm.servers if s.first_packets],
    ]
