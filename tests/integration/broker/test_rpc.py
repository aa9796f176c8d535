"""The gRPC edge and REST endpoints of a broker served in-process: status codes, messages, conversions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import update

from rdbroker_broker.db.tables import servers as servers_table
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

A, B = "10.0.0.1:3389", "10.0.0.2:3389"


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (pb.RouteRequest(connection_id="c", cookie="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "cookie"),
        (pb.RouteRequest(connection_id="c", cookie="bob\x07"), grpc.StatusCode.INVALID_ARGUMENT, "control"),
        (
            pb.RouteRequest(connection_id="c", routing_token="0.15629.0000"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "token",
        ),
        (pb.RouteRequest(connection_id=""), grpc.StatusCode.INVALID_ARGUMENT, "connection_id"),
        (pb.RouteRequest(connection_id="c", pool="Nope"), grpc.StatusCode.NOT_FOUND, "unknown pool"),
        (
            pb.RouteRequest(connection_id="c", routing_token="3640205228.15629.0000"),
            grpc.StatusCode.PERMISSION_DENIED,
            "not a registered server",
        ),
    ],
)
async def test_route_errors_have_their_status_codes(broker, engine, request_, code, text):
    await seed(engine, server(A))
    got, details = await code_of(broker.stub.Route(request_))
    assert got == code
    assert text in details


async def test_no_capacity_is_resource_exhausted(broker, engine):
    await seed(engine, server(A))
    await broker.stub.SetServerState(pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_DRAINING))
    got, details = await code_of(broker.stub.Route(pb.RouteRequest(connection_id="c", cookie="u")))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 draining" in details


async def test_session_lifecycle_over_grpc(broker, engine):
    await seed(engine, server(A), server(B))
    routed = await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="CORP\\Kim"))
    assert routed.reason == pb.ROUTE_REASON_NEW
    assert (routed.user, routed.pool) == ("CORP\\Kim", "default")
    retried = await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="CORP\\Kim"))
    assert retried == routed

    await broker.stub.ConnectionOpened(
        pb.ConnectionOpenedRequest(session_id=routed.session_id, connection_id="c1", proxy_id="p1")
    )
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="corp\\kim"))
    assert [(s.session_id, s.state) for s in found.sessions] == [(routed.session_id, pb.SESSION_STATE_ACTIVE)]
    assert not found.sessions[0].HasField("expires_at")

    await broker.stub.ConnectionClosed(
        pb.ConnectionClosedRequest(
            session_id=routed.session_id,
            connection_id="c1",
            bytes_from_client=10,
            bytes_from_server=6308,
            end_reason="client_closed",
        )
    )
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="CORP\\KIM"))
    assert found.sessions[0].state == pb.SESSION_STATE_DISCONNECTED
    assert found.sessions[0].HasField("expires_at")

    assert found.sessions[0].confirmed is False  # a claim: no agent has listed it
    servers = await broker.stub.ListServers(pb.ListServersRequest())
    live = {s.address: s.live_sessions for s in servers.servers}
    assert live[routed.server_address] == 1
    assert all(s.health == pb.HEALTH_STATE_UNKNOWN and s.load == -1 for s in servers.servers)
    assert not any(s.stale or s.HasField("probed_at") for s in servers.servers)  # never probed
    # Disconnected and unconfirmed: it keeps its server but holds no capacity there.
    held = {s.address: s.held_sessions for s in servers.servers}
    assert held[routed.server_address] == 0

    ended = await broker.stub.EndSession(pb.EndSessionRequest(session_id=routed.session_id))
    assert ended.session.state == pb.SESSION_STATE_ENDED
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="CORP\\Kim"))
    assert list(found.sessions) == []


async def test_list_servers_shows_a_stale_result_as_unknown_with_its_time(broker, engine):
    await seed(engine, server(A), server(B))
    now = datetime.now(UTC).replace(microsecond=0)
    async with engine.begin() as conn:
        for address, probed, fresh_until in ((A, now - timedelta(minutes=5), now - timedelta(minutes=4)),
                                             (B, now, now + timedelta(hours=1))):  # fmt: skip
            await conn.execute(
                update(servers_table)
                .where(servers_table.c.address == address)
                .values(health="down", load=50, agent_state="up", probed_at=probed, fresh_until=fresh_until)
            )
    listed = {s.address: s for s in (await broker.stub.ListServers(pb.ListServersRequest())).servers}
    assert (listed[A].health, listed[A].load, listed[A].stale) == (pb.HEALTH_STATE_UNKNOWN, -1, True)
    assert listed[A].probed_at.ToDatetime(tzinfo=UTC) == now - timedelta(minutes=5)
    assert (listed[B].health, listed[B].load, listed[B].stale) == (pb.HEALTH_STATE_DOWN, 50, False)


async def test_unknown_ids_are_not_found(broker, engine):
    await seed(engine, server(A))
    for call in (
        broker.stub.EndSession(pb.EndSessionRequest(session_id="nope")),
        broker.stub.ConnectionOpened(
            pb.ConnectionOpenedRequest(session_id="nope", connection_id="c", proxy_id="p")
        ),
        broker.stub.SetServerState(
            pb.SetServerStateRequest(address="1.2.3.4:3389", admin_state=pb.ADMIN_STATE_ENABLED)
        ),
        broker.stub.ListServers(pb.ListServersRequest(pool="Nope")),
    ):
        assert (await code_of(call))[0] == grpc.StatusCode.NOT_FOUND
    got, _ = await code_of(broker.stub.SetServerState(pb.SetServerStateRequest(address=A)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT


async def test_heartbeat_answers_the_interval(broker):
    answer = await broker.stub.ProxyHeartbeat(pb.ProxyHeartbeatRequest(proxy_id="p1", active_connections=3))
    assert answer.heartbeat_interval_ms == 5000
    got, _ = await code_of(broker.stub.ProxyHeartbeat(pb.ProxyHeartbeatRequest()))
    assert got == grpc.StatusCode.INVALID_ARGUMENT


async def test_standard_health_service_and_rest(broker, engine):
    await seed(engine, server(A))
    health = health_pb2_grpc.HealthStub(broker.channel)
    for name in ("", "rdbroker.v1.Broker"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    await broker.stub.Route(pb.RouteRequest(connection_id="c1", cookie="CORP\\Lee"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        body = (await client.get("/v1/users/corp%5Clee/sessions")).json()
        assert [(s["user"], s["server_address"], s["state"]) for s in body["sessions"]] == [
            ("CORP\\Lee", A, "pending")
        ]
        assert (await client.get("/v1/users/x/sessions", params={"pool": "Nope"})).status_code == 404


async def test_an_unreachable_database_is_unavailable(pg_database_url):
    from rdbroker_broker.db.engine import make_engine
    from rdbroker_broker.domain import RouteRequest
    from rdbroker_broker.errors import Unavailable
    from rdbroker_broker.rest.app import create_app
    from rdbroker_broker.service import BrokerService
    from rdbroker_broker.store import Store
    from tests.integration.broker.conftest import settings_for

    engine = make_engine("postgresql://postgres@127.0.0.1:1/nope?connect_timeout=2")
    service = BrokerService(Store(engine), settings_for(pg_database_url))
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await service.route(RouteRequest("c", cookie="u"))
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            assert (await client.get("/readyz")).status_code == 200  # readiness is the process's
            assert (await client.get("/v1/users/u/sessions")).status_code == 503
            assert (await client.get("/v1/status")).json()["database"]["state"] == "down"
    finally:
        await engine.dispose()
