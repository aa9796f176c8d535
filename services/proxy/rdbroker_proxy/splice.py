"""The byte pump between a client and its server, built on asyncio Protocols.

`Splice` is the server side's Protocol and also forwards the client side's bytes, so a spliced
connection costs two small objects and no task. Backpressure: when one side's write buffer passes
its high-water mark the loop calls `pause_writing`, and we stop reading from the other side until
`resume_writing`. Half-close: an EOF from one side becomes `write_eof()` on the other, and the
connection ends when both sides have sent EOF, or when either side closes or fails.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast


class SpliceOwner(Protocol):
    """What a splice needs from the client connection that owns it."""

    def finish(self, reason: str, *, abort: bool = False) -> None: ...


class Splice(asyncio.Protocol):
    __slots__ = (
        "_idle_timeout_s",
        "_idle_timer",
        "client",
        "client_eof",
        "from_client",
        "from_server",
        "last_activity",
        "owner",
        "server",
        "server_eof",
        "server_write_paused",
        "spliced",
    )

    def __init__(self, owner: SpliceOwner, client: asyncio.Transport, idle_timeout_s: float = 0.0) -> None:
        self.owner = owner
        self.client = client
        self.server: asyncio.Transport | None = None
        self.from_client = 0
        self.from_server = 0
        self.client_eof = False
        self.server_eof = False
        self.server_write_paused = False
        self.spliced = False
        self.last_activity = time.monotonic()
        self._idle_timeout_s = idle_timeout_s
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.server = transport

    def start(self, replay: bytes, client_eof: bool) -> None:
        """Replay what the client sent so far, then let bytes flow both ways."""
        assert self.server is not None
        self.spliced = True
        self.from_client += len(replay)
        self.server.write(replay)
        if client_eof:
            self.client_eof_received()
        elif not self.server_write_paused:
            self.client.resume_reading()
        if self._idle_timeout_s > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout_s, self._check_idle)

    # -- client -> server (called by the client's Protocol) ------------------------------------

    def client_data(self, data: bytes) -> None:
        assert self.server is not None
        self.from_client += len(data)
        self.last_activity = time.monotonic()
        self.server.write(data)

    def client_eof_received(self) -> None:
        self.client_eof = True
        assert self.server is not None
        if self.server_eof:
            self.owner.finish("server_closed")
        elif self.server.can_write_eof():
            self.server.write_eof()
        else:
            self.owner.finish("client_closed")

    def client_lost(self, exc: Exception | None) -> None:
        self.owner.finish("client_reset" if exc else "client_closed", abort=exc is not None)

    def client_write_paused(self) -> None:
        if self.server is not None:
            self.server.pause_reading()

    def client_write_resumed(self) -> None:
        if self.server is not None and not self.server.is_closing():
            self.server.resume_reading()

    # -- server -> client (this Protocol) ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.from_server += len(data)
        self.last_activity = time.monotonic()
        self.client.write(data)

    def eof_received(self) -> bool:
        self.server_eof = True
        if self.client_eof:
            self.owner.finish("client_closed")
            return False
        if self.client.can_write_eof():
            self.client.write_eof()
            return True  # keep the server's write side open: the client may still be talking
        self.owner.finish("server_closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.finish("server_reset" if exc else "server_closed", abort=exc is not None)

    def pause_writing(self) -> None:
        self.server_write_paused = True
        if self.spliced:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        self.server_write_paused = False
        if self.spliced and not self.client_eof and not self.client.is_closing():
            self.client.resume_reading()

    # -- idle watchdog and teardown -------------------------------------------------------------

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: the data path only stores a timestamp.
        idle_for = time.monotonic() - self.last_activity
        if idle_for >= self._idle_timeout_s:
            self._idle_timer = None
            self.owner.finish("idle_timeout")
            return
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle_timeout_s - idle_for, self._check_idle)

    def close(self, *, abort: bool = False) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.server is not None:
            if abort:
                self.server.abort()
            else:
                self.server.close()
