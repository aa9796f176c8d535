"""Proxies and health replicas send their role's token to a broker that requires tokens (in-process, on
PostgreSQL): a user is routed through the proxy, a health replica's probe results land; a wrong token is
refused and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from rdbroker_common import rpc_authz
from rdbroker_health import app as health_app
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import running_broker, seed, server, settings_for
from tests.unit.health.support import ProbeLog, fast_settings
from tests.unit.proxy.support import (
    LOGON,
    close,
    closed_by_peer,
    handshake,
    open_client,
    running_proxy,
    wait_until,
)

TOKENS = {"proxy": "proxy-token-1", "health": "health-token-2", "admin": "admin-token-3"}
SERVICE = "rdbroker.v1.Broker"
TIMEOUT_S = 10.0
REASONS = (rpc_authz.NO_CREDENTIALS, rpc_authz.BAD_TOKEN, rpc_authz.WRONG_ROLE)


def with_tokens(url: str) -> Any:
    return settings_for(url, **{f"grpc_{role}_token": SecretStr(token) for role, token in TOKENS.items()})


def admin() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS['admin']}")]


def refused(reason: str, rpc: str) -> int:
    return rpc_authz.refused_count(reason, f"{SERVICE}/{rpc}")


async def route_alice(proxy_port: int) -> None:
    reader, writer, _ = await handshake(
        proxy_port, build_connection_request(cookie="alice", requested_protocols=3)
    )
    writer.write(LOGON)
    async with asyncio.timeout(TIMEOUT_S):
        assert await reader.readexactly(len(LOGON)) == LOGON
    await close(writer)


@pytest.mark.parametrize("source", ["env", "file"])
async def test_a_proxy_with_its_token_routes_a_user_through_the_broker(
    pg_database_url: str, engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    overrides: dict[str, Any] = {}
    if source == "env":
        monkeypatch.setenv("RDBROKER_BROKER_TOKEN", TOKENS["proxy"])
    else:
        (tmp_path / "token").write_text(TOKENS["proxy"] + "\n")
        overrides["broker_token_file"] = str(tmp_path / "token")
    rpcs = ("Route", "RouteStream", "ReportConnections")
    before = {rpc: refused(reason, rpc) for rpc in rpcs for reason in REASONS}
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        async with running_broker(with_tokens(pg_database_url)) as broker:
            async with running_proxy([f"127.0.0.1:{broker.grpc_port}"], **overrides) as proxy:
                await route_alice(proxy.port)
                await wait_until(lambda: not proxy.context.connections)
                assert proxy.broker is not None
                await wait_until(lambda: proxy.broker is not None and proxy.broker.sent_reports == 2)
                assert proxy.broker.rejected_reports == 0
            found = await broker.stub.LookupUserSessions(
                pb.LookupUserSessionsRequest(user="alice"), metadata=admin(), timeout=TIMEOUT_S
            )
    assert len(rdp.first_packets) == 1
    [session] = found.sessions
    assert session.server_address == rdp.address
    assert session.state == pb.SESSION_STATE_DISCONNECTED  # opened, then closed: both reports arrived
    assert before == {rpc: refused(reason, rpc) for rpc in rpcs for reason in REASONS}


@pytest.mark.parametrize(
    ("token", "reason"), [(None, "no_credentials"), ("wrong", "bad_token"), (TOKENS["health"], "wrong_role")]
)
async def test_a_proxy_without_the_proxy_token_routes_nobody(
    pg_database_url: str, engine: Any, token: str | None, reason: str
) -> None:
    overrides = {} if token is None else {"broker_token": SecretStr(token)}
    before = refused(reason, "Route"), refused(reason, "RouteStream")
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        async with (
            running_broker(with_tokens(pg_database_url)) as broker,
            running_proxy([f"127.0.0.1:{broker.grpc_port}"], **overrides) as proxy,
        ):
            reader, writer = await open_client(proxy.port)
            writer.write(build_connection_request(cookie="alice", requested_protocols=3))
            assert await closed_by_peer(reader)
            await close(writer)
    assert rdp.accepted == 0
    # Refused on the proxy's RouteStream, as a refused token would be on any call: no unary retry.
    assert (refused(reason, "Route"), refused(reason, "RouteStream")) == (before[0], before[1] + 1)


async def test_a_health_replica_with_its_token_claims_and_reports(pg_database_url: str, engine: Any) -> None:
    address = "10.9.9.9:3389"
    await seed(engine, server(address))
    async with running_broker(with_tokens(pg_database_url)) as broker:
        probes = ProbeLog()
        settings = fast_settings(f"127.0.0.1:{broker.grpc_port}", broker_token=SecretStr(TOKENS["health"]))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            health_app.run(settings, stop, probe_rdp=probes.probe_for("h1"))
        )
        try:

            async def health() -> int:
                listed = await broker.stub.ListServers(
                    pb.ListServersRequest(), metadata=admin(), timeout=TIMEOUT_S
                )
                return int(listed.servers[0].health)

            for _ in range(200):  # bounded: rise 2 at 0.2 s intervals takes well under a second
                if await health() == pb.HEALTH_STATE_UP:
                    break
                await asyncio.sleep(0.05)
            assert await health() == pb.HEALTH_STATE_UP
            assert probes.by(address)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def test_a_health_replica_with_a_wrong_token_reports_nothing(pg_database_url: str, engine: Any) -> None:
    await seed(engine, server("10.9.9.9:3389"))
    before = refused("bad_token", "ClaimProbeTargets")
    async with running_broker(with_tokens(pg_database_url)) as broker:
        probes = ProbeLog()
        settings = fast_settings(f"127.0.0.1:{broker.grpc_port}", broker_token=SecretStr("wrong"))
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            health_app.run(settings, stop, probe_rdp=probes.probe_for("h1"))
        )
        try:
            await wait_until(lambda: refused("bad_token", "ClaimProbeTargets") > before)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        listed = await broker.stub.ListServers(pb.ListServersRequest(), metadata=admin(), timeout=TIMEOUT_S)
    assert not probes.calls  # nothing claimed, nothing probed
    assert listed.servers[0].health == pb.HEALTH_STATE_UNKNOWN


async def test_the_open_broker_ignores_a_token(pg_database_url: str, engine: Any) -> None:
    """A proxy configured with a token still works against a broker without tokens (rolling out tokens
    starts with the clients)."""
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        async with (
            running_broker(settings_for(pg_database_url)) as broker,
            running_proxy([f"127.0.0.1:{broker.grpc_port}"], broker_token=SecretStr("some-token")) as proxy,
        ):
            await route_alice(proxy.port)
    assert len(rdp.first_packets) == 1
