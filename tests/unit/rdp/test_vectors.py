"""Every vector in DESIGN.md section 3, ANCHORS.md 1.9 and shared/vectors/public parses as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdbroker_rdp import (
    PROTOCOL_HYBRID,
    PROTOCOL_HYBRID_EX,
    PROTOCOL_RDP,
    PROTOCOL_SSL,
    SSL_NOT_ALLOWED_BY_SERVER,
    ConnectionConfirm,
    FirstPacket,
    decode_cookie,
    decode_routing_token,
    parse_connection_confirm,
    parse_first_packet,
)
from tests.conftest import SHARED

VECTORS = SHARED / "vectors" / "public"


def first(hex_text: str) -> FirstPacket:
    buf = bytes.fromhex(hex_text.replace(" ", ""))
    packet = parse_first_packet(buf)
    assert packet is not None
    assert packet.raw == buf
    assert packet.consumed == len(buf)
    assert packet.preconnection is None
    return packet


def confirm(hex_text: str) -> ConnectionConfirm:
    buf = bytes.fromhex(hex_text.replace(" ", ""))
    cc = parse_connection_confirm(buf)
    assert cc is not None
    return cc


def test_design_cr_mstshash_eltons_neg_rdp() -> None:
    req = first(
        "0300002c27e00000000000436f6f6b69653a206d737473686173683d656c746f6e730d0a0100080000000000"
    ).request
    assert req.cookie == b"eltons"
    assert req.routing_token is None
    assert req.collection is None
    assert req.negotiation is not None
    assert (req.negotiation.flags, req.negotiation.requested_protocols) == (0, PROTOCOL_RDP)


def test_design_cr_cookie_only() -> None:
    req = first("030000241fe00000000000436f6f6b69653a206d737473686173683d4137303036370d0a").request
    assert req.cookie == b"A70067"
    assert req.negotiation is None


def test_design_cr_neg_req_only() -> None:
    req = first("030000130ee000000000000100080003000000").request
    assert req.cookie is None
    assert req.routing_token is None
    assert req.negotiation is not None
    assert req.negotiation.requested_protocols == PROTOCOL_SSL | PROTOCOL_HYBRID
    assert req.negotiation.correlation_id is None


def test_design_cr_msts_token() -> None:
    req = first(
        "0300003530e00000000000436f6f6b69653a206d7374733d38333838363039302e31353632392e303030300d0a"
        "0100080003000000"
    ).request
    assert req.cookie is None
    assert req.routing_token == b"83886090.15629.0000"
    assert decode_routing_token(req.routing_token) == ("10.0.0.5", 3389)
    assert req.negotiation is not None
    assert req.negotiation.requested_protocols == 3


def test_design_cr_tsv_collection() -> None:
    req = first(
        "0300003e39e000000000007473763a2f2f4d53205465726d696e616c20536572766963657320506c7567696e2e312e"
        "53616c65730d0a0100080003000000"
    ).request
    assert req.collection == "Sales"
    assert req.load_balance_info == b"tsv://MS Terminal Services Plugin.1.Sales"
    assert req.cookie is None
    assert req.routing_token is None


@pytest.mark.parametrize(
    ("hex_text", "kind", "selected", "failure", "flags"),
    [
        ("030000130ed000001234000200080000000000", "neg_rsp", PROTOCOL_RDP, 0, 0),
        ("030000130ed000001234000200080001000000", "neg_rsp", PROTOCOL_SSL, 0, 0),
        ("030000130ed000001234000300080002000000", "neg_failure", 0, SSL_NOT_ALLOWED_BY_SERVER, 0),
        ("0300000b06d00000123400", "none", 0, 0, 0),
        ("030000130ed000001234000209080002000000", "neg_rsp", PROTOCOL_HYBRID, 0, 0x09),  # ANCHORS V6
    ],
)
def test_design_connection_confirms(
    hex_text: str, kind: str, selected: int, failure: int, flags: int
) -> None:
    cc = confirm(hex_text)
    assert (cc.kind, cc.selected_protocol, cc.failure_code, cc.flags, cc.malformed) == (
        kind,
        selected,
        failure,
        flags,
        False,
    )
    assert cc.raw == bytes.fromhex(hex_text)


def test_anchor_v12_correlation_info() -> None:
    req = first(
        "0300004f4ae00000000000436f6f6b69653a206d737473686173683d616c6963650d0a"
        "010808000b000000060024000102030405060708090a0b0c0d0e0f10" + "00" * 16
    ).request
    assert req.cookie == b"alice"
    assert req.negotiation is not None
    assert req.negotiation.flags == 0x08
    assert req.negotiation.requested_protocols == PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX
    assert req.negotiation.correlation_id == bytes(range(1, 17))


def test_anchor_v13_truncated_domain_cookie() -> None:
    req = first(
        "0300002f2ae00000000000436f6f6b69653a206d737473686173683d444f4d41494e5c75730d0a010008000b000000"
    ).request
    assert req.cookie == b"DOMAIN\\us"
    assert decode_cookie(req.cookie) == "DOMAIN\\us"


# What shared/vectors/public/README.md says each capture shows.
PUBLIC_REQUESTS: dict[str, tuple[bytes | None, int | None]] = {
    "pub_zeek_win7_mstsc_nla": (b"AWAKECODI", 0x3),
    "pub_zeek_no_cookie_hybrid_ex": (None, 0xB),
    "pub_zeek_domain_cookie_ssl_refused": (b"FTBCO\\A70", 0x1),
    "pub_zeek_domain_cookie_retry_rdp": (b"FTBCO\\A70", 0x0),
    "pub_zeek_cookie_trailing_spaces": (b"JOHN-PC  ", 0x0),
    "pub_redemption_mstsc_win10": (b"x", 0xB),
    "pub_redemption_rdesktop": (b"rzhou", 0x3),
    "pub_nmap_probe_terminalservercookie": (b"nmap", 0x3),
    "pub_nmap_probe_terminalserver": (None, None),
}
# (kind, selected protocol, failure code, flags, malformed, bytes after the TPKT)
PUBLIC_REPLIES: dict[str, tuple[str, int, int, int, bool, int]] = {
    "pub_zeek_win7_mstsc_nla": ("neg_rsp", PROTOCOL_HYBRID, 0, 0x01, False, 0),
    "pub_zeek_no_cookie_hybrid_ex": ("neg_rsp", PROTOCOL_HYBRID_EX, 0, 0x1F, False, 0),
    "pub_zeek_domain_cookie_ssl_refused": ("neg_failure", 0, SSL_NOT_ALLOWED_BY_SERVER, 0, False, 0),
    "pub_zeek_domain_cookie_retry_rdp": ("neg_rsp", PROTOCOL_RDP, 0, 0, False, 0),
    "pub_zeek_cookie_trailing_spaces": ("neg_rsp", PROTOCOL_RDP, 0, 0, False, 0),
    "pub_redemption_mstsc_win10": ("neg_rsp", PROTOCOL_SSL, 0, 0x01, False, 0),
    "pub_redemption_rdesktop": ("none", 0, 0, 0, False, 0),
    # NEG_RSP length field 0: read anyway and flagged; the 12 bytes past the TPKT are left to the caller.
    "pub_zeek_invalid_length": ("neg_rsp", 0x02000001, 0, 0x03, True, 12),
}


def read_vector(path: Path) -> bytes:
    return bytes.fromhex(path.read_text().strip())


def test_every_public_file_is_covered() -> None:
    names = {p.name for p in VECTORS.glob("*.hex")}
    expected = {f"{n}.hex" for n in PUBLIC_REQUESTS} | {f"{n}.reply.hex" for n in PUBLIC_REPLIES}
    assert names == expected


@pytest.mark.parametrize("name", sorted(PUBLIC_REQUESTS))
def test_public_request(name: str) -> None:
    cookie, protocols = PUBLIC_REQUESTS[name]
    buf = read_vector(VECTORS / f"{name}.hex")
    packet = parse_first_packet(buf)
    assert packet is not None
    assert packet.consumed == len(buf)
    assert packet.request.cookie == cookie
    assert packet.request.routing_token is None
    if protocols is None:
        assert packet.request.negotiation is None
        assert len(buf) == 11
    else:
        assert packet.request.negotiation is not None
        assert packet.request.negotiation.requested_protocols == protocols


@pytest.mark.parametrize("name", sorted(PUBLIC_REPLIES))
def test_public_reply(name: str) -> None:
    kind, selected, failure, flags, malformed, beyond = PUBLIC_REPLIES[name]
    buf = read_vector(VECTORS / f"{name}.reply.hex")
    cc = parse_connection_confirm(buf)
    assert cc is not None
    assert (cc.kind, cc.selected_protocol, cc.failure_code, cc.flags, cc.malformed) == (
        kind,
        selected,
        failure,
        flags,
        malformed,
    )
    assert len(buf) - cc.consumed == beyond
    assert cc.raw == buf[: cc.consumed]


def test_truncated_cookies_are_nine_characters() -> None:
    for name in (
        "pub_zeek_win7_mstsc_nla",
        "pub_zeek_domain_cookie_ssl_refused",
        "pub_zeek_cookie_trailing_spaces",
    ):
        packet = parse_first_packet(read_vector(VECTORS / f"{name}.hex"))
        assert packet is not None
        assert packet.request.cookie is not None
        assert len(decode_cookie(packet.request.cookie)) == 9
