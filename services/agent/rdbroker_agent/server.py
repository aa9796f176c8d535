"""The agent's HTTP endpoint, Starlette on uvicorn: `GET /load` (text), `GET /sessions` (JSON),
`POST /sessions/logoff|disconnect|message` (JSON in and out, actions.py) and `GET /healthz` (`ok`, the
only path that needs no authentication; auth.py says who may ask). This module runs it: routes.py
answers the paths, auth_middleware.py refuses requests without credentials, protocol.py bounds each
request head.

Bounds, for a port anyone on the network may reach:
- a request head of at most MAX_HEAD bytes: a longer one gets 431 and a close; one that is not
  HTTP/1.1 (h11's parse) gets 400 and a close;
- a request head must arrive within `request_timeout_s` of the connection's start (or of the previous
  answer): a client sending it slowly, or never, is closed unanswered. uvicorn itself only times out a
  connection idle after an answer (KEEP_ALIVE_S), so `BoundedProtocol` adds this deadline;
- at most `max_connections` connections are served: a request on one more gets `503 Service
  Unavailable` and a close (uvicorn's `limit_concurrency`). Connections are accepted before they are
  counted, so one over the cap stays open until it sends its request or its head deadline passes;
- an action's body is at most routes.MAX_BODY bytes of JSON (413 beyond);
- `GET /load` is computed once for requests that arrive together and reused for `load_cache_s`
  (SharedResult); the drain flag is read on every request, never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from types import TracebackType

import uvicorn

from rdbroker_common.https import TlsContext

from .actions import SessionActions
from .auth import AgentAuth, check_listen
from .auth_middleware import Refusals
from .config import AgentConfig
from .errors import ConfigError
from .host_actions import actions_for
from .load import measure_load
from .protocol import MAX_HEAD, BoundedProtocol
from .routes import Endpoints
from .shared import SharedResult
from .sources import Sources

KEEP_ALIVE_S = 5  # an idle connection is closed this long after its last answer (pollers come every few s)
SHUTDOWN_GRACE_S = 2  # requests in flight at stop get this long


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
        auth: AgentAuth | None = None,
        allow_unauthenticated: bool = False,
        actions: SessionActions | None = None,
    ):
        """`auth` defaults to the config's (its token_file, tls_ca; no environment token); `actions` to
        what this host offers (host_actions.actions_for).
        ListenRefused when nothing authenticates requests and `host` is not loopback (unless
        `allow_unauthenticated`); ConfigError when the token or TLS files cannot be used."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.config = config
        self.sources = sources
        self.host = host
        self.port = port
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.auth = auth if auth is not None else AgentAuth.from_config(config, env_token="")
        check_listen(host, self.auth, allow_unauthenticated)
        self.tls = _server_tls(config)
        self.load = SharedResult(lambda: measure_load(self.config, self.sources), load_cache_s)
        self.actions = actions if actions is not None else actions_for(config, sources.run)
        self.refusals = Refusals()
        self.app = Endpoints(config, sources, self.load, self.actions).app(self.auth, self.refusals)
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def open_connections(self) -> int:
        return len(self._uvicorn.server_state.connections) if self._uvicorn is not None else 0

    async def start(self) -> None:
        sock = _listen(self.host, self.port)
        tls = self.tls

        class Protocol(BoundedProtocol):
            head_timeout_s = self.request_timeout_s
            server_tls = tls

        config = uvicorn.Config(
            self.app,
            http=Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # uvicorn counts the connection asking among those open: N + 1 serves N at once.
            limit_concurrency=self.max_connections + 1,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            h11_max_incomplete_event_size=MAX_HEAD,
            ssl_context_factory=(lambda _config, _default: tls.context) if tls is not None else None,
        )
        config.load()
        server = _Uvicorn(config)
        # Supervised here: stop() ends it and awaits it.
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="agent-http")
        ready = asyncio.get_running_loop().create_task(server.ready.wait())
        await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            sock.close()
            await serving  # raises what stopped it
            raise RuntimeError("the agent's HTTP server ended before it started")
        self._uvicorn, self._serving, self._socket = server, serving, sock
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._uvicorn is not None and self._serving is not None:
            self._uvicorn.should_exit = True
            await self._serving
        if self._socket is not None:
            self._socket.close()
        self._uvicorn = self._serving = self._socket = None

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (the agent's stop event drives shutdown), telling when
    it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _server_tls(config: AgentConfig) -> TlsContext | None:
    """HTTPS with tls_cert/tls_key; with tls_ca, client certificates it signed are required. Renewed files
    take over from the next connection (each connection looks at them: three `os.stat`)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        return TlsContext.server(config.tls_cert, config.tls_key, config.tls_ca)
    except ValueError as exc:
        raise ConfigError(f"tls_cert/tls_key/tls_ca: {exc}") from exc


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
