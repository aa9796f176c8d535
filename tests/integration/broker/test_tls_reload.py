"""A running broker takes renewed certificate files without a restart (written as Kubernetes does)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from rdbroker_broker.app import serve
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from tests.integration.broker.conftest import settings_for
from tests.unit.common.test_tls import Authority, Issued, spiffe
from tests.unit.common.tls_files import SecretVolume, certificate, der, peer_certificate


async def heartbeat(port: int, ca: Authority, client: Issued) -> int:
    credentials = grpc.ssl_channel_credentials(
        ca.ca_path.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        answer = await broker_pb2_grpc.BrokerStub(channel).ProxyHeartbeat(
            pb.ProxyHeartbeatRequest(proxy_id="p1"), timeout=10
        )
        return answer.heartbeat_interval_ms


async def shown(port: int, ca: Authority, client: Issued) -> bytes:
    return der(await asyncio.to_thread(peer_certificate, port, ca.ca_path, client.cert, client.key))


async def test_renewed_and_rotated_certificates_without_restart(
    pg_database_url, engine, tmp_path: Path
) -> None:
    pki, secret = tmp_path / "pki", tmp_path / "secret"
    pki.mkdir()
    secret.mkdir()
    volume = SecretVolume(secret)
    ca = Authority(pki, "first")
    cert_a = ca.issue("broker-a", server=True)
    volume.install(ca, cert_a)
    ca_path, cert_path, key_path = volume.paths
    settings = settings_for(
        pg_database_url, tls_ca=str(ca_path), tls_cert=str(cert_path), tls_key=str(key_path)
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    bound: dict[str, int] = {}
    task = asyncio.get_running_loop().create_task(serve(settings, ready, stop, bound))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        port = bound["grpc"]
        client = ca.issue("proxy", server=False, uris=[spiffe("proxy")])
        assert await heartbeat(port, ca, client) == 5000
        assert await shown(port, ca, client) == der(certificate(cert_a.cert))

        # Renewed under the same CA: the next connection gets B.
        cert_b = ca.issue("broker-b", server=True)
        volume.install(ca, cert_b)
        assert await shown(port, ca, client) == der(certificate(cert_b.cert))
        assert await heartbeat(port, ca, client) == 5000

        # A garbage write (a broken rotation) keeps B working.
        volume.write(b"garbage", b"", b"")
        assert await heartbeat(port, ca, client) == 5000
        assert await shown(port, ca, client) == der(certificate(cert_b.cert))

        # A new CA as well: its clients get through and see C; a client of the old CA is refused.
        new_ca = Authority(pki, "second")
        cert_c = new_ca.issue("broker-c", server=True)
        volume.install(new_ca, cert_c)
        new_client = new_ca.issue("proxy-new", server=False, uris=[spiffe("proxy")])
        assert await heartbeat(port, new_ca, new_client) == 5000
        assert await shown(port, new_ca, new_client) == der(certificate(cert_c.cert))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await heartbeat(port, ca, client)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
