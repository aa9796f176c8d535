"""The bearer token a proxy or health replica sends the broker: `RDBROKER_BROKER_TOKEN` or a file.

The broker names the caller's role from it (`rpc_authz`). The token goes into each call's metadata, not
into channel credentials: an insecure channel cannot carry call credentials. A token file (a mounted
Secret) is looked at at most every `interval_s` (one `os.stat`) and re-read when it changed, so a rotated
Secret takes effect without a restart; a file that empties or vanishes keeps the last token read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0
MAX_TOKEN_BYTES = 4096

Metadata = tuple[tuple[str, str], ...]
_Stamp = tuple[int, int, int, int] | None


class BrokerToken:
    """`metadata()`: what to add to each broker call, `()` when no token is configured."""

    def __init__(self, token: str = "", file: str = "", *, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Raises ValueError for both a token and a file, or a file that gives no token at start."""
        token, file = token.strip(), file.strip()
        if token and file:
            raise ValueError("give RDBROKER_BROKER_TOKEN or --broker-token-file, not both")
        self.path = Path(file) if file else None
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._seen: _Stamp = None
        self._next = time.monotonic() + interval_s
        if self.path is not None:
            self._seen = _stamp(self.path)
            token = _read(self.path)
        elif token:
            _check(token, "RDBROKER_BROKER_TOKEN")
        self._metadata: Metadata = _metadata(token)

    @property
    def configured(self) -> bool:
        return bool(self._metadata)

    def metadata(self) -> Metadata:
        if self.path is not None and time.monotonic() >= self._next:
            self._refresh()
        return self._metadata

    def _refresh(self) -> None:
        assert self.path is not None
        with self._lock:
            self._next = time.monotonic() + self.interval_s
            stamp = _stamp(self.path)
            if stamp == self._seen:
                return
            self._seen = stamp
            try:
                token = _read(self.path)
            except ValueError as exc:
                log.warning("broker token file changed but gives no token, keeping the previous one: %s", exc)
                return
            metadata = _metadata(token)
            if metadata == self._metadata:
                return
            self._metadata = metadata
        log.info("broker token file changed: sending the new token", extra={"token_file": str(self.path)})


def _metadata(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)  # follows the `..data` symlink swap of a Secret volume
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> str:
    """The token in the file (surrounding whitespace removed). Raises ValueError."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--broker-token-file: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"--broker-token-file: {str(path)!r} is longer than {MAX_TOKEN_BYTES} bytes")
    token = data.decode("ascii", "replace").strip()
    if not token:
        raise ValueError(f"--broker-token-file: {str(path)!r} is empty")
    return _check(token, f"--broker-token-file {str(path)!r}")


def _check(token: str, where: str) -> str:
    # gRPC metadata values are printable ASCII; a token is one word.
    if not all(33 <= ord(ch) <= 126 for ch in token):
        raise ValueError(f"{where}: a token is one word of printable ASCII characters")
    return token
