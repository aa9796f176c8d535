"""Lost reports and unreachable brokers are counted on the Prometheus endpoint: the proxy's
`rdbroker_report_drops_total{reason}` and the health replica's drop and unreachable counters."""

from __future__ import annotations

import asyncio

import grpc

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from rdbroker_proxy.routing import BrokerClient
from tests.support import prom
from tests.support.postgres import free_port
from tests.unit.health.fake_broker import FakeBroker, serving
from tests.unit.health.support import ProbeLog, fast_settings, replica, wait_until


def _sample(port: int, name: str, **labels: str) -> float:
    return prom.sample(prom.scrape(port), name, **labels) or 0.0


def _opened(n: int) -> pb.ConnectionOpenedRequest:
    return pb.ConnectionOpenedRequest(session_id=f"s{n}", connection_id=f"c{n}", proxy_id="p1")


async def test_proxy_counts_reports_past_its_buffer(telemetry) -> None:
    handle, _ = telemetry
    port = handle.metrics_port
    before = _sample(port, "rdbroker_report_drops_total", reason="buffer_full")
    # No broker listens there and the sender is not running: reports pile up in a buffer of 2.
    client = BrokerClient([f"127.0.0.1:{free_port()}"], proxy_id="p1", report_buffer=2)
    try:
        for n in range(5):
            client.report_opened(_opened(n))
        assert (client.pending_reports, client.dropped_reports) == (2, 3)
        assert _sample(port, "rdbroker_report_drops_total", reason="buffer_full") == before + 3
    finally:
        await client.close()


class _RefusingBroker(broker_pb2_grpc.BrokerServicer):
    async def ReportConnections(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused for the test")


async def test_proxy_counts_reports_a_broker_refuses(telemetry) -> None:
    handle, _ = telemetry
    port = handle.metrics_port
    before = _sample(port, "rdbroker_report_drops_total", reason="rejected")
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(_RefusingBroker(), server)
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = BrokerClient([f"127.0.0.1:{bound}"], proxy_id="p1", report_timeout_s=5)
    try:
        async with asyncio.TaskGroup() as tasks:
            sender = tasks.create_task(client.run_reports())
            for n in range(3):
                client.report_opened(_opened(n))
            flushed = await client.flush(10)
            sender.cancel()
        assert flushed
        assert client.rejected_reports == 3
        assert _sample(port, "rdbroker_report_drops_total", reason="rejected") == before + 3
    finally:
        await client.close()
        await server.stop(0)


async def test_health_counts_an_unreachable_broker(telemetry) -> None:
    handle, _ = telemetry
    port = handle.metrics_port
    method = {"method": "ClaimProbeTargets"}
    before = _sample(port, "rdbroker_broker_unreachable_total", **method)
    settings = fast_settings(f"127.0.0.1:{free_port()}")  # nothing listens there
    async with replica(settings, "r-unreachable", ProbeLog().probe_for("r-unreachable")):
        await wait_until(lambda: _sample(port, "rdbroker_broker_unreachable_total", **method) >= before + 2)


async def test_health_counts_results_the_broker_refuses(telemetry) -> None:
    handle, _ = telemetry
    port = handle.metrics_port
    broker = FakeBroker(refuse_results_from={"r-refused"})  # type: ignore[abstract]
    broker.add("10.9.1.1:3389")

    def drops() -> float:
        return _sample(port, "rdbroker_report_drops_total", otel_scope_name="rdbroker_health")

    before = drops()
    async with serving(broker) as address:
        settings = fast_settings(address)
        async with replica(settings, "r-refused", ProbeLog().probe_for("r-refused")):
            await wait_until(lambda: len(broker.rejected) >= 2)
            await wait_until(lambda: drops() >= before + 2)
