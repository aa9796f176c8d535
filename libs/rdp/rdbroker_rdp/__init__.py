"""Sans-IO codec for the first RDP packets: TPKT, X.224 Connection Request/Confirm, routing tokens.

Nothing here does I/O except `rdbroker_rdp.fakeserver` (a test and demo server), which this package
does not import.
"""

from .confirm import (
    HYBRID_REQUIRED_BY_SERVER,
    INCONSISTENT_FLAGS,
    SSL_CERT_NOT_ON_SERVER,
    SSL_NOT_ALLOWED_BY_SERVER,
    SSL_REQUIRED_BY_SERVER,
    SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER,
    ConfirmKind,
    ConnectionConfirm,
    build_connection_confirm,
    parse_connection_confirm,
)
from .cookie import MSTSC_COOKIE_CHARS, decode_cookie
from .errors import X224Error
from .first_packet import MAX_FIRST_PACKET, FirstPacket, parse_first_packet
from .negotiation import (
    CORRELATION_INFO_PRESENT,
    PROTOCOL_HYBRID,
    PROTOCOL_HYBRID_EX,
    PROTOCOL_RDP,
    PROTOCOL_RDSAAD,
    PROTOCOL_RDSTLS,
    PROTOCOL_SSL,
    NegotiationRequest,
)
from .preconnection import MAX_PRECONNECTION, PreconnectionPdu, build_preconnection, parse_preconnection
from .token import decode_routing_token, encode_routing_token
from .x224 import ConnectionRequest, build_connection_request, parse_connection_request

__all__ = [
    "CORRELATION_INFO_PRESENT",
    "HYBRID_REQUIRED_BY_SERVER",
    "INCONSISTENT_FLAGS",
    "MAX_FIRST_PACKET",
    "MAX_PRECONNECTION",
    "MSTSC_COOKIE_CHARS",
    "PROTOCOL_HYBRID",
    "PROTOCOL_HYBRID_EX",
    "PROTOCOL_RDP",
    "PROTOCOL_RDSAAD",
    "PROTOCOL_RDSTLS",
    "PROTOCOL_SSL",
    "SSL_CERT_NOT_ON_SERVER",
    "SSL_NOT_ALLOWED_BY_SERVER",
    "SSL_REQUIRED_BY_SERVER",
    "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
    "ConfirmKind",
    "ConnectionConfirm",
    "ConnectionRequest",
    "FirstPacket",
    "NegotiationRequest",
    "PreconnectionPdu",
    "X224Error",
    "build_connection_confirm",
    "build_connection_request",
    "build_preconnection",
    "decode_cookie",
    "decode_routing_token",
    "encode_routing_token",
    "parse_connection_confirm",
    "parse_connection_request",
    "parse_first_packet",
    "parse_preconnection",
]
