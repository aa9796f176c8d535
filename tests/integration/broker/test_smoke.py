from __future__ import annotations

from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server


async def test_route_new_then_reconnect(broker, engine):
    await seed(engine, server("10.0.0.1:3389"), server("10.0.0.2:3389"))
    first = await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="alice"))
    assert first.reason == pb.ROUTE_REASON_NEW
    again = await broker.stub.Route(pb.RouteRequest(connection_id="c2", proxy_id="p1", cookie="ALICE"))
    assert again.reason == pb.ROUTE_REASON_RECONNECT
    assert again.server_address == first.server_address
