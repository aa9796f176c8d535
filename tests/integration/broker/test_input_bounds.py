"""Wire inputs that do not fit their PostgreSQL column, and routing tokens, over gRPC on a real database:
each refusal is INVALID_ARGUMENT naming the field (never INTERNAL), each value at the limit is stored."""

from __future__ import annotations

import grpc
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

TOKEN_SERVER = "172.31.249.216:3389"
TOKEN = "3640205228.15629.0000"  # DESIGN §3's example: 172.31.249.216:3389


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_route_inputs_past_their_columns_are_invalid_argument(broker, engine):
    await seed(engine, server(TOKEN_SERVER))
    refused = [
        (pb.RouteRequest(connection_id="c1", cookie="ß" * 200), "case-folded"),  # 400 characters once folded
        (pb.RouteRequest(connection_id="c2", cookie="u", client_address="a" * 256), "client_address"),
        (pb.RouteRequest(connection_id="c" * 129, cookie="u"), "connection_id"),
        (pb.RouteRequest(connection_id="c3", proxy_id="p" * 129, cookie="u"), "proxy_id"),
    ]
    for request, field in refused:
        code, details = await code_of(broker.stub.Route(request))
        assert (code, field in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details

    # At the limits everything fits: 128 'ß' fold to exactly 256 characters.
    at_limit = pb.RouteRequest(
        connection_id="c" * 128, proxy_id="p" * 128, cookie="ß" * 128, client_address="a" * 255
    )
    routed = await broker.stub.Route(at_limit)
    assert (routed.server_address, routed.reason) == (TOKEN_SERVER, pb.ROUTE_REASON_NEW)
    assert routed.user == "ß" * 128


async def test_connection_reports_check_ids_against_their_columns(broker, engine):
    await seed(engine, server(TOKEN_SERVER))
    routed = await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="u"))
    sid = routed.session_id
    op, closed = pb.ConnectionOpenedRequest, pb.ConnectionClosedRequest
    stub = broker.stub
    refused = [
        (stub.ConnectionOpened, op(session_id=sid, connection_id="c" * 129, proxy_id="p"), "connection_id"),
        (stub.ConnectionOpened, op(session_id=sid, connection_id="c1", proxy_id="p" * 129), "proxy_id"),
        (stub.ConnectionOpened, op(session_id=sid, connection_id="c1"), "proxy_id is required"),
        (stub.ConnectionClosed, closed(session_id=sid, connection_id="c" * 129), "connection_id"),
        (stub.ProxyHeartbeat, pb.ProxyHeartbeatRequest(proxy_id="p" * 129), "proxy_id"),
    ]
    for method, request, field in refused:
        code, details = await code_of(method(request))
        assert (code, field in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details

    # The limits themselves are stored.
    long_conn, long_proxy = "c" * 128, "p" * 128
    await broker.stub.ProxyHeartbeat(pb.ProxyHeartbeatRequest(proxy_id=long_proxy))
    await broker.stub.ConnectionOpened(
        pb.ConnectionOpenedRequest(session_id=sid, connection_id=long_conn, proxy_id=long_proxy)
    )
    await broker.stub.ConnectionClosed(pb.ConnectionClosedRequest(session_id=sid, connection_id=long_conn))
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="u"))
    assert [(s.session_id, s.state) for s in found.sessions] == [(sid, pb.SESSION_STATE_DISCONNECTED)]


@pytest.mark.parametrize("token", ["192.168.1.10", "123.456.abc", "10.0.0.5", "vendor:opaque"])
async def test_tokens_not_in_microsofts_form_are_opaque(broker, engine, token):
    """DESIGN §3: another product's value is tolerated and placed by cookie and policy, never an address."""
    await seed(engine, server(TOKEN_SERVER))
    routed = await broker.stub.Route(pb.RouteRequest(connection_id="c1", cookie="kim", routing_token=token))
    assert (routed.server_address, routed.reason) == (TOKEN_SERVER, pb.ROUTE_REASON_NEW)
    again = await broker.stub.Route(pb.RouteRequest(connection_id="c2", cookie="kim", routing_token=token))
    assert (again.session_id, again.reason) == (routed.session_id, pb.ROUTE_REASON_RECONNECT)


@pytest.mark.parametrize("token", ["0.15629.0000", "4294967296.15629.0000", "3640205228.70000.0000"])
async def test_ms_shaped_tokens_out_of_range_are_invalid_argument(broker, engine, token):
    await seed(engine, server(TOKEN_SERVER))
    code, details = await code_of(broker.stub.Route(pb.RouteRequest(connection_id="c1", routing_token=token)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "routing token" in details


async def test_the_design_token_routes_to_its_server_idempotently(broker, engine):
    await seed(engine, server(TOKEN_SERVER), server("10.0.0.2:3389"))
    request = pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="kim", routing_token=TOKEN)
    routed = await broker.stub.Route(request)
    assert (routed.server_address, routed.reason) == (TOKEN_SERVER, pb.ROUTE_REASON_TOKEN)
    retried = await broker.stub.Route(request)
    assert retried == routed  # same session, nothing created
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="kim"))
    assert [s.session_id for s in found.sessions] == [routed.session_id]
