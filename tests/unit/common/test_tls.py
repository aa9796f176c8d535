"""Mutual TLS: a real grpc.aio server on 127.0.0.1 with certificates made here, and the settings errors."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_common import tls
from rdbroker_common.rpc_authz import DEFAULT_TRUST_DOMAIN
from rdbroker_common.rpc_server import add_standard_services, mark_serving

RPC_TIMEOUT_S = 10.0


def spiffe(role: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The URI SAN that gives a client certificate an rdbroker gRPC role."""
    return f"spiffe://{trust_domain}/rdbroker/{role}"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A throwaway CA that writes PEM files into a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = folder / f"{name}-ca.crt"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool, uris: Sequence[str] = ()) -> Issued:
        """A certificate for `common_name`; `uris` become URI SANs (`spiffe(role)` names a role)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
        if server:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(cert=self.folder / f"{common_name}.crt", key=self.folder / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path, "rdbroker")


@pytest.fixture
async def mtls_port(ca: Authority) -> AsyncIterator[int]:
    """A grpc.aio server on 127.0.0.1 serving grpc.health.v1 behind mutual TLS."""
    issued = ca.issue("broker", server=True)
    credentials = tls.server_credentials(ca.ca_path, issued.cert, issued.key)
    assert credentials is not None
    server = grpc.aio.server()
    servicer = add_standard_services(server, [])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await mark_serving(servicer, [])
    try:
        yield port
    finally:
        await server.stop(None)


async def check(port: int, credentials: grpc.ChannelCredentials) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = await stub.Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
        )
        return response


async def test_client_with_a_certificate_from_the_ca_gets_through(ca: Authority, mtls_port: int) -> None:
    client = ca.issue("proxy", server=False)
    credentials = tls.channel_credentials(ca.ca_path, client.cert, client.key)
    assert credentials is not None
    response = await check(mtls_port, credentials)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_client_without_a_certificate_is_refused(ca: Authority, mtls_port: int) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(mtls_port, anonymous)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_with_a_certificate_from_another_ca_is_refused(
    ca: Authority, mtls_port: int, tmp_path: Path
) -> None:
    other = Authority(tmp_path, "intruder")
    client = other.issue("intruder-client", server=False)
    # It trusts our server (our CA) but presents a certificate our server does not trust.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.ca_path.read_bytes(),
        private_key=client.key.read_bytes(),
        certificate_chain=client.cert.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(mtls_port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_a_server_from_another_ca(ca: Authority, mtls_port: int, tmp_path: Path) -> None:
    other = Authority(tmp_path, "elsewhere")
    client = other.issue("proxy-elsewhere", server=False)
    credentials = tls.channel_credentials(other.ca_path, client.cert, client.key)
    assert credentials is not None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(mtls_port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_all_empty_means_plaintext(empty: str | None) -> None:
    assert tls.server_credentials(empty, empty, empty) is None
    assert tls.channel_credentials(empty, empty, empty) is None
    assert tls.is_enabled(empty, empty, empty) is False


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ((True, False, False), "--tls-cert, --tls-key"),
        ((False, True, True), "--tls-ca"),
        ((True, True, False), "--tls-key"),
    ],
)
def test_a_partial_set_is_an_error_naming_what_is_missing(
    ca: Authority, given: tuple[bool, bool, bool], missing: str
) -> None:
    issued = ca.issue("svc", server=True)
    paths = [p if on else "" for p, on in zip((ca.ca_path, issued.cert, issued.key), given, strict=True)]
    for build in (tls.server_credentials, tls.channel_credentials, tls.is_enabled):
        with pytest.raises(ValueError, match=f"missing: {missing}$"):
            build(*paths)


def test_unreadable_or_non_pem_files_are_clear_errors(ca: Authority, tmp_path: Path) -> None:
    issued = ca.issue("svc", server=True)
    with pytest.raises(ValueError, match=r"--tls-key: cannot read .*nope\.key"):
        tls.server_credentials(ca.ca_path, issued.cert, tmp_path / "nope.key")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match=r"--tls-ca: .* is not a PEM file"):
        tls.channel_credentials(garbage, issued.cert, issued.key)
