"""The codec's one error.

    ValueError
     └── X224Error    a first packet or Connection Confirm that breaks the rules: drop the connection

Parsers return `None` while more bytes are needed and raise `X224Error` as soon as the bytes already
received prove the packet bad, so a caller can close a bad client without waiting for its deadline.
"""

from __future__ import annotations


class X224Error(ValueError):
    """The bytes are not a valid first packet (or Connection Confirm); the connection should be dropped."""
