"""Hypothesis: build -> parse round-trips; arbitrary bytes fed whole or in pieces (cf. mitmproxy tls fuzz)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdbroker_rdp import (
    X224Error,
    build_connection_confirm,
    build_connection_request,
    build_preconnection,
    decode_routing_token,
    encode_routing_token,
    parse_connection_confirm,
    parse_first_packet,
    parse_preconnection,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

printable = st.characters(categories=("L", "M", "N", "P", "S", "Zs"))
line_text = st.text(alphabet=printable, max_size=40)
correlation_ids = st.binary(min_size=16, max_size=16).filter(lambda b: b[0] not in (0x00, 0xF4))
u32 = st.integers(0, 0xFFFFFFFF)


@FUZZ
@given(
    cookie=st.none() | line_text,
    token=st.none() | st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
    collection=st.none() | line_text,
    protocols=st.none() | u32,
    flags=st.integers(0, 0xFF).map(lambda f: f & ~0x08),
    correlation_id=st.none() | correlation_ids,
)
def test_request_round_trip(
    cookie: str | None,
    token: bytes | None,
    collection: str | None,
    protocols: int | None,
    flags: int,
    correlation_id: bytes | None,
) -> None:
    if protocols is None:
        flags, correlation_id = 0, None
    lbi = None if collection is None else "tsv://MS Terminal Services Plugin.1." + collection
    lines = [
        b"" if cookie is None else b"Cookie: mstshash=" + cookie.encode() + b"\r\n",
        b"" if token is None else b"Cookie: msts=" + token + b"\r\n",
        b"" if lbi is None else lbi.encode() + b"\r\n",
    ]
    neg = 0 if protocols is None else 8 + (36 if correlation_id else 0)
    if 11 + sum(map(len, lines)) + neg > 259:
        with pytest.raises(ValueError, match="over 259"):
            build_connection_request(cookie, token, lbi, protocols, flags, correlation_id)
        return
    buf = build_connection_request(cookie, token, lbi, protocols, flags, correlation_id)
    packet = parse_first_packet(buf)
    assert packet is not None
    req = packet.request
    assert packet.raw == buf
    assert req.cookie == (cookie.encode() or None if cookie is not None else None)
    assert req.routing_token == (token or None)
    assert req.collection == (collection or None)
    if protocols is None:
        assert req.negotiation is None
    else:
        assert req.negotiation is not None
        assert req.negotiation.requested_protocols == protocols
        assert req.negotiation.flags == flags | (0x08 if correlation_id else 0)
        assert req.negotiation.correlation_id == correlation_id


@FUZZ
@given(
    kind=st.sampled_from(["neg_rsp", "neg_failure", "none"]),
    value=u32,
    flags=st.integers(0, 0xFF),
)
def test_confirm_round_trip(kind: Any, value: int, flags: int) -> None:
    buf = build_connection_confirm(kind, selected_protocol=value, failure_code=value, flags=flags)
    cc = parse_connection_confirm(buf)
    assert cc is not None
    assert cc.kind == kind
    assert cc.raw == buf
    assert not cc.malformed
    assert cc.selected_protocol == (value if kind == "neg_rsp" else 0)
    assert cc.failure_code == (value if kind == "neg_failure" else 0)
    assert cc.flags == (0 if kind == "none" else flags)


# Text a client can send: UTF-16 without lone surrogates (the parser refuses those) and without NUL.
BLOB_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@FUZZ
@given(pdu_id=u32, blob=st.none() | st.text(alphabet=BLOB_TEXT, max_size=100))
def test_preconnection_round_trip(pdu_id: int, blob: str | None) -> None:
    buf = build_preconnection(pdu_id, blob)
    pcb = parse_preconnection(buf)
    assert pcb is not None
    assert (pcb.id, pcb.blob, pcb.version, pcb.raw) == (pdu_id, blob, 1 if blob is None else 2, buf)


@FUZZ
@given(host=st.ip_addresses(v=4).filter(lambda a: int(a) != 0), port=st.integers(1, 65535))
def test_routing_token_round_trip(host: Any, port: int) -> None:
    assert decode_routing_token(encode_routing_token(str(host), port)) == (str(host), port)


# --- fuzz -----------------------------------------------------------------------------------------

SEEDS = [
    build_connection_request("alice", requested_protocols=0xB, correlation_id=bytes(range(1, 17))),
    build_connection_request(routing_token="83886090.15629.0000", requested_protocols=3),
    build_connection_request(load_balance_info="tsv://MS Terminal Services Plugin.1.Sales"),
    build_preconnection(5, "TestVM") + build_connection_request("bob", requested_protocols=1),
    build_connection_confirm("neg_rsp", 2, flags=0x1F),
    build_connection_confirm("neg_failure", failure_code=2),
    build_connection_confirm("none"),
]


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid packet with a few bytes changed, cut, or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    buf = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    buf = buf[: draw(st.integers(0, len(buf)))] if draw(st.booleans()) else buf
    return bytes(buf + draw(st.binary(max_size=8)))


def outcome(parse: Callable[[Any], object], buf: Any) -> tuple[str, object]:
    try:
        result = parse(buf)
    except X224Error as exc:
        return ("error", str(exc))
    return ("need", None) if result is None else ("ok", result)


def incremental(parse: Callable[[Any], object], buf: bytes, cuts: list[int]) -> tuple[str, object]:
    """Feed `buf` in pieces ending at `cuts` (sorted), as a reader appending to a bytearray would."""
    acc = bytearray()
    start = 0
    for end in [*cuts, len(buf)]:
        acc += buf[start:end]
        start = end
        result = outcome(parse, acc)
        if result[0] != "need":
            return result
    return ("need", None)


@FUZZ
@given(buf=packets(), data=st.data())
def test_first_packet_fuzz(buf: bytes, data: st.DataObject) -> None:
    whole = outcome(parse_first_packet, buf)  # anything but X224Error propagates and fails the test
    cuts = sorted(data.draw(st.lists(st.integers(0, len(buf)), max_size=6)))
    assert incremental(parse_first_packet, buf, cuts) == whole
    assert outcome(parse_first_packet, memoryview(buf)) == whole


@FUZZ
@given(buf=packets(), data=st.data())
def test_confirm_fuzz(buf: bytes, data: st.DataObject) -> None:
    whole = outcome(parse_connection_confirm, buf)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(buf)), max_size=6)))
    assert incremental(parse_connection_confirm, buf, cuts) == whole


@settings(max_examples=60, deadline=None)
@given(buf=packets())
def test_one_byte_at_a_time_equals_whole(buf: bytes) -> None:
    cuts = list(range(len(buf)))
    assert incremental(parse_first_packet, buf, cuts) == outcome(parse_first_packet, buf)
    assert incremental(parse_connection_confirm, buf, cuts) == outcome(parse_connection_confirm, buf)


def test_one_byte_at_a_time_on_every_seed() -> None:
    for seed in SEEDS:
        for parse in (parse_first_packet, parse_connection_confirm):
            cuts = list(range(len(seed)))
            assert incremental(parse, seed, cuts) == outcome(parse, seed)


def test_build_preconnection_refuses_a_lone_surrogate() -> None:
    with pytest.raises(ValueError, match="UTF-16"):
        build_preconnection(1, "\ud800")
