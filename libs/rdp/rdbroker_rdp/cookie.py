"""The text lines of a Connection Request: `Cookie: mstshash=`, `Cookie: msts=`, `tsv://...`.

MS-RDPBCGR spells the prefixes exactly; like HAProxy we match `Cookie:` and the cookie name without
regard to case and skip spaces after the colon, so a client that varies the case still routes.
"""

from __future__ import annotations

TSV_PREFIX = b"tsv://"
COLLECTION_PREFIX = b"tsv://ms terminal services plugin.1."
MSTSC_COOKIE_CHARS = 9  # mstsc sends the login name cut to this many characters


def decode_cookie(value: bytes) -> str:
    """The cookie (or any line value) as text: UTF-8 when valid, else Windows-1252 ("ANSI" in the spec).

    Trailing space padding (mstsc pads truncated names) is kept; strip it where the identity is compared.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("cp1252", errors="replace")  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined


def cookie_value(line: bytes, name: bytes) -> bytes | None:
    """The value of `Cookie: <name>=VALUE` in `line` (no CRLF), or None when the line is another cookie."""
    if line[:7].lower() != b"cookie:":
        return None
    rest = line[7:].lstrip(b" ")
    prefix = name + b"="
    if rest[: len(prefix)].lower() != prefix:
        return None
    return rest[len(prefix) :]


def collection_name(line: bytes) -> str | None:
    """`Sales` from `tsv://MS Terminal Services Plugin.1.Sales`; None for other forms or an empty name."""
    if line[: len(COLLECTION_PREFIX)].lower() != COLLECTION_PREFIX:
        return None
    name = line[len(COLLECTION_PREFIX) :]
    return decode_cookie(name) if name else None
