"""Mutual TLS for gRPC servers and channels, from the `--tls-ca`, `--tls-cert`, `--tls-key` settings.

All three paths empty means plaintext (both functions return None). All three set means mutual TLS: the
server requires a client certificate signed by the CA, and the client presents its own certificate and
verifies the server's against the same CA. Anything in between is an operator mistake and raises
ValueError naming what is missing, so a service refuses to start rather than silently run in plaintext.

Certificates are read once, when the credentials are built: a renewed certificate (cert-manager) is
picked up when the pod restarts.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import grpc

PathArg = str | PathLike[str] | None

_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def server_credentials(ca: PathArg, cert: PathArg, key: PathArg) -> grpc.ServerCredentials | None:
    """Credentials for `server.add_secure_port(...)` that refuse clients without a certificate from `ca`."""
    pems = _load(ca, cert, key)
    if pems is None:
        return None
    ca_pem, cert_pem, key_pem = pems
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(ca: PathArg, cert: PathArg, key: PathArg) -> grpc.ChannelCredentials | None:
    """Credentials for `grpc.aio.secure_channel(...)`: present `cert`, trust servers signed by `ca`."""
    pems = _load(ca, cert, key)
    if pems is None:
        return None
    ca_pem, cert_pem, key_pem = pems
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def is_enabled(ca: PathArg, cert: PathArg, key: PathArg) -> bool:
    """True when all three are set (mutual TLS); raises ValueError on a partial set, like the builders."""
    return _check(ca, cert, key) is not None


def _check(ca: PathArg, cert: PathArg, key: PathArg) -> tuple[Path, Path, Path] | None:
    values = [_clean(v) for v in (ca, cert, key)]
    if not any(values):
        return None
    missing = [flag for flag, value in zip(_FLAGS, values, strict=True) if not value]
    if missing:
        raise ValueError(
            "mutual TLS needs all of --tls-ca, --tls-cert and --tls-key "
            f"(RDBROKER_TLS_CA/CERT/KEY); missing: {', '.join(missing)}"
        )
    return Path(values[0]), Path(values[1]), Path(values[2])


def _load(ca: PathArg, cert: PathArg, key: PathArg) -> tuple[bytes, bytes, bytes] | None:
    paths = _check(ca, cert, key)
    if paths is None:
        return None
    ca_pem, cert_pem, key_pem = (_read_pem(flag, path) for flag, path in zip(_FLAGS, paths, strict=True))
    return ca_pem, cert_pem, key_pem


def _clean(value: PathArg) -> str:
    return "" if value is None else str(value).strip()


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}: {str(path)!r} is not a PEM file")
    return data
