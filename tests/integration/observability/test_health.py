"""The health replica's telemetry and its probe port: a span per probe, probe results and server state on
the Prometheus endpoint, a plaintext grpc.health.v1-only port for kubelet probes, and `dns:///` brokers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2 as std_pb2
from grpc_health.v1 import health_pb2_grpc as std_grpc

from rdbroker_common import tls
from rdbroker_health import app
from rdbroker_health.config import HealthSettings
from rdbroker_health.probes.rdp import ProbeResult
from rdbroker_proto.v1 import broker_pb2_grpc, health_pb2, health_pb2_grpc
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.support import prom
from tests.support.postgres import free_port
from tests.unit.common.test_tls import Authority
from tests.unit.health.fake_broker import FakeBroker, serving
from tests.unit.health.support import ProbeLog, fast_settings, replica, wait_until


@asynccontextmanager
async def running(settings: HealthSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(app.run(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def check(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await std_grpc.HealthStub(channel).Check(
            std_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(answer.status)


async def test_probes_are_traced_and_counted(telemetry) -> None:
    handle, exporter = telemetry
    broker = FakeBroker()  # type: ignore[abstract]
    async with serving(broker) as address, FakeRdpServer(mode="echo") as rdp:
        broker.add(rdp.address)
        exporter.clear()
        async with running(fast_settings(address)):
            await wait_until(lambda: len(broker.reports) >= 2)
            up = prom.sample(prom.scrape(handle.metrics_port), "rdbroker_server_up", server=rdp.address)
        # Stopped, the replica holds nothing: the server leaves the gauge.
        assert prom.sample(prom.scrape(handle.metrics_port), "rdbroker_server_up", server=rdp.address) is None
    assert up == 1
    probes = [s for s in exporter.get_finished_spans() if s.name == "probe"]
    assert probes
    assert {s.attributes["server.address"] for s in probes} == {rdp.address}
    assert all(s.attributes["rdbroker.probe.rdp_ok"] for s in probes)
    assert all(s.parent is None for s in probes)  # one small trace per probe
    text = prom.scrape(handle.metrics_port)
    ok = prom.sample(text, "rdbroker_probe_results_total", server=rdp.address, probe="rdp", outcome="ok")
    assert ok is not None
    assert ok >= len(probes)


async def test_a_dead_server_is_counted_and_shown_down(telemetry) -> None:
    handle, _ = telemetry
    broker = FakeBroker()  # type: ignore[abstract]
    dead = f"127.0.0.1:{free_port()}"
    broker.add(dead)
    async with serving(broker) as address, running(fast_settings(address)):
        await wait_until(lambda: len([r for r in broker.reports if not r.result.rdp_ok]) >= 3)
        await wait_until(
            lambda: prom.sample(prom.scrape(handle.metrics_port), "rdbroker_server_up", server=dead) == 0
        )
    text = prom.scrape(handle.metrics_port)
    failed = prom.sample(text, "rdbroker_probe_results_total", server=dead, probe="rdp", outcome="fail")
    assert failed is not None
    assert failed >= 3


async def test_server_up_shows_only_the_servers_held_now(telemetry) -> None:
    handle, _ = telemetry
    broker = FakeBroker()  # type: ignore[abstract]
    up, down, unknown = "10.9.0.1:3389", "10.9.0.2:3389", "10.9.0.3:3389"
    for address in (up, down, unknown):
        broker.add(address)
    probes = ProbeLog(down={down})
    never = asyncio.Event()

    async def probe(address: str, timeout_s: float) -> ProbeResult:
        if address == unknown:
            await never.wait()  # never answers: the server stays UNKNOWN
        return await probes.probe_for("r1")(address, timeout_s)

    def gauge() -> dict[str, float | None]:
        text = prom.scrape(handle.metrics_port)
        return {a: prom.sample(text, "rdbroker_server_up", server=a) for a in (up, down, unknown)}

    async with serving(broker) as address, replica(fast_settings(address), "r1", probe) as (scheduler, _, _):
        await wait_until(lambda: gauge() == {up: 1, down: 0, unknown: None})
        assert scheduler.held == {up, down, unknown}  # held, but UNKNOWN is not exported
        del broker.targets[up]  # the broker no longer hands it out: the replica lets it go
        await wait_until(lambda: up not in scheduler.held)
        assert gauge() == {up: None, down: 0, unknown: None}


async def test_broker_given_as_a_dns_target(telemetry) -> None:
    broker = FakeBroker()  # type: ignore[abstract]
    async with serving(broker) as address, FakeRdpServer(mode="echo") as rdp:
        broker.add(rdp.address)
        port = address.rsplit(":", 1)[1]
        settings = fast_settings(f"dns:///localhost:{port}")
        assert settings.broker_addresses == [f"dns:///localhost:{port}"]
        async with running(settings):
            await wait_until(lambda: bool(broker.reports))
    assert broker.reports[0].result.address == rdp.address


@pytest.mark.parametrize("value", ["dns:///", "dns:///a:1,b:2", "dns://auth/a:1", "http://a:1", "dns:a:1"])
def test_bad_broker_targets_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="broker"):
        fast_settings(value)


async def test_probe_port_is_plaintext_health_only_while_the_grpc_port_needs_a_certificate(
    tmp_path: Path,
) -> None:
    ca = Authority(tmp_path, "farm")
    broker_cert = ca.issue("broker", server=True)
    replica_cert = ca.issue("health", server=True)
    broker = FakeBroker()  # type: ignore[abstract]
    broker_server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, broker_server)
    credentials = tls.server_credentials(ca.ca_path, broker_cert.cert, broker_cert.key)
    assert credentials is not None
    broker_port = broker_server.add_secure_port("127.0.0.1:0", credentials)
    await broker_server.start()
    grpc_port, probe_port = free_port(), free_port()
    settings = fast_settings(
        f"127.0.0.1:{broker_port}",
        grpc_listen=f"127.0.0.1:{grpc_port}",
        probe_listen=f"127.0.0.1:{probe_port}",
        tls_ca=str(ca.ca_path),
        tls_cert=str(replica_cert.cert),
        tls_key=str(replica_cert.key),
    )
    try:
        async with running(settings):
            serving_now = std_pb2.HealthCheckResponse.SERVING
            status = None
            for _ in range(100):  # bounded: the servers start within a few event-loop turns
                try:
                    status = await check(probe_port)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            assert status == serving_now
            assert await check(probe_port, "rdbroker.v1.Health") == serving_now
            async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await health_pb2_grpc.HealthStub(channel).ProbeServer(
                        health_pb2.ProbeServerRequest(address="127.0.0.1:1"), timeout=5
                    )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # only grpc.health.v1 there
            with pytest.raises(grpc.aio.AioRpcError):
                await check(grpc_port)  # the mutual-TLS port refuses a client without a certificate
    finally:
        await broker_server.stop(0)


async def test_probe_port_reports_not_serving_on_shutdown() -> None:
    """A Watch open on the probe port when shutdown starts gets NOT_SERVING before the port stops: the
    port stops with the grace, which the watcher ends early by closing once it has seen NOT_SERVING."""
    broker = FakeBroker()  # type: ignore[abstract]
    probe_port = free_port()
    stop = asyncio.Event()
    listening = asyncio.Event()
    async with serving(broker) as address:
        settings = fast_settings(address, probe_listen=f"127.0.0.1:{probe_port}", shutdown_grace_s=30.0)
        task = asyncio.get_running_loop().create_task(
            app.run(settings, stop, on_listening=lambda _port: listening.set())
        )
        await asyncio.wait_for(listening.wait(), 10)  # both ports listen and say SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
            stream = std_grpc.HealthStub(channel).Watch(std_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(stream.read(), 10)
            stop.set()
            second = await asyncio.wait_for(stream.read(), 10)
        await asyncio.wait_for(task, 30)
    assert first == std_pb2.HealthCheckResponse(status=std_pb2.HealthCheckResponse.SERVING)
    assert second == std_pb2.HealthCheckResponse(status=std_pb2.HealthCheckResponse.NOT_SERVING)
