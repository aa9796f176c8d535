"""Each connection's request heads, bounded in time and size before uvicorn reads them (server.py)."""

from __future__ import annotations

import asyncio
import logging
import re

from uvicorn.protocols.http.h11_impl import H11Protocol

from rdbroker_common.https import TlsContext

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of request line + headers


class BoundedProtocol(H11Protocol):
    """uvicorn's h11 protocol with two bounds on each request head, and a look at the TLS files on each
    new connection. The head must arrive within `head_timeout_s` (uvicorn times out only a connection
    idle after an answer) and end within MAX_HEAD bytes: h11's own limit only applies to a head still
    incomplete after a read, so one sent in a single burst (a read takes up to 256 KiB) would pass."""

    head_timeout_s = 10.0
    server_tls: TlsContext | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._head_size = 0  # bytes of the awaited head received so far
        self._tail = b""  # its last bytes, for an end of head split across reads
        super().connection_made(transport)
        self._arm()
        if self.server_tls is not None:
            try:
                self.server_tls.refresh()  # for the next connections: this one's handshake is done
            except Exception:  # a failed look at the files must not fail the connection
                log.exception("cannot check the TLS files")

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:  # a head is awaited
            window = self._tail + data
            end = _HEAD_END.search(window)
            size = self._head_size - len(self._tail) + (end.end() if end else len(window))
            if size > MAX_HEAD:
                self._refuse_head()
                return
            self._head_size += len(data)
            self._tail = window[-2:]
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head was read
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():
            self._arm()  # the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_size, self._tail = 0, b""
        self._deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()


_HEAD_END = re.compile(rb"\n\r?\n")  # as h11 finds it
_HEAD_TOO_LARGE_TEXT = f"request head longer than {MAX_HEAD} bytes\n".encode()
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    + f"content-length: {len(_HEAD_TOO_LARGE_TEXT)}\r\n".encode()
    + b"connection: close\r\n\r\n"
    + _HEAD_TOO_LARGE_TEXT
)
