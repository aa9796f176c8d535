"""TLS contexts for the agents' HTTPS (the agent's server, the health replicas' client) that follow
renewed files without a restart.

`refresh()` looks at the files (`os.stat`: device, inode, size, mtime) and, when they changed, loads
them into the same `ssl.SSLContext`, which servers and clients keep using: connections made afterwards
get the new certificate. A set that does not load (a rotation half written) keeps the previous one,
logged once per change. A new CA is added to the trusted ones; an old CA stays trusted until a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int, int] | None, ...]


class TlsContext:
    """An `ssl.SSLContext` and the files it came from. ValueError at start if they do not load."""

    def __init__(self, *, server: bool, cert: Path | None, key: Path | None, ca: Path | None) -> None:
        self.paths = (cert, key, ca)
        # A client context verifies the server and its name by default.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not server and ca is None:
            self.context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        self._seen = self._stamp()
        _load(self.context, cert, key, ca)

    @classmethod
    def server(cls, cert: Path, key: Path, client_ca: Path | None) -> TlsContext:
        """Present `cert`; with `client_ca`, require a client certificate it signed."""
        made = cls(server=True, cert=cert, key=key, ca=client_ca)
        if client_ca is not None:
            made.context.verify_mode = ssl.CERT_REQUIRED
        return made

    @classmethod
    def client(cls, ca: Path | None, cert: Path | None, key: Path | None) -> TlsContext:
        """Trust servers `ca` signed (None: the system's CAs); present `cert` to a server that asks."""
        return cls(server=False, cert=cert, key=key, ca=ca)

    def refresh(self) -> bool:
        """True when the files changed and now load (into `context`)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        cert, key, ca = self.paths
        try:
            # Checked on a scratch context first: a half-loaded live one could pair a key with the
            # wrong certificate.
            _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, ca)
            _load(self.context, cert, key, ca)
        except ValueError as exc:
            log.warning("TLS files changed but do not load, keeping the previous ones: %s", exc)
            return False
        log.info("TLS files changed: using them from the next connection", extra={"tls_cert": str(cert)})
        return True

    def _stamp(self) -> Stamp:
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st else None)
        return tuple(stamps)


def _load(context: ssl.SSLContext, cert: Path | None, key: Path | None, ca: Path | None) -> None:
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"certificate {str(cert)!r} and key {str(key)!r} do not load: {exc}") from exc
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"CA {str(ca)!r} holds no usable certificate: {exc}") from exc
