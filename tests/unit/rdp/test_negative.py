"""Bounds and malformed input: each case with its exact outcome (a result, need-more, or X224Error)."""

from __future__ import annotations

import struct

import pytest

from rdbroker_rdp import (
    X224Error,
    build_connection_request,
    decode_routing_token,
    parse_connection_confirm,
    parse_connection_request,
    parse_first_packet,
)

NEG_SSL_HYBRID = bytes.fromhex("030000130ee000000000000100080003000000")


def cr(body: bytes, *, length: int | None = None, li: int | None = None, code: int = 0xE0) -> bytes:
    total = 11 + len(body) if length is None else length
    li = total - 5 if li is None else li
    return bytes([3, 0, total >> 8, total & 0xFF, li & 0xFF, code, 0, 0, 0, 0, 0]) + body


def test_bare_11_byte_cr_is_valid() -> None:
    packet = parse_first_packet(cr(b""))
    assert packet is not None
    req = packet.request
    assert (req.cookie, req.routing_token, req.collection, req.negotiation, req.load_balance_info) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert packet.consumed == 11


def test_empty_cookie_is_no_identity() -> None:
    req = parse_connection_request(cr(b"Cookie: mstshash=\r\n" + NEG_SSL_HYBRID[11:]))
    assert req is not None
    assert req.cookie is None
    assert req.negotiation is not None


def test_empty_msts_is_no_token() -> None:
    req = parse_connection_request(cr(b"Cookie: msts=\r\n"))
    assert req is not None
    assert req.routing_token is None


@pytest.mark.parametrize("length", [0, 10, 260, 65535])
def test_tpkt_length_out_of_bounds_is_refused_from_the_header_alone(length: int) -> None:
    header = bytes([3, 0, length >> 8, length & 0xFF])
    with pytest.raises(X224Error, match=rf"TPKT length {length} outside 11\.\.259"):
        parse_first_packet(header)


def test_li_mismatch() -> None:
    with pytest.raises(X224Error, match="length indicator 15 does not match TPKT length 19"):
        parse_first_packet(cr(NEG_SSL_HYBRID[11:], li=15))


def test_li_mismatch_is_refused_before_the_body_arrives() -> None:
    with pytest.raises(X224Error, match="length indicator"):
        parse_first_packet(cr(NEG_SSL_HYBRID[11:], li=15)[:5])


def test_trailing_bytes_inside_the_tpkt_after_neg_req() -> None:
    with pytest.raises(X224Error, match="1 trailing bytes inside the TPKT"):
        parse_first_packet(cr(NEG_SSL_HYBRID[11:] + b"\x00"))


def test_bytes_after_the_tpkt_are_left_to_the_caller() -> None:
    buf = NEG_SSL_HYBRID + b"\x16\x03\x01"
    packet = parse_first_packet(buf)
    assert packet is not None
    assert packet.raw == NEG_SSL_HYBRID
    assert packet.consumed == 19
    assert buf[packet.consumed :] == b"\x16\x03\x01"


def test_zeroed_neg_req() -> None:
    with pytest.raises(X224Error, match="unexpected byte 0x00 where RDP_NEG_REQ"):
        parse_first_packet(cr(bytes(8)))


def test_neg_req_bad_length_field() -> None:
    with pytest.raises(X224Error, match="RDP_NEG_REQ length field 9"):
        parse_first_packet(cr(bytes.fromhex("0100090003000000")))


def test_neg_req_truncated() -> None:
    with pytest.raises(X224Error, match="RDP_NEG_REQ truncated: 5 of 8"):
        parse_first_packet(cr(bytes.fromhex("0100080003")))


def correlation(first: int, reserved: bytes = bytes(16)) -> bytes:
    return (
        bytes.fromhex("010808000b000000060024 00".replace(" ", ""))
        + bytes([first])
        + bytes(range(2, 17))
        + reserved
    )


def test_correlation_id_starting_0x00() -> None:
    with pytest.raises(X224Error, match="correlation id starts with 0x00"):
        parse_first_packet(cr(correlation(0x00)))


def test_correlation_id_starting_0xf4() -> None:
    with pytest.raises(X224Error, match="correlation id starts with 0xf4"):
        parse_first_packet(cr(correlation(0xF4)))


def test_correlation_id_holding_0x0d_is_accepted() -> None:
    packet = parse_first_packet(cr(correlation(0x01)))  # the id 01 02 .. 10 holds 0x0d, as ANCHORS V12
    assert packet is not None
    assert packet.request.negotiation is not None
    assert packet.request.negotiation.correlation_id == bytes(range(1, 17))


def test_correlation_reserved_not_zero() -> None:
    with pytest.raises(X224Error, match="reserved bytes are not zero"):
        parse_first_packet(cr(correlation(0x01, reserved=bytes(15) + b"\x01")))


def test_correlation_flag_without_correlation_info() -> None:
    with pytest.raises(X224Error, match="CORRELATION_INFO truncated: 0 of 36"):
        parse_first_packet(cr(bytes.fromhex("010808000b000000")))


def test_wrong_tpkt_version_in_a_request() -> None:
    with pytest.raises(X224Error, match="TPKT version 0x02, expected 0x03"):
        parse_connection_request(b"\x02\x00\x00\x13")


def test_wrong_tpkt_version_as_a_first_packet() -> None:
    # 02 00 00 13 could open a preconnection PDU; its cbSize is far out of bounds.
    with pytest.raises(X224Error, match=r"neither a TPKT nor a preconnection PDU: .*cbSize 318767106"):
        parse_first_packet(b"\x02\x00\x00\x13" + NEG_SSL_HYBRID[4:])


