"""Certificate files written as Kubernetes updates a Secret volume, and the certificate a server shows."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rdbroker_common import tls
from rdbroker_proto.v1 import broker_pb2_grpc

NAMES = ("ca.crt", "tls.crt", "tls.key")


class SecretVolume:
    """A folder like a mounted Secret: `ca.crt` -> `..data/ca.crt`, `..data` -> a timestamped folder.

    `write()` makes a new timestamped folder, then swaps `..data` to it with one atomic rename.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._version = 0

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.root / NAMES[0], self.root / NAMES[1], self.root / NAMES[2]

    def write(self, ca: bytes, cert: bytes, key: bytes) -> None:
        self._version += 1
        folder = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._version}"
        folder.mkdir()
        for name, data in zip(NAMES, (ca, cert, key), strict=True):
            (folder / name).write_bytes(data)
        temporary = self.root / "..data_tmp"
        temporary.symlink_to(folder.name)
        os.replace(temporary, self.root / "..data")
        for name in NAMES:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def install(self, ca: Any, issued: Any) -> None:
        """A renewal: `ca`'s certificate (a test_tls.Authority) and `issued`'s pair (an Issued)."""
        self.write(ca.ca_path.read_bytes(), issued.cert.read_bytes(), issued.key.read_bytes())


@contextlib.asynccontextmanager
async def tls_broker(servicer: Any, ca: Any, port: int) -> AsyncIterator[None]:
    """`servicer` (a Broker servicer) on 127.0.0.1:`port`, accepting only clients of `ca`."""
    issued = ca.issue(f"broker-{ca.name}", server=True)
    credentials = tls.server_credentials(ca.ca_path, issued.cert, issued.key)
    assert credentials is not None
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    try:
        yield
    finally:
        await server.stop(None)


def peer_certificate(port: int, ca: Path, cert: Path, key: Path) -> x509.Certificate:
    """The certificate a TLS server on 127.0.0.1 presents to a client holding `cert` (ALPN h2, as gRPC)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
