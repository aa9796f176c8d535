"""Mutual TLS to the brokers when --tls-ca/--tls-cert/--tls-key are set; the health port stays plaintext
(kubelet probes present no certificate); a partial TLS setting is a start-up error."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_proto.v1 import broker_pb2_grpc
from rdbroker_proxy.server import ProxyServer
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.unit.proxy.fake_broker import Directory, FakeBroker, fake_broker
from tests.unit.proxy.support import (
    CR,
    close,
    closed_by_peer,
    handshake,
    open_client,
    running_proxy,
    settings,
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and two certificates it signed, both valid for 127.0.0.1 (server and client use)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    for name in ("broker", "proxy"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip
    return d


@contextlib.asynccontextmanager
async def tls_broker(directory: Directory, pki: Path) -> AsyncIterator[str]:
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(FakeBroker(directory), server)  # type: ignore[abstract]
    creds = grpc.ssl_server_credentials(
        [((pki / "broker.key").read_bytes(), (pki / "broker.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_routes_over_mutual_tls_and_serves_health_in_plaintext(pki: Path) -> None:
    async with FakeRdpServer(mode="echo") as server:
        directory = Directory({"": [server.address]})
        async with (
            tls_broker(directory, pki) as address,
            running_proxy(
                [address],
                tls_ca=str(pki / "ca.pem"),
                tls_cert=str(pki / "proxy.pem"),
                tls_key=str(pki / "proxy.key"),
            ) as proxy,
        ):
            _, writer, _ = await handshake(proxy.port, CR)
            await close(writer)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert server.first_packets == [CR]
    assert len(directory.routes) == 1


async def test_a_broker_without_tls_is_unreachable_for_a_tls_proxy(pki: Path) -> None:
    directory = Directory({"": ["127.0.0.1:1"]})
    async with (
        fake_broker(directory) as plain,
        running_proxy(
            [plain.address],
            tls_ca=str(pki / "ca.pem"),
            tls_cert=str(pki / "proxy.pem"),
            tls_key=str(pki / "proxy.key"),
            route_timeout_s=1.0,
        ) as proxy,
    ):
        reader, writer = await open_client(proxy.port)
        writer.write(CR)
        assert await closed_by_peer(reader)
        await close(writer)
    assert directory.routes == []


async def test_a_partial_tls_setting_refuses_to_start(pki: Path) -> None:
    proxy = ProxyServer(settings(["127.0.0.1:1"], tls_ca=str(pki / "ca.pem")))
    with pytest.raises(ValueError, match="missing: --tls-cert, --tls-key"):
        await proxy.serve(asyncio.Event())