def test_tpkt_reserved_byte() -> None:
    with pytest.raises(X224Error, match="TPKT reserved byte 0x01"):
        parse_connection_request(b"\x03\x01")


def test_wrong_x224_code() -> None:
    with pytest.raises(X224Error, match=r"X\.224 code 0xd0, expected Connection Request"):
        parse_first_packet(cr(b"", code=0xD0))


def test_data_tpdu_is_not_a_request() -> None:
    with pytest.raises(X224Error, match=r"X\.224 code 0xf0"):
        parse_first_packet(cr(b"", code=0xF0))


def test_class_other_than_0() -> None:
    buf = bytearray(cr(b""))
    buf[10] = 0x40
    with pytest.raises(X224Error, match="class 4, expected class 0"):
        parse_first_packet(bytes(buf))


def test_missing_crlf() -> None:
    with pytest.raises(X224Error, match="not terminated by CR LF"):
        parse_first_packet(cr(b"Cookie: mstshash=bob"))


def test_cr_without_lf() -> None:
    with pytest.raises(X224Error, match="not terminated by CR LF"):
        parse_first_packet(cr(b"Cookie: mstshash=bob\r" + NEG_SSL_HYBRID[11:]))


def test_http_and_tls_are_refused_at_once() -> None:
    with pytest.raises(X224Error, match="neither a TPKT"):
        parse_first_packet(b"GET / HTTP/1.1\r\n")
    with pytest.raises(X224Error, match="neither a TPKT"):
        parse_first_packet(bytes.fromhex("160301020001"))


def test_every_prefix_of_a_valid_packet_needs_more() -> None:
    buf = build_connection_request(cookie="alice", requested_protocols=3, correlation_id=bytes(range(1, 17)))
    for end in range(len(buf)):
        assert parse_first_packet(buf[:end]) is None
    assert parse_first_packet(buf) is not None


def test_cookie_prefix_is_case_insensitive_and_skips_spaces() -> None:
    req = parse_connection_request(cr(b"cookie:   MSTSHASH=bob\r\n"))
    assert req is not None
    assert req.cookie == b"bob"


def test_token_and_cookie_together_are_both_kept() -> None:
    buf = build_connection_request(cookie="bob", routing_token="83886090.15629.0000", requested_protocols=0)
    req = parse_connection_request(buf)
    assert req is not None
    assert (req.cookie, req.routing_token) == (b"bob", b"83886090.15629.0000")


def test_opaque_msts_value_is_kept_and_is_not_an_address() -> None:
    req = parse_connection_request(cr(b"Cookie: msts=Cookie: msts=2464288595\r\n"))
    assert req is not None
    assert req.routing_token == b"Cookie: msts=2464288595"
    assert decode_routing_token(req.routing_token) is None


def test_other_lines_are_load_balance_info_without_collection() -> None:
    req = parse_connection_request(cr(b"tsv://VMResource.1.Pool\r\n"))
    assert req is not None
    assert (req.load_balance_info, req.collection, req.cookie) == (b"tsv://VMResource.1.Pool", None, None)
    req = parse_connection_request(cr(b"tsv://MS Terminal Services Plugin.1.\r\n"))
    assert req is not None
    assert req.collection is None


def test_collection_keeps_its_case_and_spaces() -> None:
    req = parse_connection_request(cr(b"tsv://ms terminal services plugin.1.Sales Team EU\r\n"))
    assert req is not None
    assert req.collection == "Sales Team EU"


def test_cookie_bytes_beyond_ascii_are_kept() -> None:
    req = parse_connection_request(cr(b"Cookie: mstshash=Jos\xe9\r\n"))
    assert req is not None
    assert req.cookie == b"Jos\xe9"


# --- Connection Confirm -------------------------------------------------------------------------


def cc(body: bytes) -> bytes:
    total = 11 + len(body)
    return bytes([3, 0, 0, total, total - 5, 0xD0, 0, 0, 0x12, 0x34, 0]) + body


def test_confirm_prefixes_need_more() -> None:
    buf = cc(struct.pack("<BBHI", 2, 0, 8, 1))
    for end in range(len(buf)):
        assert parse_connection_confirm(buf[:end]) is None


def test_confirm_truncated_negotiation_data() -> None:
    with pytest.raises(X224Error, match="truncated: 4 of 8"):
        parse_connection_confirm(cc(b"\x02\x00\x08\x00"))


def test_confirm_unknown_negotiation_type() -> None:
    with pytest.raises(X224Error, match="unknown negotiation type 0x07"):
        parse_connection_confirm(cc(struct.pack("<BBHI", 7, 0, 8, 1)))


def test_confirm_with_extra_bytes_inside_the_tpkt_is_flagged() -> None:
    confirm = parse_connection_confirm(cc(struct.pack("<BBHI", 3, 0, 8, 5) + b"\x00\x00"))
    assert confirm is not None
    assert (confirm.kind, confirm.failure_code, confirm.malformed) == ("neg_failure", 5, True)


def test_request_is_not_a_confirm() -> None:
    with pytest.raises(X224Error, match="expected Connection Confirm"):
        parse_connection_confirm(NEG_SSL_HYBRID)


@pytest.mark.parametrize("length", [0, 10, 260, 65535])
def test_confirm_length_bounds(length: int) -> None:
    with pytest.raises(X224Error, match="TPKT length"):
        parse_connection_confirm(bytes([3, 0, length >> 8, length & 0xFF]))
