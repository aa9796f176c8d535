"""Who a connection is (its cookie or preconnection blob), the Route request's limits, and where
its routing token points. Raises InvalidInput naming the field at fault.
"""

from __future__ import annotations

import re

from rdbroker_broker.domain.model import (
    MAX_ADDRESS_CHARS,
    MAX_CONNECTION_ID_CHARS,
    MAX_POOL_CHARS,
    MAX_PRECONNECTION_BLOB_BYTES,
    MAX_TOKEN_CHARS,
    MAX_USER_CHARS,
    RouteRequest,
)
from rdbroker_broker.errors import InvalidInput
from rdbroker_rdp import decode_routing_token

# Microsoft's shape, `<u32>.<u16>.<reserved>` (as rdbroker_rdp.token reads it, numbers unbounded):
# a value of this shape that does not decode is out of range, hence malformed.
_MS_TOKEN_SHAPE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]* *")


def user_key(user: str) -> str:
    """Users compare case-insensitively (Windows account names do)."""
    return user.casefold()


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInput(f"{name} is too long ({len(value)} characters, at most {limit})")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        raise InvalidInput(f"{name} contains control characters")


def identity_from(request: RouteRequest, max_cookie_chars: int) -> str:
    """The user name a connection is keyed on, or "" when the client sent none.

    The cookie wins; the preconnection blob (Hyper-V/VDI console clients) is the fallback.
    mstsc may pad the truncated name with spaces, so surrounding spaces are dropped.
    """
    _check_text("cookie", request.cookie, max_cookie_chars)
    cookie = request.cookie.strip()
    if cookie:
        return _fits_user_key("cookie", cookie)
    if not request.preconnection_blob:
        return ""
    if len(request.preconnection_blob) > MAX_PRECONNECTION_BLOB_BYTES:
        raise InvalidInput(f"preconnection_blob is too long (at most {MAX_PRECONNECTION_BLOB_BYTES} bytes)")
    try:
        blob = request.preconnection_blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("preconnection_blob is not UTF-8") from exc
    blob = blob.rstrip("\x00").strip()
    _check_text("preconnection_blob", blob, max_cookie_chars)
    return _fits_user_key("preconnection_blob", blob)


def _fits_user_key(name: str, user: str) -> str:
    """casefold() may lengthen a name (`ß` -> `ss`): the key must still fit its column."""
    key_chars = len(user_key(user))
    if key_chars > MAX_USER_CHARS:
        raise InvalidInput(
            f"{name} is too long once case-folded ({key_chars} characters, at most {MAX_USER_CHARS})"
        )
    return user


def validate_route_request(request: RouteRequest) -> None:
    """Every field but the identity (see `identity_from`); raises InvalidInput naming the field."""
    if not request.connection_id:
        raise InvalidInput("connection_id is required")
    _check_text("connection_id", request.connection_id, MAX_CONNECTION_ID_CHARS)
    _check_text("proxy_id", request.proxy_id, MAX_CONNECTION_ID_CHARS)
    _check_text("pool", request.pool, MAX_POOL_CHARS)
    _check_text("routing_token", request.routing_token, MAX_TOKEN_CHARS)
    _check_text("client_address", request.client_address, MAX_ADDRESS_CHARS)
    _check_text("failed_server_address", request.failed_server_address, MAX_ADDRESS_CHARS)
    if request.attempt > 100:
        raise InvalidInput("attempt is out of range (at most 100)")


def routing_token_address(token: str) -> str | None:
    """The `host:port` a routing token names; None for no token or an opaque one (DESIGN §3).

    Decoding is rdbroker_rdp's, the same the proxy uses. Only a value of Microsoft's shape whose
    numbers are out of range (a zero or over-large address or port) is malformed: InvalidInput.
    Any other value after `msts=` is another product's and is placed by cookie and policy instead.
    """
    text = token.strip()
    if not text:
        return None
    decoded = decode_routing_token(text)
    if decoded is not None:
        return f"{decoded[0]}:{decoded[1]}"
    if _MS_TOKEN_SHAPE.fullmatch(text):
        raise InvalidInput(
            f"malformed routing token {text[:40]!r}: "
            "address must be a u32 in 1..4294967295 and port a u16 in 1..65535"
        )
    return None
