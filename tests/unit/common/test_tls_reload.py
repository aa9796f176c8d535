"""Renewed certificate files take effect without a restart: the watcher, and a real grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_common import tls
from rdbroker_common.rpc_server import add_standard_services, mark_serving
from tests.unit.common.test_tls import Authority, Issued, check
from tests.unit.common.tls_files import SecretVolume, certificate, der, peer_certificate


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    folder.mkdir()
    return folder


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    root = tmp_path / "secret"
    root.mkdir()
    return SecretVolume(root)


@pytest.fixture
def ca(pki: Path) -> Authority:
    return Authority(pki, "first")


# -- the watcher ---------------------------------------------------------------------------------


def test_unchanged_files_are_not_read_again(volume: SecretVolume, ca: Authority) -> None:
    volume.install(ca, ca.issue("a", server=True))
    files = tls.TlsFiles(*volume.paths)
    assert files.refresh() is False
    assert files.refresh() is False


def test_a_kubernetes_style_swap_is_picked_up(volume: SecretVolume, ca: Authority) -> None:
    volume.install(ca, ca.issue("a", server=True))
    files = tls.TlsFiles(*volume.paths)
    second = ca.issue("b", server=True)
    volume.install(ca, second)
    assert files.refresh() is True
    assert files.pems[1] == second.cert.read_bytes()
    assert files.refresh() is False


def test_the_same_content_rewritten_is_no_change(volume: SecretVolume, ca: Authority) -> None:
    issued = ca.issue("a", server=True)
    volume.install(ca, issued)
    files = tls.TlsFiles(*volume.paths)
    volume.install(ca, issued)
    assert files.refresh() is False


@pytest.mark.parametrize("damage", ["garbage key", "empty cert", "missing key", "key of another cert"])
def test_a_bad_set_keeps_the_last_good_one_and_warns_once(
    volume: SecretVolume, ca: Authority, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = ca.issue("a", server=True)
    volume.install(ca, first)
    files = tls.TlsFiles(*volume.paths)
    good = files.pems
    ca_pem, cert_pem, key_pem = (p.read_bytes() for p in (ca.ca_path, first.cert, first.key))
    if damage == "garbage key":
        volume.write(ca_pem, cert_pem, b"-----BEGIN PRIVATE KEY-----\nnot base64\n")
    elif damage == "empty cert":
        volume.write(ca_pem, b"", key_pem)
    elif damage == "missing key":
        volume.write(ca_pem, cert_pem, key_pem)
        volume.paths[2].resolve().unlink()
    else:
        volume.write(ca_pem, cert_pem, ca.issue("other", server=True).key.read_bytes())
    with caplog.at_level(logging.WARNING, logger="rdbroker_common.tls"):
        assert files.refresh() is False
        assert files.refresh() is False
    assert files.pems == good
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "keeping the previous ones" in warnings[0].getMessage()
    # Fixed afterwards: taken.
    second = ca.issue("b", server=True)
    volume.install(ca, second)
    assert files.refresh() is True
    assert files.pems[1] == second.cert.read_bytes()


def test_files_replaced_one_by_one_are_taken_once_they_match(
    tmp_path: Path, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ca.issue("a", server=True), ca.issue("b", server=True)
    paths = tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key"
    for path, source in zip(paths, (ca.ca_path, first.cert, first.key), strict=True):
        path.write_bytes(source.read_bytes())
    files = tls.TlsFiles(*paths)
    paths[1].write_bytes(second.cert.read_bytes())  # the key still belongs to the first certificate
    assert files.refresh() is False
    assert files.pems[1] == first.cert.read_bytes()
    paths[2].write_bytes(second.key.read_bytes())
    assert files.refresh() is True
    assert files.pems[1:] == (second.cert.read_bytes(), second.key.read_bytes())


def test_a_bad_set_at_start_is_an_error(tmp_path: Path, ca: Authority) -> None:
    first, other = ca.issue("a", server=True), ca.issue("b", server=True)
    with pytest.raises(ValueError, match="do not load as a pair"):
        tls.TlsFiles(ca.ca_path, first.cert, other.key)


def test_the_client_looks_at_most_every_interval(volume: SecretVolume, ca: Authority) -> None:
    volume.install(ca, ca.issue("a", server=True))
    slow = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=3600)
    eager = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=0)
    before = eager.credentials
    volume.install(ca, ca.issue("b", server=True))
    assert slow.changed() is False  # not looked at yet
    assert eager.changed() is True
    assert eager.credentials is not before
    assert eager.changed() is False


async def test_retired_channels_close_after_the_grace_period(
    mtls: tuple[int, SecretVolume, Authority],
) -> None:
    port, _, ca = mtls
    client = ca.issue("client", server=False)
    credentials = tls.channel_credentials(ca.ca_path, client.cert, client.key)
    assert credentials is not None
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    # The grace outlasts the call (its TLS handshake included) on a loaded machine.
    task = tls.retire_channels([channel], grace_s=2.0)
    assert (await call).status == health_pb2.HealthCheckResponse.SERVING  # a call in flight finishes
    assert not task.done()  # the channel stays open for the rest of the grace
    await asyncio.wait_for(task, 10)
    with pytest.raises(grpc.aio.UsageError):
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)


# -- a server following its files ----------------------------------------------------------------


@pytest.fixture
async def mtls(volume: SecretVolume, ca: Authority) -> AsyncIterator[tuple[int, SecretVolume, Authority]]:
    """grpc.health.v1 behind mutual TLS, with the server's files in a Kubernetes-style Secret folder."""
    volume.install(ca, ca.issue("server-a", server=True))
    credentials = tls.server_credentials(*volume.paths)
    assert credentials is not None
    server = grpc.aio.server()
    servicer = add_standard_services(server, [])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    del credentials  # the server keeps what it needs
    await server.start()
    await mark_serving(servicer, [])
    try:
        yield port, volume, ca
    finally:
        await server.stop(None)


