"""Keyed hashes of user names for logs: `hmac:` + HMAC-SHA256(key, name), 32 hex digits (128 bits).

A bare hash of a user name is reversed by hashing a list of names; an HMAC needs the key too. The key
is one secret per deployment (`RDBROKER_LOG_HASH_KEY`, or a file), so the same user hashes the same in
every replica's logs and across restarts. Without one, a random key is drawn once per process: the
hashes then match only within that process's own logs (each service warns at start).
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

SCHEME = "hmac:"
HEX_DIGITS = 32  # 128 bits: no collision among any farm's users (the birthday bound is 2**64 names)
MIN_KEY_BYTES = 16
ENV = "RDBROKER_LOG_HASH_KEY"

_process_key = secrets.token_bytes(32)


class LogHasher:
    """`hasher(name)` -> `hmac:<32 hex>`. `ephemeral` when it uses this process's random key."""

    __slots__ = ("_key", "ephemeral")

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"the log hash key has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
                "(e.g. `openssl rand -hex 32`)"
            )
        self.ephemeral = key is None
        self._key = _process_key if key is None else key

    def __call__(self, name: str) -> str:
        digest = hmac.digest(self._key, name.encode("utf-8", "surrogateescape"), "sha256")
        return SCHEME + digest.hex()[:HEX_DIGITS]

    def __repr__(self) -> str:  # never the key
        return f"LogHasher(ephemeral={self.ephemeral})"


def load_key(value: str, key_file: str) -> bytes | None:
    """The key from the environment's value or from `key_file` (its trailing newline dropped), None when
    neither is set. Raises ValueError when both are, or the file is empty; OSError when it is unreadable."""
    if value and key_file:
        raise ValueError(f"set either {ENV} or --log-hash-key-file, not both")
    if value:
        return value.encode("utf-8")
    if not key_file:
        return None
    key = Path(key_file).read_bytes().rstrip(b"\r\n")
    if not key:
        raise ValueError(f"the log hash key file {key_file} is empty")
    return key


NO_KEY_WARNING = (
    f"no log hash key ({ENV} or --log-hash-key-file): user names in the logs are hashed with a random "
    "key of this process, so the same user's hashes match only within this process's logs"
)
