"""Routing tokens (msts=) and cookie text."""

from __future__ import annotations

import pytest

from rdbroker_rdp import decode_cookie, decode_routing_token, encode_routing_token


@pytest.mark.parametrize(
    ("token", "address"),
    [
        ("3640205228.15629.0000", ("172.31.249.216", 3389)),  # Microsoft's example
        ("2134026432.15629.0000", ("192.168.50.127", 3389)),  # FreeRDP's redirection dump
        ("83886090.15629.0000", ("10.0.0.5", 3389)),
        ("16777343.15629.0000", ("127.0.0.1", 3389)),
        ("50462986.15885.0000", ("10.1.2.3", 3390)),
        (b"50462986.15885.0000", ("10.1.2.3", 3390)),
        ("83886090.15629.", ("10.0.0.5", 3389)),  # reserved part optional, dot required
        ("83886090.15629.0000 ", ("10.0.0.5", 3389)),  # padded to an even length
    ],
)
def test_decode(token: str | bytes, address: tuple[str, int]) -> None:
    assert decode_routing_token(token) == address


@pytest.mark.parametrize(
    "token",
    [
        "",
        "2464288595",  # gnome-remote-desktop's opaque value
        "Cookie: msts=2464288595",
        "83886090.15629",  # the dot after the port is required
        "10.0.0.5:3389",  # FreeRDP proxy's host:port form
        "83886090.15629.00x0",
        "0.15629.0000",  # 0.0.0.0 is no server
        "83886090.0.0000",
        "4294967296.15629.0000",
        "83886090.65536.0000",
        "+83886090.15629.0000",
        " 83886090.15629.0000",
        "\u0661\u0662.15629.0000",  # non-ASCII digits
        "83886090.15629.0000\r\n",
        b"\xff\xfe.1.",
    ],
)
def test_opaque(token: str | bytes) -> None:
    assert decode_routing_token(token) is None


def test_encode() -> None:
    assert encode_routing_token("172.31.249.216", 3389) == "3640205228.15629.0000"
    assert encode_routing_token("10.1.2.3", 3390) == "50462986.15885.0000"


@pytest.mark.parametrize(
    ("host", "port"), [("::1", 3389), ("ts1.example", 3389), ("10.0.0.1", 0), ("10.0.0.1", 65536)]
)
def test_encode_refuses(host: str, port: int) -> None:
    with pytest.raises(ValueError, match=r"IPv4|port"):
        encode_routing_token(host, port)


def test_decode_cookie() -> None:
    assert decode_cookie(b"AWAKECODI") == "AWAKECODI"
    assert decode_cookie("José".encode()) == "José"
    assert decode_cookie(b"Jos\xe9") == "José"  # ANSI (cp1252)
    assert decode_cookie(b"\x80uro") == "€uro"
    assert decode_cookie(b"a\x81b") == "a\ufffdb"  # undefined in cp1252
    assert decode_cookie(b"JOHN-PC  ") == "JOHN-PC  "  # padding is kept
