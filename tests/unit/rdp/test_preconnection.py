"""RDP_PRECONNECTION_PDU before the Connection Request: recognised, bounded, kept raw, replayed in order."""

from __future__ import annotations

import struct

import pytest

from rdbroker_rdp import (
    MAX_FIRST_PACKET,
    MAX_PRECONNECTION,
    X224Error,
    build_connection_request,
    build_preconnection,
    parse_first_packet,
    parse_preconnection,
)

# MS-RDPEPS section 4 examples.
SPEC_V1 = bytes.fromhex("100000000000000001000000eb99c6ee")
SPEC_V2 = bytes.fromhex("200000000000000002000000000000000700540065007300740056004d000000")
HYPERV_BLOB = "BA1B6DBD-89AC-4630-A737-C4BCC3BB99FB;EnhancedMode=1"
CR = build_connection_request(requested_protocols=3)


def test_spec_v1_example() -> None:
    pcb = parse_preconnection(SPEC_V1)
    assert pcb is not None
    assert (pcb.version, pcb.flags, pcb.id, pcb.blob, pcb.raw) == (1, 0, 0xEEC699EB, None, SPEC_V1)
    assert build_preconnection(0xEEC699EB) == SPEC_V1


def test_spec_v2_example() -> None:
    assert len(SPEC_V2) == 32
    pcb = parse_preconnection(SPEC_V2)
    assert pcb is not None
    assert (pcb.version, pcb.id, pcb.blob) == (2, 0, "TestVM")
    assert build_preconnection(0, "TestVM") == SPEC_V2


def test_hyperv_example_then_request() -> None:
    pcb_bytes = build_preconnection(0, HYPERV_BLOB)
    assert len(pcb_bytes) == 0x7A  # the spec's 122-byte example
    buf = pcb_bytes + CR + b"\x16\x03"
    packet = parse_first_packet(buf)
    assert packet is not None
    assert packet.preconnection is not None
    assert packet.preconnection.blob == HYPERV_BLOB
    assert packet.request.negotiation is not None
    assert packet.raw == pcb_bytes + CR  # replayed in order
    assert packet.consumed == len(pcb_bytes) + len(CR)
    assert buf[packet.consumed :] == b"\x16\x03"


def test_preconnection_alone_needs_the_request() -> None:
    assert parse_first_packet(SPEC_V1) is None
    assert parse_first_packet(SPEC_V1 + CR[:5]) is None
    packet = parse_first_packet(SPEC_V1 + CR)
    assert packet is not None
    assert packet.preconnection is not None
    assert packet.preconnection.id == 0xEEC699EB


def test_request_after_preconnection_is_still_checked() -> None:
    with pytest.raises(X224Error, match="TPKT version"):
        parse_first_packet(SPEC_V1 + SPEC_V1)


def test_cbsize_259_starts_with_03_but_is_a_preconnection_pdu() -> None:
    pcb_bytes = struct.pack("<IIIIH", 259, 0, 2, 7, 0) + bytes(259 - 18)  # v2 with slack bytes
    assert pcb_bytes[:2] == b"\x03\x01"
    packet = parse_first_packet(pcb_bytes + CR)
    assert packet is not None
    assert packet.preconnection is not None
    assert packet.preconnection.id == 7


@pytest.mark.parametrize("size", [0, 15, 17, MAX_PRECONNECTION + 1, 0xFFFFFFFF])
def test_cbsize_bounds_from_four_bytes(size: int) -> None:
    with pytest.raises(X224Error, match=f"cbSize {size} outside"):
        parse_first_packet(struct.pack("<I", size))


def test_version_other_than_1_or_2() -> None:
    with pytest.raises(X224Error, match="version 3, expected 1 or 2"):
        parse_first_packet(struct.pack("<IIII", 16, 0, 3, 0))


def test_v1_longer_than_16() -> None:
    with pytest.raises(X224Error, match="v1 with cbSize 20"):
        parse_first_packet(struct.pack("<IIIII", 20, 0, 1, 0, 0))


def test_v2_string_overflows_cbsize() -> None:
    with pytest.raises(X224Error, match="string of 10 characters overflows cbSize 20"):
        parse_first_packet(struct.pack("<IIIIH", 20, 0, 2, 0, 10) + b"\x00\x00")


def test_v2_invalid_utf16() -> None:
    with pytest.raises(X224Error, match="not valid UTF-16"):
        parse_first_packet(struct.pack("<IIIIH", 20, 0, 2, 0, 1) + b"\x00\xd8")


def test_v2_empty_string_and_slack_bytes() -> None:
    pcb = parse_preconnection(struct.pack("<IIIIH", 22, 0, 2, 9, 0) + b"zzzz")
    assert pcb is not None
    assert (pcb.blob, pcb.id, len(pcb.raw)) == ("", 9, 22)


def test_bound_on_bytes_before_a_decision() -> None:
    biggest = build_preconnection(1, "y" * ((MAX_PRECONNECTION - 20) // 2))
    cr = build_connection_request(load_balance_info="tsv://" + "z" * 240)
    assert len(biggest) == MAX_PRECONNECTION
    assert len(cr) == 259
    packet = parse_first_packet(biggest + cr)
    assert packet is not None
    assert packet.consumed == MAX_FIRST_PACKET


def test_builder_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="NUL"):
        build_preconnection(1, "a\x00b")
    with pytest.raises(ValueError, match="over 4096"):
        build_preconnection(1, "y" * 3000)
