"""Capacity on demand, the parts several services share (docs/power.md).

- The power hooks' signature: `X-Rdbroker-Signature: sha256=<hex>`, the HMAC-SHA256 under
  `RDBROKER_POWER_HOOK_SECRET` of `<timestamp>.<raw body>`, where `<timestamp>` is the
  `X-Rdbroker-Timestamp` header (Unix seconds). Signing the timestamp with the body makes a captured
  request useless once the receiver's tolerance (five minutes by default) has passed.
- The Route hold: a broker that has no server for a new user while one is starting answers
  UNAVAILABLE with the trailing metadata `rdbroker-start-wait-ms`, the pool's `start_wait`; the proxy
  then keeps retrying the same Route until that long after the user arrived.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

SIGNATURE_HEADER = "X-Rdbroker-Signature"
TIMESTAMP_HEADER = "X-Rdbroker-Timestamp"
DELIVERY_HEADER = "X-Rdbroker-Delivery"
SIGNATURE_PREFIX = "sha256="
DEFAULT_TOLERANCE_S = 300.0
MIN_SECRET_CHARS = 16

START_WAIT_METADATA = "rdbroker-start-wait-ms"
# The longest hold a proxy grants, whatever a broker says.
MAX_START_WAIT_S = 300.0


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Rdbroker-Signature` value of `body` sent at `timestamp`."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> str:
    """Check a hook request as a receiver should; answers "" when it is good, else why not."""
    if not timestamp or not signature:
        return f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}"
    if not timestamp.isdigit():
        return f"{TIMESTAMP_HEADER} is not a number of seconds"
    if abs(now - int(timestamp)) > tolerance_s:
        return f"{TIMESTAMP_HEADER} is more than {tolerance_s:g} s away from now (a replay?)"
    if not hmac.compare_digest(sign(secret, timestamp, body), signature.strip()):
        return "bad signature"
    return ""


def start_wait_s(metadata: Iterable[tuple[str, Any]] | None) -> float:
    """The hold a Route failure's trailing metadata asks for (0: none), bounded by MAX_START_WAIT_S."""
    try:
        for key, value in metadata or ():
            if key == START_WAIT_METADATA:
                seconds = int(value) / 1000
                return min(max(seconds, 0.0), MAX_START_WAIT_S)
    except (TypeError, ValueError):
        return 0.0
    return 0.0
