"""The package's public names (docs/contracts.md) stay exported."""

from __future__ import annotations

import subprocess
import sys

import rdbroker_rdp

CONTRACT = {
    "X224Error",
    "parse_first_packet",
    "FirstPacket",
    "ConnectionRequest",
    "PreconnectionPdu",
    "parse_connection_confirm",
    "ConnectionConfirm",
    "build_connection_request",
    "build_connection_confirm",
    "decode_routing_token",
    "encode_routing_token",
    "decode_cookie",
    "MAX_FIRST_PACKET",
}


def test_all_is_exactly_the_public_names() -> None:
    public = {name for name in vars(rdbroker_rdp) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(rdbroker_rdp, name)).__name__ == "module"}
    assert set(rdbroker_rdp.__all__) == public - modules
    assert set(rdbroker_rdp.__all__) >= CONTRACT


def test_x224error_is_a_valueerror() -> None:
    assert issubclass(rdbroker_rdp.X224Error, ValueError)


def test_the_codec_imports_no_io() -> None:
    io = {"asyncio", "socket", "selectors", "ssl", "subprocess", "rdbroker_rdp.fakeserver"}
    code = f"import sys; import rdbroker_rdp; print(sorted({io!r} & set(sys.modules)))"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
