"""Mutual TLS for gRPC servers and channels, from the `--tls-ca`, `--tls-cert`, `--tls-key` settings.

All three paths empty means plaintext (the builders return None). All three set means mutual TLS: the
server requires a client certificate signed by the CA, and the client presents its own certificate and
verifies the server's against the same CA. Anything in between is an operator mistake and raises
ValueError naming what is missing, so a service refuses to start rather than silently run in plaintext.

Renewed files take effect without a restart (cert-manager rewrites the Secret's files in place, through
a `..data` symlink swap). `TlsFiles` notices a change by `os.stat` of the three paths (following links:
device, inode, size, mtime) and re-reads them. Servers get dynamic credentials whose fetcher does that
check on every handshake. Clients cannot change a channel's credentials, so `ClientTls.changed()`
checks at most every few seconds and the caller builds new channels, retiring the old ones after a
grace period (`retire_channels`). A set that does not load (a file missing or empty, not PEM, a key
that does not match its certificate: a rotation half written) never replaces the last good one; it is
logged once per change of the files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger(__name__)

PathArg = str | PathLike[str] | None
Pems = tuple[bytes, bytes, bytes]  # ca, cert, key
Stamp = tuple[tuple[int, int, int, int] | None, ...]

_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")
CLIENT_CHECK_INTERVAL_S = 5.0  # a client looks at the files at most this often
RETIRE_GRACE_S = 30.0  # replaced channels stay open this long for the calls in flight


def server_credentials(ca: PathArg, cert: PathArg, key: PathArg) -> grpc.ServerCredentials | None:
    """Credentials for `server.add_secure_port(...)` that refuse clients without a certificate from `ca`,
    following renewals of the three files."""
    files = TlsFiles.from_settings(ca, cert, key)
    return None if files is None else files.server_credentials()


def channel_credentials(ca: PathArg, cert: PathArg, key: PathArg) -> grpc.ChannelCredentials | None:
    """Credentials for `grpc.aio.secure_channel(...)`: present `cert`, trust servers signed by `ca`
    (fixed: use `ClientTls` to follow renewals)."""
    files = TlsFiles.from_settings(ca, cert, key)
    return None if files is None else _channel_credentials(files.pems)


def is_enabled(ca: PathArg, cert: PathArg, key: PathArg) -> bool:
    """True when all three are set (mutual TLS); raises ValueError on a partial set, like the builders."""
    return _check(ca, cert, key) is not None


class TlsFiles:
    """The three files and the last set of them that loaded; `refresh()` picks up a changed valid set.

    One instance may serve a server (grpc calls its fetcher from its own threads) and a client: each
    user remembers the `generation` it last took, so neither consumes the other's change.
    """

    def __init__(self, ca: Path, cert: Path, key: Path) -> None:
        self.paths = (ca, cert, key)
        self._lock = threading.Lock()
        self._seen = _stamp(self.paths)
        # ValueError at start: a service does not start on a bad set.
        self.current: tuple[int, Pems] = (0, _load(self.paths))  # (generation, pems), replaced whole

    @classmethod
    def from_settings(cls, ca: PathArg, cert: PathArg, key: PathArg) -> TlsFiles | None:
        """None when all three are empty (plaintext); ValueError on a partial set or unusable files."""
        paths = _check(ca, cert, key)
        return None if paths is None else cls(*paths)

    @property
    def pems(self) -> Pems:
        return self.current[1]

    def refresh(self) -> bool:
        """True when the files changed since the last look and now hold a new valid set (`current`)."""
        with self._lock:
            stamp = _stamp(self.paths)
            if stamp == self._seen:
                return False
            try:
                pems = _load(self.paths)
            except ValueError as exc:
                if _stamp(self.paths) == stamp:  # still being written otherwise: look again next time
                    self._seen = stamp
                    log.warning("TLS files changed but do not load, keeping the previous ones: %s", exc)
                return False
            if _stamp(self.paths) != stamp:
                return False  # changed while read: the next look reads the settled set
            self._seen = stamp
            generation, old = self.current
            if pems == old:
                return False
            self.current = (generation + 1, pems)
        log.info("TLS files changed: using the new certificate", extra={"tls_cert": str(self.paths[1])})
        return True

    def server_credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials: each handshake costs three `os.stat`; a new valid set takes over."""
        served, pems = self.current

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # grpc's core calls this on every handshake; an exception would fail the handshake.
            nonlocal served
            try:
                self.refresh()
                generation, pems = self.current
                if generation == served:
                    return None
                served = generation
                return _server_configuration(pems)
            except Exception:
                log.exception("cannot check the TLS files")
                return None

        # grpc documents None as "no change"; its type stub forgets it.
        fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", fetch)
        return grpc.dynamic_ssl_server_credentials(
            _server_configuration(pems), fetcher, require_client_authentication=True
        )


class ClientTls:
    """Channel credentials that follow the files; `changed()` looks at most every `interval_s`."""

    def __init__(self, files: TlsFiles, interval_s: float = CLIENT_CHECK_INTERVAL_S) -> None:
        self.files = files
        self.interval_s = interval_s
        self._generation, pems = files.current
        self.credentials = _channel_credentials(pems)
        self._next = time.monotonic() + interval_s

    def changed(self) -> bool:
        """True (once) when the files now hold a new valid set: build new channels with `credentials`."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        self.files.refresh()
        generation, pems = self.files.current
        if generation == self._generation:
            return False
        self._generation = generation
        self.credentials = _channel_credentials(pems)
        return True


def retire_channels(
    channels: Sequence[grpc.aio.Channel], grace_s: float = RETIRE_GRACE_S
) -> asyncio.Task[None]:
    """Close replaced channels after `grace_s` (and up to `grace_s` more for calls still running).

    Cancelling the task closes them at once. Keep a reference to the task until it is done.
    """

    async def close_later() -> None:
        try:
            await asyncio.sleep(grace_s)
            await asyncio.gather(*(channel.close(grace_s) for channel in channels))
        finally:
            for channel in channels:
                await channel.close(None)

    return asyncio.get_running_loop().create_task(close_later(), name="tls-retire-channels")


def _server_configuration(pems: Pems) -> grpc.ServerCertificateConfiguration:
    ca_pem, cert_pem, key_pem = pems
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)


def _channel_credentials(pems: Pems) -> grpc.ChannelCredentials:
    ca_pem, cert_pem, key_pem = pems
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


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


def _stamp(paths: Sequence[Path]) -> Stamp:
    """What changes when a file is rewritten or a symlink on its path is swapped; None if missing."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _load(paths: Sequence[Path]) -> Pems:
    ca_pem, cert_pem, key_pem = (_read_pem(flag, path) for flag, path in zip(_FLAGS, paths, strict=True))
    _validate(paths, ca_pem)
    return ca_pem, cert_pem, key_pem


def _validate(paths: Sequence[Path], ca_pem: bytes) -> None:
    """The CA parses and the key matches the certificate (OpenSSL's own check, as grpc would load them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"--tls-ca: {str(paths[0])!r} holds no usable certificate: {exc}") from exc
    try:
        context.load_cert_chain(paths[1], paths[2], password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(
            f"--tls-cert/--tls-key: {str(paths[1])!r} and {str(paths[2])!r} do not load as a pair: {exc}"
        ) from exc


def _no_password() -> bytes:
    raise ValueError("the key is encrypted: give an unencrypted key")


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
