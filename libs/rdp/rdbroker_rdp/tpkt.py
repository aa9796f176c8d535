"""TPKT (T.123 section 8) and the fixed X.224 Class 0 header shared by the Connection Request and Confirm.

    03 00 LL LL | LI CC DD DD SS SS OO
    version 3, reserved, big-endian length of the whole packet | length indicator, TPDU code, refs, class

Checks run in byte order and each one as soon as its byte has arrived, so a prefix of a bad packet is
refused by the same check, with the same message, as the whole packet.
"""

from __future__ import annotations

from .errors import X224Error

Buffer = bytes | bytearray | memoryview

TPKT_VERSION = 0x03
TPKT_HEADER_LEN = 4
X224_HEADER_LEN = 7
MIN_LEN = TPKT_HEADER_LEN + X224_HEADER_LEN  # 11: a CR or CC with no variable part
MAX_LEN = TPKT_HEADER_LEN + 1 + 254  # 259: LI is one byte and X.224 reserves 255

CODE_CONNECTION_REQUEST = 0xE0
CODE_CONNECTION_CONFIRM = 0xD0
_CODE_NAMES = {CODE_CONNECTION_REQUEST: "Connection Request", CODE_CONNECTION_CONFIRM: "Connection Confirm"}


def check_header(buf: Buffer, code: int) -> int | None:
    """Validate TPKT + X.224 header bytes that have arrived; return the TPKT length once all 11 are there.

    `None` means more bytes are needed for the header itself. The caller still has to wait for the
    whole TPKT length before reading the variable part.
    """
    n = len(buf)
    if n >= 1 and buf[0] != TPKT_VERSION:
        raise X224Error(f"TPKT version 0x{buf[0]:02x}, expected 0x03")
    if n >= 2 and buf[1] != 0:
        raise X224Error(f"TPKT reserved byte 0x{buf[1]:02x}, expected 0x00")
    if n < TPKT_HEADER_LEN:
        return None
    length = (buf[2] << 8) | buf[3]
    if not MIN_LEN <= length <= MAX_LEN:
        raise X224Error(f"TPKT length {length} outside {MIN_LEN}..{MAX_LEN}")
    if n >= 5 and buf[4] != length - 5:
        raise X224Error(f"X.224 length indicator {buf[4]} does not match TPKT length {length} - 5")
    # The high nibble is the TPDU code; the low nibble (credit) is not checked, as FreeRDP and xrdp do.
    if n >= 6 and buf[5] & 0xF0 != code:
        raise X224Error(f"X.224 code 0x{buf[5]:02x}, expected {_CODE_NAMES[code]} 0x{code:02x}")
    if n >= 11 and buf[10] >> 4 != 0:
        raise X224Error(f"X.224 class {buf[10] >> 4}, expected class 0")
    if n < MIN_LEN:
        return None
    return length


def build_header(length: int, code: int, src_ref: int) -> bytes:
    """TPKT + X.224 header for a packet of `length` bytes in total (11..259)."""
    if not MIN_LEN <= length <= MAX_LEN:
        raise ValueError(f"packet length {length} outside {MIN_LEN}..{MAX_LEN}")
    return bytes(
        [TPKT_VERSION, 0, length >> 8, length & 0xFF, length - 5, code, 0, 0, src_ref >> 8, src_ref & 0xFF, 0]
    )
