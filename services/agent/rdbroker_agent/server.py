"""The agent's HTTP endpoint: `GET /load` (text) and `GET /sessions` (JSON), nothing else.

A deliberately small HTTP/1.1 server on asyncio streams: one request per connection, a bounded
request head read under a deadline, `Connection: close`. Load balancers poll it every few seconds,
so nothing here needs keep-alive, and no web framework has to be installed on the terminal servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from types import TracebackType

from .config import AgentConfig
from .errors import SourceError
from .load import DRAIN, is_drained, measure_load, omits_disconnected, read_sessions
from .shared import SharedResult
from .sources import Sources

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of request line + headers
MAX_HEADERS = 64
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class AgentServer:
    def __init__(
        self,
        config: AgentConfig,
        sources: Sources,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        request_timeout_s: float = 10.0,
        load_cache_s: float = 1.0,
        max_connections: int = 64,
    ):
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.config = config
        self.sources = sources
        self.host = host
        self.port = port
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.load = SharedResult(lambda: measure_load(self.config, self.sources), load_cache_s)
        self.open_connections = 0
        self.refused_connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Over the cap the connection is closed at once: no request is read, nothing is computed.
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            log.debug("agent at %d connections: closing a new one", self.open_connections)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            return
        self.open_connections += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self.open_connections -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # The deadline covers the client's part (sending the head, taking the answer); computing
            # the answer is bounded by command_timeout_s on each command instead.
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    method, target = await _read_head(reader)
                status, body, content_type = await self._answer(method, target)
            except _BadRequest as exc:
                status, body, content_type = _text(400, str(exc))
            except (TimeoutError, ConnectionError, OSError):
                raise
            except Exception:  # a bug must not leave the poller hanging: answer 500 and log it
                log.exception("agent request failed")
                status, body, content_type = _text(500, "internal error")
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n"
            )
            if status == 405:
                head += "Allow: GET\r\n"
            async with asyncio.timeout(self.request_timeout_s):
                writer.write(head.encode("ascii") + b"\r\n" + body)
                await writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("agent request ended early: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, method: str, target: str) -> tuple[int, bytes, str]:
        if target not in ("/load", "/sessions"):
            return _text(404, "not found: try /load or /sessions")
        if method != "GET":
            return _text(405, "only GET")
        if target == "/load":
            # Draining takes effect at once: the flag is one stat, never served from the cache.
            if is_drained(self.config):
                return _text(200, DRAIN)
            return _text(200, await self.load.get())
        try:
            sessions = await read_sessions(self.config, self.sources)
        except SourceError as exc:
            log.warning("session source failed: %s", exc)
            return _text(503, f"session source failed: {exc}")
        # The object form says whether the list can show disconnected sessions: the broker must not
        # end a disconnected session for its absence from a list that never shows them.
        answer = {
            "omits_disconnected": omits_disconnected(self.config),
            "sessions": [{"user": s.user, "state": s.state} for s in sessions],
        }
        body = json.dumps(answer, ensure_ascii=False)
        return 200, body.encode("utf-8"), "application/json"


class _BadRequest(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(method, path without query) from the request head; _BadRequest for a head we refuse."""
    try:
        request_line = await reader.readline()
        for _ in range(MAX_HEADERS):
            if (await reader.readline()).strip() == b"":
                break
        else:
            raise _BadRequest("too many headers")
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise _BadRequest("request head too long") from exc
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest("bad request line")
    return parts[0], parts[1].split("?", 1)[0]


def _text(status: int, text: str) -> tuple[int, bytes, str]:
    return status, f"{text}\n".encode(), "text/plain; charset=utf-8"