async def serving(port: int, ca: Authority, client: Issued) -> bool:
    credentials = tls.channel_credentials(ca.ca_path, client.cert, client.key)
    assert credentials is not None
    response = await check(port, credentials)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def shown(port: int, ca: Authority, client: Issued) -> bytes:
    return der(await asyncio.to_thread(peer_certificate, port, ca.ca_path, client.cert, client.key))


async def test_a_renewed_certificate_is_presented_without_restart(
    mtls: tuple[int, SecretVolume, Authority], pki: Path
) -> None:
    port, volume, ca = mtls
    client = ca.issue("client", server=False)
    assert await shown(port, ca, client) == der(certificate(ca.folder / "server-a.crt"))
    renewed = ca.issue("server-b", server=True)
    volume.install(ca, renewed)
    assert await shown(port, ca, client) == der(certificate(renewed.cert))
    assert await serving(port, ca, client)

    # A new CA as well: clients of the old CA are refused, clients of the new one get through.
    new_ca = Authority(pki, "second")
    volume.install(new_ca, new_ca.issue("server-c", server=True))
    new_client = new_ca.issue("client-c", server=False)
    assert await shown(port, new_ca, new_client) == der(certificate(pki / "server-c.crt"))
    assert await serving(port, new_ca, new_client)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving(port, ca, client)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_garbage_write_keeps_the_working_certificate(
    mtls: tuple[int, SecretVolume, Authority],
) -> None:
    port, volume, ca = mtls
    client = ca.issue("client", server=False)
    volume.write(b"garbage", b"", b"-----BEGIN PRIVATE KEY-----\n")
    assert await serving(port, ca, client)
    assert await shown(port, ca, client) == der(certificate(ca.folder / "server-a.crt"))


async def test_a_server_and_a_client_sharing_the_files_both_follow(
    volume: SecretVolume, ca: Authority
) -> None:
    """The health replica's case: whichever looks first, the other still gets the change."""
    volume.install(ca, ca.issue("both-a", server=True))
    files = tls.TlsFiles(*volume.paths)
    client_tls = tls.ClientTls(files, interval_s=0)
    server = grpc.aio.server()
    servicer = add_standard_services(server, [])
    port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
    await server.start()
    await mark_serving(servicer, [])
    try:
        client = ca.issue("client", server=False)
        assert await serving(port, ca, client)
        renewed = ca.issue("both-b", server=True)
        volume.install(ca, renewed)
        assert client_tls.changed() is True  # the client looks first and loads the new set
        assert await shown(port, ca, client) == der(certificate(renewed.cert))
        volume.install(ca, ca.issue("both-c", server=True))
        assert await shown(port, ca, client) == der(certificate(ca.folder / "both-c.crt"))  # server first
        assert client_tls.changed() is True
    finally:
        await server.stop(None)
