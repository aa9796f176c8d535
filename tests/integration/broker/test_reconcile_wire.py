"""ReportServerSessions over gRPC answers every count, ambiguous truncated cookies included."""

from __future__ import annotations

from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

A = "10.0.3.1:3389"


async def test_ambiguous_truncated_cookie_is_counted_on_the_wire(broker, engine):
    await seed(engine, server(A))
    claimed = await broker.stub.ClaimProbeTargets(
        pb.ClaimProbeTargetsRequest(replica_id="r1", lease_ms=60_000)
    )
    assert [t.address for t in claimed.targets] == [A]
    routed = await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="CORP\\anna"))
    await broker.stub.ConnectionOpened(
        pb.ConnectionOpenedRequest(session_id=routed.session_id, connection_id="c1", proxy_id="p1")
    )
    reported = [
        pb.ReportedSession(user="CORP\\annabeth", state=pb.SESSION_STATE_ACTIVE),
        pb.ReportedSession(user="CORP\\annabel", state=pb.SESSION_STATE_ACTIVE),
    ]
    answer = await broker.stub.ReportServerSessions(
        pb.ReportServerSessionsRequest(replica_id="r1", address=A, sessions=reported)
    )
    assert (answer.ambiguous, answer.linked, answer.ended) == (1, 0, 0)
    assert answer.recorded == 2  # the two full names the directory did not know
