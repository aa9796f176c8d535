"""The broker's telemetry: Route continues the caller's trace down to its database statements, REST
calls are traced, and the Prometheus endpoint serves route counts, route latency and sessions by state."""

from __future__ import annotations

import grpc
import httpx
import pytest
from opentelemetry import trace

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_rdp import encode_routing_token
from tests.integration.broker.conftest import seed, server
from tests.integration.observability.conftest import eventually
from tests.support import prom

A = "10.0.8.1:3389"


def spans_of(exporter, trace_id: int) -> list:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


async def test_route_is_one_trace_down_to_the_database_statements(broker, engine, telemetry):
    _, exporter = telemetry
    await seed(engine, server(A))
    exporter.clear()
    with trace.get_tracer("test").start_as_current_span("rdp.connection") as root:
        routed = await broker.stub.Route(
            pb.RouteRequest(connection_id="t1", proxy_id="p1", cookie="CORP\\ot")
        )
    assert routed.server_address == A
    spans = spans_of(exporter, root.get_span_context().trace_id)
    by_id = {s.context.span_id: s for s in spans}
    [client] = [s for s in spans if s.name == "rdbroker.v1.Broker/Route" and s.kind == trace.SpanKind.CLIENT]
    [served] = [s for s in spans if s.name == "rdbroker.v1.Broker/Route" and s.kind == trace.SpanKind.SERVER]
    assert client.parent.span_id == root.get_span_context().span_id
    assert served.parent.span_id == client.context.span_id
    statements = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert statements, "Route's database statements are not in its trace"
    for span in statements:
        assert span.kind == trace.SpanKind.CLIENT
        assert 0 < len(span.attributes["db.statement"]) <= 1000
        # Each statement hangs under the broker's server span (directly or through another span).
        parent = span.parent
        while parent is not None and parent.span_id != served.context.span_id:
            parent = by_id[parent.span_id].parent
        assert parent is not None
    # No user name leaks into a statement's attributes (parameters are never recorded).
    assert all("CORP\\ot" not in str(s.attributes) for s in statements)


async def test_statements_outside_a_trace_make_no_spans(broker, engine, telemetry):
    _, exporter = telemetry
    await seed(engine, server(A))
    exporter.clear()
    await broker.stub.Route(pb.RouteRequest(connection_id="t2", proxy_id="p1", cookie="CORP\\nt"))
    # The gRPC server span is a root of its own; statements still hang under it, none is a root.
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots] == ["rdbroker.v1.Broker/Route"]


async def test_rest_calls_are_traced_under_their_route_template(broker, engine, telemetry):
    _, exporter = telemetry
    exporter.clear()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as client:
        await client.get("/v1/users/CORP%5Cot/sessions")
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    # One span for the call; none for the probes, none per dependency or serialization step.
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("fastapi.")]
    [served] = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert served.name == "GET /v1/users/{user}/sessions"
    assert served.attributes["http.route"] == "/v1/users/{user}/sessions"
    statements = [
        s
        for s in spans_of(exporter, served.context.trace_id)
        if s.attributes.get("db.system") == "postgresql"
    ]
    assert statements, "the REST call's database statements are not in its trace"


def routes(port: int, **labels: str) -> float:
    return prom.sample(prom.scrape(port), "rdbroker_routes_total", **labels) or 0.0


async def test_route_counts_and_latency_move_with_routing(broker, engine, telemetry):
    handle, _ = telemetry
    port = handle.metrics_port
    await seed(engine, server(A))
    new, reconnect = routes(port, reason="new", outcome="ok"), routes(port, reason="reconnect", outcome="ok")
    missing = routes(port, outcome="NOT_FOUND")
    timed = prom.sample(prom.scrape(port), "rdbroker_route_duration_seconds_count") or 0.0

    await broker.stub.Route(pb.RouteRequest(connection_id="m1", proxy_id="p1", cookie="CORP\\mo"))
    await broker.stub.Route(pb.RouteRequest(connection_id="m2", proxy_id="p1", cookie="CORP\\mo"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.stub.Route(pb.RouteRequest(connection_id="m3", pool="nope", cookie="CORP\\mo"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    assert routes(port, reason="new", outcome="ok") == new + 1
    assert routes(port, reason="reconnect", outcome="ok") == reconnect + 1
    assert routes(port, reason="none", outcome="NOT_FOUND") == missing + 1
    text = prom.scrape(port)
    assert prom.sample(text, "rdbroker_route_duration_seconds_count") == timed + 3
    assert prom.sample(text, "rdbroker_route_duration_seconds_bucket", le="+Inf") == timed + 3


async def test_routing_tokens_are_counted_by_outcome(broker, engine, telemetry):
    handle, _ = telemetry
    port = handle.metrics_port

    def tokens(outcome: str) -> float:
        return prom.sample(prom.scrape(port), "rdbroker_routing_tokens_total", outcome=outcome) or 0.0

    await seed(engine, server(A), server("10.0.8.2:3389"))
    to_a = encode_routing_token("10.0.8.1", 3389)
    outcomes = ("honoured", "ignored_policy", "unknown_server")
    before = {outcome: tokens(outcome) for outcome in outcomes}
    await broker.stub.Route(
        pb.RouteRequest(connection_id="k1", proxy_id="p1", cookie="ko", routing_token=to_a)
    )
    await broker.stub.SetServerState(pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_DRAINING))
    await broker.stub.Route(
        pb.RouteRequest(connection_id="k2", proxy_id="p1", cookie="lo", routing_token=to_a)
    )
    nowhere = encode_routing_token("192.0.2.9", 3389)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.stub.Route(pb.RouteRequest(connection_id="k3", cookie="mo", routing_token=nowhere))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {outcome: tokens(outcome) - before[outcome] for outcome in outcomes} == dict.fromkeys(outcomes, 1)


async def test_sessions_by_state_follow_the_directory(broker, engine, telemetry):
    handle, _ = telemetry
    port = handle.metrics_port
    await seed(engine, server(A))

    def sessions(state: str, want: float):
        value = prom.sample(prom.scrape(port), "rdbroker_sessions", state=state)
        return value if value == want else None

    assert await eventually(lambda: sessions("pending", 0)) == 0
    routed = await broker.stub.Route(pb.RouteRequest(connection_id="s1", proxy_id="p1", cookie="CORP\\so"))
    assert await eventually(lambda: sessions("pending", 1)) == 1
    await broker.stub.ConnectionOpened(
        pb.ConnectionOpenedRequest(session_id=routed.session_id, connection_id="s1", proxy_id="p1")
    )
    assert await eventually(lambda: sessions("active", 1)) == 1
    assert await eventually(lambda: sessions("pending", 0)) == 0
    await broker.stub.ConnectionClosed(
        pb.ConnectionClosedRequest(
            session_id=routed.session_id,
            connection_id="s1",
            bytes_from_server=6308,
            end_reason="client_closed",
        )
    )
    assert await eventually(lambda: sessions("disconnected", 1)) == 1
    assert prom.sample(prom.scrape(port), "rdbroker_sessions", state="active") == 0
