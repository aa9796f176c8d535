"""Bearer tokens: given in the environment or in a file an operator rotates, compared in constant time.

A token file holds one token per line (blank lines and `#` comments are skipped): a server accepts
any of them, so a rotation adds the new token, moves the clients over, then removes the old one, with
no request refused on the way. A client sends the first. The file is re-read when it changes (`os.stat`:
device, inode, size, mtime; a Kubernetes Secret's `..data` symlink swap changes the inode), looked at
on each use: one `stat` per request or probe. A rewrite that does not load (empty, unreadable: a
rotation half written) keeps the previous tokens, logged once per change of the file.

Tokens never appear in logs or error messages: only the file's path does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Visible ASCII without spaces: what fits an `Authorization: Bearer` header unquoted.
_ALLOWED = frozenset(chr(c) for c in range(0x21, 0x7F))

Stamp = tuple[int, int, int, int] | None


class TokenError(ValueError):
    """A token or token file that cannot be used; the message names the file, never the token."""


def check_token(token: str, where: str, *, min_length: int = 1) -> str:
    """`token` stripped, or TokenError saying what is wrong with it (without showing it)."""
    token = token.strip()
    if not token:
        raise TokenError(f"{where} is empty")
    if not set(token) <= _ALLOWED:
        raise TokenError(f"{where}: a token is visible ASCII without spaces")
    if len(token) < min_length:
        raise TokenError(
            f"{where}: a token is at least {min_length} characters (e.g. `openssl rand -hex 32`)"
        )
    return token


class TokenFile:
    """The tokens in a file, re-read when the file changes. Raises TokenError at start if unusable."""

    def __init__(self, path: str | os.PathLike[str], *, min_length: int = 1) -> None:
        self.path = Path(path)
        self.min_length = min_length
        self._lock = threading.Lock()
        self._seen = _stamp(self.path)
        self._tokens = self._read()

    def tokens(self) -> tuple[str, ...]:
        """The current tokens (at least one), after a look at the file."""
        stamp = _stamp(self.path)
        if stamp == self._seen:
            return self._tokens
        with self._lock:
            if stamp != self._seen:
                try:
                    tokens = self._read()
                except TokenError as exc:
                    log.warning("token file changed but cannot be used, keeping the previous token: %s", exc)
                else:
                    if tokens != self._tokens:
                        log.info("token file changed: using its new token(s)", extra={"path": str(self.path)})
                    self._tokens = tokens
                self._seen = stamp
        return self._tokens

    def _read(self) -> tuple[str, ...]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise TokenError(f"token file {str(self.path)!r}: cannot read: {reason}") from None
        lines = [line.strip() for line in text.splitlines()]
        tokens = tuple(
            check_token(line, f"token file {str(self.path)!r}", min_length=self.min_length)
            for line in lines
            if line and not line.startswith("#")
        )
        if not tokens:
            raise TokenError(f"token file {str(self.path)!r} holds no token")
        return tokens


class Tokens:
    """Where a service's token(s) come from: one fixed value (the environment) or a `TokenFile`."""

    def __init__(self, fixed: str | None = None, file: TokenFile | None = None) -> None:
        if (fixed is None) == (file is None):
            raise ValueError("exactly one of fixed or file")
        self._fixed = (fixed,) if fixed is not None else ()
        self._file = file

    @classmethod
    def configured(
        cls, value: str, path: str | os.PathLike[str] | None, *, names: tuple[str, str], min_length: int = 1
    ) -> Tokens | None:
        """From an environment value or a file path (`names`: how an operator sets each, for errors);
        None when neither is set. TokenError when both are, or what is given cannot be used."""
        has_value, has_path = bool(value.strip()), bool(path and str(path).strip())
        if has_value and has_path:
            raise TokenError(f"set {names[0]} or {names[1]}, not both")
        if has_value:
            return cls(fixed=check_token(value, names[0], min_length=min_length))
        if has_path:
            assert path is not None
            return cls(file=TokenFile(path, min_length=min_length))
        return None

    def current(self) -> tuple[str, ...]:
        return self._file.tokens() if self._file is not None else self._fixed

    def header(self) -> str:
        """The `Authorization` value a client sends: the first token."""
        return f"Bearer {self.current()[0]}"

    def accepts(self, authorization: str | None) -> bool:
        """True when `authorization` is `Bearer <one of the tokens>`; every token is compared, each in
        constant time over its SHA-256 (so neither the match nor its length shows in the timing)."""
        given = _bearer(authorization)
        if given is None:
            return False
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for token in self.current():
            matched |= hmac.compare_digest(digest, hashlib.sha256(token.encode()).digest())
        return matched


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
