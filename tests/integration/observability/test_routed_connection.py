"""A routed RDP connection, proxy and broker in this process (sharing its telemetry): one trace from the
proxy's `rdp.connection` span through Route in the broker to its database statements, and the proxy's
and broker's metrics moving on the Prometheus endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry import trace

from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp import build_connection_request
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.integration.broker.conftest import seed, server
from tests.integration.observability.conftest import eventually
from tests.support import prom
from tests.unit.proxy.support import close, handshake, settings

ROUTE = "rdbroker.v1.Broker/Route"


@asynccontextmanager
async def proxy_for(grpc_port: int, **overrides: object) -> AsyncIterator[ProxyServer]:
    proxy = ProxyServer(settings([f"127.0.0.1:{grpc_port}"], **overrides))
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(proxy.serve(stop))
    try:
        await asyncio.wait_for(proxy.ready.wait(), 30)
        yield proxy
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def ancestors(span, by_id: dict) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        names.append(by_id[parent.span_id].name)
        parent = by_id[parent.span_id].parent
    return names


async def test_a_routed_connection_is_one_trace_from_proxy_to_database(broker, engine, telemetry):
    _, exporter = telemetry
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        exporter.clear()
        async with proxy_for(broker.grpc_port) as proxy:
            reader, writer, _ = await handshake(proxy.port, build_connection_request(cookie="CORP\\trace"))
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            await close(writer)
            await eventually(
                lambda: any(s.name == "rdp.connection" for s in exporter.get_finished_spans()) or None
            )
    [connection] = [s for s in exporter.get_finished_spans() if s.name == "rdp.connection"]
    assert connection.parent is None
    assert connection.attributes["server.address"] == rdp.address
    assert connection.attributes["rdbroker.route_reason"] == "new"
    assert connection.attributes["rdbroker.bytes_from_client"] > 4  # the first packet and "ping"
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == connection.context.trace_id]
    by_id = {s.context.span_id: s for s in spans}
    kinds = {(s.name, s.kind) for s in spans}
    assert (ROUTE, trace.SpanKind.CLIENT) in kinds
    assert (ROUTE, trace.SpanKind.SERVER) in kinds
    [served] = [s for s in spans if s.name == ROUTE and s.kind == trace.SpanKind.SERVER]
    assert ancestors(served, by_id) == [ROUTE, "rdp.connection"]
    statements = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert statements
    for statement in statements:
        assert ancestors(statement, by_id)[-3:] == [ROUTE, ROUTE, "rdp.connection"]


async def test_proxy_and_broker_metrics_move_when_connections_are_routed(broker, engine, telemetry):
    handle, _ = telemetry
    port = handle.metrics_port

    def value(name: str, **labels: str) -> float:
        return prom.sample(prom.scrape(port), name, **labels) or 0.0

    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        routed_before = value("rdbroker_routes_total", reason="new", outcome="ok")
        client_bytes = value("rdbroker_proxy_bytes_total", direction="from_client")
        server_bytes = value("rdbroker_proxy_bytes_total", direction="from_server")
        async with proxy_for(broker.grpc_port) as proxy:
            active = value("rdbroker_proxy_active_connections")
            opened = []
            for n in range(3):
                packet = build_connection_request(cookie=f"CORP\\metrics{n}")
                reader, writer, _ = await handshake(proxy.port, packet)
                writer.write(b"x" * 1000)
                assert await asyncio.wait_for(reader.readexactly(1000), 10) == b"x" * 1000
                opened.append(writer)
            assert value("rdbroker_proxy_active_connections") == active + 3
            # Live connections count already, before they end.
            assert value("rdbroker_proxy_bytes_total", direction="from_client") >= client_bytes + 3000
            assert value("rdbroker_routes_total", reason="new", outcome="ok") == routed_before + 3
            for writer in opened:
                await close(writer)
            await eventually(lambda: value("rdbroker_proxy_active_connections") == active or None)
            # Still counted once they have ended (and never counted twice).
            from_client = value("rdbroker_proxy_bytes_total", direction="from_client")
            assert client_bytes + 3000 < from_client < client_bytes + 3000 + 3 * 1000
            assert value("rdbroker_proxy_bytes_total", direction="from_server") >= server_bytes + 3000


async def test_an_unreachable_broker_is_counted(telemetry):
    from tests.support.postgres import free_port

    handle, _ = telemetry

    def unreachable() -> float:
        text = prom.scrape(handle.metrics_port)
        return prom.sample(text, "rdbroker_broker_unreachable_total", method="Route") or 0.0

    before = unreachable()
    async with proxy_for(free_port(), route_timeout_s=0.5, route_attempt_timeout_s=0.2) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(build_connection_request(cookie="CORP\\nobody"))
        assert await asyncio.wait_for(reader.read(100), 10) == b""  # closed: no broker answered
        await close(writer)
    assert unreachable() == before + 1


async def test_a_proxy_routes_through_a_dns_broker_target(broker, engine, telemetry):
    async with FakeRdpServer(mode="echo") as rdp:
        await seed(engine, server(rdp.address))
        proxy = ProxyServer(settings([f"dns:///localhost:{broker.grpc_port}"]))
        assert proxy.settings.broker_addresses == [f"dns:///localhost:{broker.grpc_port}"]
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(proxy.serve(stop))
        try:
            await asyncio.wait_for(proxy.ready.wait(), 30)
            reader, writer, _ = await handshake(proxy.port, build_connection_request(cookie="CORP\\dns"))
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            await close(writer)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert len(rdp.first_packets) == 1
